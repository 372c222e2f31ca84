pub mod data;
pub mod device;
pub mod flow;
pub mod grad_checkpoint;
pub mod kernels;
pub mod linalg;
pub mod lora_file;
pub mod models;
pub mod networks;
pub mod noise;
pub mod ops;
pub mod optim;
pub mod profile;
pub mod sample;
pub mod schedule;
pub mod tagger;
pub mod train;

/// The tensor library, re-exported so the root crate (CLI, tests) builds tensors with the same
/// version the engine uses.
pub use candle_core;

pub fn version() -> &'static str { env!("CARGO_PKG_VERSION") }
