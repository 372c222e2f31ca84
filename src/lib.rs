//! Loft: the web shell, the field registry and the job queue around the `loft-worker` engine.

pub mod bench;
pub mod datasets;
pub mod db;
pub mod drafts;
pub mod jobs;
pub mod lora_cli;
pub mod presets;
pub mod registry;
pub mod sd_scripts;
pub mod server;
pub mod settings;
pub mod signal;
pub mod train_cli;
pub mod web;
