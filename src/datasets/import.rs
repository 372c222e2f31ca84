//! Import into a dataset from a zip file or from a folder under an allowed root. Every image
//! goes through the upload check; a caption `.txt` is kept beside its image. From a zip, an
//! entry that would leave the target (zip slip), a symlink, more entries or more uncompressed
//! bytes than the limits allow are refused by name — the last two refuse the whole archive
//! before anything is written, and an import that stops part-way takes back what it wrote. Files
//! in an `N_class` folder go to that subset (made if needed),
//! the others to the subset named in the request (or the dataset's first).

use std::collections::HashMap;
use std::io::Read;
use std::path::{Component, Path, PathBuf};

use serde::Serialize;

use super::images::{check_image, free_name, upload_name};
use super::store::{io_error, parse_subset_folder, write_atomic, DatasetError, Datasets, Result};

/// The most entries one archive or folder may hold.
pub const MAX_ENTRIES: usize = 10_000;

/// What an upload or an import did: the files stored (images with their size) and the ones
/// refused, each with why.
#[derive(Debug, Default, Serialize)]
pub struct Report {
    pub accepted: Vec<Accepted>,
    pub rejected: Vec<Rejected>,
}

#[derive(Debug, Serialize)]
pub struct Accepted {
    pub file: String,
    pub subset: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub width: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub height: Option<u32>,
    /// Accepted, with something to know (EXIF rotation, alpha).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub notes: Vec<String>,
}

#[derive(Debug, Serialize)]
pub struct Rejected {
    pub file: String,
    pub reason: String,
}

/// Collects checked files and writes them; captions wait for their images.
struct Sink<'a> {
    ds: &'a Datasets,
    dataset: String,
    default_subset: Option<String>,
    outcome: Report,
    /// (subset, stem) → stored image path.
    images: HashMap<(String, String), PathBuf>,
    captions: Vec<(String, String, String, String)>,
    /// Everything this import wrote (files and the subset folders it made), to take back if it
    /// stops part-way.
    written: Vec<PathBuf>,
}

impl<'a> Sink<'a> {
    /// The subset a file goes to: its `N_class` folder, or the default one (the first subset,
    /// or `1_NAME`). Nothing is created here.
    fn subset_for(&mut self, folder: Option<&str>) -> Result<String> {
        if let Some(f) = folder.filter(|f| parse_subset_folder(f).is_some()) {
            super::store::check_name("subset", f)?;
            return Ok(f.to_string());
        }
        if self.default_subset.is_none() {
            let first = self.ds.get(&self.dataset)?.subsets.first().map(|s| s.folder.clone());
            self.default_subset = Some(first.unwrap_or_else(|| format!("1_{}", self.dataset)));
        }
        Ok(self.default_subset.clone().expect("set above"))
    }

    /// The subset's folder, made when the first file that passed its check goes there.
    fn subset_dir(&mut self, subset: &str) -> Result<PathBuf> {
        let dir = self.ds.root.join(&self.dataset).join(subset);
        if !dir.exists() {
            std::fs::create_dir(&dir).map_err(|e| io_error(format!("creating subset {subset}"), e))?;
            self.written.push(dir.clone());
        }
        Ok(dir)
    }

    /// Takes back what this import wrote (it stopped part-way).
    fn roll_back(&self) {
        for p in self.written.iter().rev() {
            let _ = if p.is_dir() { std::fs::remove_dir(p) } else { std::fs::remove_file(p) };
        }
    }

    fn add(&mut self, shown: &str, folder: Option<&str>, bytes: Vec<u8>) -> Result<()> {
        let (stem, ext) = match upload_name(shown) {
            Ok(v) => v,
            Err(reason) => {
                self.outcome.rejected.push(Rejected { file: shown.to_string(), reason });
                return Ok(());
            }
        };
        let subset = self.subset_for(folder)?;
        if ext == "txt" {
            if bytes.len() > super::captions::MAX_CAPTION_BYTES {
                self.outcome.rejected.push(Rejected { file: shown.to_string(), reason: "is a caption longer than 64 KiB".into() });
                return Ok(());
            }
            match String::from_utf8(bytes) {
                Ok(text) => self.captions.push((shown.to_string(), subset, stem, text)),
                Err(_) => self.outcome.rejected.push(Rejected { file: shown.to_string(), reason: "is not UTF-8 text".into() }),
            }
            return Ok(());
        }
        let checked = match check_image(&bytes, &ext, &self.ds.limits) {
            Ok(c) => c,
            Err(reason) => {
                self.outcome.rejected.push(Rejected { file: shown.to_string(), reason });
                return Ok(());
            }
        };
        let dir = self.subset_dir(&subset)?;
        let target = free_name(&dir, &stem, &ext);
        let part = dir.join(super::store::temp_name("import"));
        std::fs::write(&part, &bytes).map_err(|e| io_error(format!("writing {shown}"), e))?;
        let linked = std::fs::hard_link(&part, &target);
        let _ = std::fs::remove_file(&part);
        linked.map_err(|e| io_error(format!("storing {shown}"), e))?;
        self.written.push(target.clone());
        let file = target.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        self.images.insert((subset.clone(), stem), target);
        self.outcome.accepted.push(Accepted { file, subset, width: Some(checked.width), height: Some(checked.height), notes: checked.notes });
        Ok(())
    }

    /// Writes the captions beside their images (uploaded now, or already there).
    fn write_captions(&mut self) -> Result<()> {
        for (shown, subset, stem, text) in std::mem::take(&mut self.captions) {
            let dir = self.ds.root.join(&self.dataset).join(&subset);
            let image = self.images.get(&(subset.clone(), stem.clone())).cloned().or_else(|| {
                super::store::IMAGE_EXTENSIONS.iter().map(|e| dir.join(format!("{stem}.{e}"))).find(|p| p.is_file())
            });
            match image {
                Some(image) => {
                    let caption = image.with_extension("txt");
                    write_atomic(&caption, text.as_bytes()).map_err(|e| io_error(format!("writing {shown}"), e))?;
                    self.written.push(caption.clone());
                    let file = caption.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
                    self.outcome.accepted.push(Accepted { file, subset, width: None, height: None, notes: vec![] });
                }
                None => self.outcome.rejected.push(Rejected { file: shown, reason: format!("no image named {stem}.* beside it") }),
            }
        }
        Ok(())
    }
}

/// The `N_class` folder an entry sits in (its parent's name), if any.
fn folder_of(path: &Path) -> Option<String> {
    path.parent().and_then(|p| p.file_name()).map(|n| n.to_string_lossy().into_owned())
}

/// Imports the zip file at `zip_path` into `dataset`.
pub fn import_zip(ds: &Datasets, dataset: &str, subset: Option<&str>, zip_path: &Path) -> Result<Report> {
    ds.dataset_dir(dataset)?;
    if let Some(s) = subset {
        ds.subset_dir(dataset, s)?;
    }
    let file = std::fs::File::open(zip_path).map_err(|e| io_error("reading the upload", e))?;
    let mut archive = zip::ZipArchive::new(file).map_err(|e| DatasetError::Invalid(format!("not a zip file: {e}")))?;
    if archive.len() > MAX_ENTRIES {
        return Err(DatasetError::Invalid(format!("the archive has {} entries; at most {MAX_ENTRIES} are imported at once", archive.len())));
    }
    // A zip bomb: the sizes the archive declares, summed, against the request limit (each entry
    // is also read through a cap, in case it lies).
    let mut declared = 0u64;
    for i in 0..archive.len() {
        let entry = archive.by_index(i).map_err(|e| DatasetError::Invalid(format!("entry {i} is damaged: {e}")))?;
        declared = declared.saturating_add(entry.size());
    }
    if declared > ds.limits.max_request_bytes {
        return Err(DatasetError::Invalid(format!("the archive unpacks to {declared} bytes, more than the {} byte limit of one import", ds.limits.max_request_bytes)));
    }
    let sink = Sink { ds, dataset: dataset.to_string(), default_subset: subset.map(str::to_string), outcome: Default::default(), images: HashMap::new(), captions: vec![], written: vec![] };
    let mut unpacked = 0u64;
    all_or_nothing(sink, |sink| {
    for i in 0..archive.len() {
        let mut entry = archive.by_index(i).map_err(|e| DatasetError::Invalid(format!("entry {i} is damaged: {e}")))?;
        let raw = entry.name().map(|n| n.into_owned()).unwrap_or_else(|_| format!("entry {i}"));
        if entry.is_dir() {
            continue;
        }
        if entry.is_symlink() {
            sink.outcome.rejected.push(Rejected { file: raw, reason: "is a symbolic link: not imported".into() });
            continue;
        }
        let Some(path) = entry.enclosed_name().filter(|p| p.components().all(|c| matches!(c, Component::Normal(_)))) else {
            sink.outcome.rejected.push(Rejected { file: raw, reason: "points outside the archive's folder (zip slip): not imported".into() });
            continue;
        };
        let limit = ds.limits.max_file_bytes;
        let mut bytes = vec![];
        (&mut entry).take(limit + 1).read_to_end(&mut bytes).map_err(|e| DatasetError::Invalid(format!("{raw} cannot be unpacked: {e}")))?;
        unpacked += bytes.len() as u64;
        if unpacked > ds.limits.max_request_bytes {
            return Err(DatasetError::Invalid(format!("the archive unpacks to more than its declared sizes and the {} byte limit", ds.limits.max_request_bytes)));
        }
        if bytes.len() as u64 > limit {
            sink.outcome.rejected.push(Rejected { file: raw, reason: format!("is larger than the {limit} byte limit for one file") });
            continue;
        }
        let shown = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        let folder = folder_of(&path);
        sink.add(&shown, folder.as_deref(), bytes)?;
    }
    Ok(())
    })
}

/// Runs an import's entries and writes its captions; when it stops part-way, what it wrote is
/// taken back, so a refused import leaves the dataset as it was.
fn all_or_nothing(mut sink: Sink, run: impl FnOnce(&mut Sink) -> Result<()>) -> Result<Report> {
    let result = run(&mut sink).and_then(|()| sink.write_captions());
    match result {
        Ok(()) => Ok(sink.outcome),
        Err(e) => {
            sink.roll_back();
            Err(e)
        }
    }
}

/// Imports (copies) the images and captions of a folder under an allowed root, and of its
/// `N_class` subfolders.
pub fn import_folder(ds: &Datasets, dataset: &str, subset: Option<&str>, folder: &Path) -> Result<Report> {
    ds.dataset_dir(dataset)?;
    if let Some(s) = subset {
        ds.subset_dir(dataset, s)?;
    }
    let folder = ds.inside_allowed_root(folder)?;
    if !folder.is_dir() {
        return Err(DatasetError::Invalid(format!("{} is not a folder", folder.display())));
    }
    if folder.starts_with(&ds.root) {
        return Err(DatasetError::Invalid("the folder is inside the datasets already".into()));
    }
    let mut files = vec![];
    for e in std::fs::read_dir(&folder).map_err(|e| io_error(format!("reading {}", folder.display()), e))?.flatten() {
        let p = e.path();
        // Symlinks are not followed (they could lead out of the allowed root).
        let Ok(meta) = std::fs::symlink_metadata(&p) else { continue };
        if meta.file_type().is_symlink() {
            continue;
        }
        if meta.is_dir() {
            for f in std::fs::read_dir(&p).into_iter().flatten().flatten() {
                if std::fs::symlink_metadata(f.path()).map(|m| m.is_file()).unwrap_or(false) {
                    files.push(f.path());
                }
            }
        } else if meta.is_file() {
            files.push(p);
        }
    }
    if files.len() > MAX_ENTRIES {
        return Err(DatasetError::Invalid(format!("the folder has {} files; at most {MAX_ENTRIES} are imported at once", files.len())));
    }
    files.sort();
    let sink = Sink { ds, dataset: dataset.to_string(), default_subset: subset.map(str::to_string), outcome: Default::default(), images: HashMap::new(), captions: vec![], written: vec![] };
    all_or_nothing(sink, |sink| {
    for p in files {
        let shown = p.strip_prefix(&folder).unwrap_or(&p).display().to_string();
        let size = std::fs::metadata(&p).map(|m| m.len()).unwrap_or(0);
        if size > ds.limits.max_file_bytes {
            sink.outcome.rejected.push(Rejected { file: shown, reason: format!("is larger than the {} byte limit for one file", ds.limits.max_file_bytes) });
            continue;
        }
        let name = p.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        if upload_name(&name).is_err() {
            continue; // other files of the folder (notes, metadata) are not the import's business
        }
        let bytes = std::fs::read(&p).map_err(|e| io_error(format!("reading {shown}"), e))?;
        let folder_name = (p.parent() != Some(folder.as_path())).then(|| folder_of(&p)).flatten();
        sink.add(&name, folder_name.as_deref(), bytes)?;
    }
    Ok(())
    })
}
