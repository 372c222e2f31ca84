//! Training data in the sd-scripts layout: image folders with caption files (`N_name` subfolders
//! give N repeats), aspect-ratio buckets, caption processing, and image loading into bucket-sized
//! tensors.

pub mod augment;
pub mod buckets;
pub mod captions;
pub mod dataset;
pub mod images;
pub mod masks;
pub mod py_random;
pub mod weighted_captions;

pub use buckets::{BucketManager, BucketChoice};
pub use captions::{process_caption, CaptionOptions};
pub use dataset::{scan_train_dir, BadImage, BadImagePolicy, ImageEntry, Subset};
pub use masks::MaskSource;
