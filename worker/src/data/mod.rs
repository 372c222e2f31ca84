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

/// Writes `bytes` to `path` through a temporary file in the same folder and a rename, so a
/// reader sees the old file or the new one, never half of one. (Captions from the web app and
/// the tagger, the undo record, thumbnails.)
pub fn write_atomic(path: &std::path::Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    use std::sync::atomic::{AtomicU64, Ordering};
    // Two writes of one file at once (two requests) each get their own temporary file.
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let dir = path.parent().ok_or_else(|| std::io::Error::other("no parent folder"))?;
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let tmp = dir.join(format!(".{name}.{}-{}.tmp", std::process::id(), NEXT.fetch_add(1, Ordering::Relaxed)));
    let result = (|| {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}
