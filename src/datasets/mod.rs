//! Datasets in the studio: folders under `DATA_DIR/datasets/` in the sd-scripts layout
//! (`DATASET/N_subset/` with the repeats in the folder name, images with `.txt` captions beside
//! them), so every trainer reads them and a user can edit them outside Loft.
//!
//! - [`store`]: create, list, read and delete datasets and subsets; safe names and paths.
//! - [`images`]: the upload check (every image fully decoded, truncation caught) and storage.
//! - [`captions`]: one caption saved atomically, bulk operations with preview and undo.
//!
//! Every name that comes from a request is one plain path component checked by
//! [`store::check_name`], and every path is resolved (symlinks included) and must lie inside the
//! datasets root: nothing outside it is read or written.

pub mod captions;
pub mod cli;
pub mod images;
pub mod import;
pub mod store;
pub mod tagging;

pub use store::{DatasetError, Datasets};
