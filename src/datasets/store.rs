//! Datasets and subsets on disk: `ROOT/DATASET/N_class/` (sd-scripts' layout: N repeats, the
//! class tokens after the underscore), safe names, and paths that cannot leave the root.

use std::path::{Path, PathBuf};

use serde::Serialize;

/// Image files a dataset holds (what the upload check decodes and sd-scripts trains on).
pub const IMAGE_EXTENSIONS: &[&str] = &["png", "jpg", "jpeg", "webp"];

/// What went wrong, by the HTTP status it maps to.
#[derive(Debug, thiserror::Error)]
pub enum DatasetError {
    /// 400: a malformed name or value.
    #[error("{0}")]
    Invalid(String),
    /// 403: a name or path that would leave the datasets root (`..`, separators, percent or
    /// backslash variants, a symlink out).
    #[error("{0}")]
    Forbidden(String),
    /// 404.
    #[error("{0}")]
    NotFound(String),
    /// 409: the name is taken.
    #[error("{0}")]
    Conflict(String),
    /// 500: the disk said no.
    #[error("{0}")]
    Io(String),
}

pub type Result<T> = std::result::Result<T, DatasetError>;

pub(crate) fn io_error(what: impl std::fmt::Display, e: std::io::Error) -> DatasetError {
    DatasetError::Io(format!("{what}: {e}"))
}

/// Upload limits (settings, with these defaults).
#[derive(Clone, Debug, Serialize)]
pub struct UploadLimits {
    /// One file.
    pub max_file_bytes: u64,
    /// One request (all its files).
    pub max_request_bytes: u64,
    /// The longest side an image may have (larger ones are refused before decoding).
    pub max_side: u32,
    /// The shortest side an image must have: the registry's smallest bucket side.
    pub min_side: u32,
}

impl Default for UploadLimits {
    fn default() -> Self {
        Self { max_file_bytes: 64 << 20, max_request_bytes: 2 << 30, max_side: 16384, min_side: 256 }
    }
}

/// The datasets under one root.
#[derive(Clone, Debug)]
pub struct Datasets {
    pub root: PathBuf,
    pub limits: UploadLimits,
    /// Folders a request may point into besides the datasets (models, folders to import): the
    /// data directory and every `--allow-root`, canonical.
    pub allowed_roots: Vec<PathBuf>,
}

#[derive(Debug, Serialize)]
pub struct DatasetSummary {
    pub name: String,
    pub subsets: usize,
    pub images: usize,
    pub bytes: u64,
}

impl DatasetSummary {
    /// The size for a page: "3.2 MiB".
    pub fn mib(&self) -> String {
        format!("{:.1} MiB", self.bytes as f64 / (1u64 << 20) as f64)
    }
}

#[derive(Debug, Serialize)]
pub struct Dataset {
    pub name: String,
    pub path: PathBuf,
    pub subsets: Vec<Subset>,
}

#[derive(Debug, Serialize)]
pub struct Subset {
    /// The folder name, `N_class`: how requests name the subset.
    pub folder: String,
    pub repeats: u32,
    pub class_tokens: String,
    pub images: Vec<ImageEntry>,
}

#[derive(Debug, Serialize)]
pub struct ImageEntry {
    pub file: String,
    pub width: u32,
    pub height: u32,
    pub bytes: u64,
    /// The `.txt` caption beside the image, if there is one.
    pub caption: Option<String>,
}

/// Checks a dataset, subset or file name from a request: one plain path component. Anything
/// that could point elsewhere (separators, `..`, a leading dot, `%` from a double-encoded
/// request, NUL) is refused as forbidden; other unusable names as invalid.
pub fn check_name(what: &str, name: &str) -> Result<()> {
    if name.contains(['/', '\\', '%', '\0']) || name.starts_with('.') || name.contains("..") || Path::new(name).is_absolute() {
        return Err(DatasetError::Forbidden(format!("{what} {name:?}: a name, not a path (no '/', '\\', '..', '%' or leading '.')")));
    }
    if name.trim().is_empty() || name.trim() != name {
        return Err(DatasetError::Invalid(format!("{what} {name:?}: empty, or starts or ends with a space")));
    }
    if name.chars().count() > 100 {
        return Err(DatasetError::Invalid(format!("{what} {name:?}: longer than 100 characters")));
    }
    if let Some(c) = name.chars().find(|c| c.is_control() || matches!(c, ':' | '*' | '?' | '"' | '<' | '>' | '|')) {
        return Err(DatasetError::Invalid(format!("{what} {name:?}: the character {c:?} is not allowed")));
    }
    Ok(())
}

/// `N_class` → `(N, class)`, or `None` for a folder sd-scripts would not read as a subset.
pub fn parse_subset_folder(folder: &str) -> Option<(u32, String)> {
    let (n, class) = folder.split_once('_')?;
    let repeats = n.parse::<u32>().ok().filter(|r| *r > 0)?;
    Some((repeats, class.to_string()))
}

pub fn is_image(path: &Path) -> bool {
    path.extension().and_then(|e| e.to_str()).is_some_and(|e| IMAGE_EXTENSIONS.contains(&e.to_ascii_lowercase().as_str()))
}

/// A dot-file name no other request uses (`.PREFIX-<pid>-<random>.part`), for a file being
/// written before it is checked and renamed.
pub fn temp_name(prefix: &str) -> String {
    let mut b = [0u8; 8];
    let _ = getrandom::fill(&mut b);
    format!(".{prefix}-{}-{}.part", std::process::id(), b.iter().map(|x| format!("{x:02x}")).collect::<String>())
}

/// Writes a file through a temporary file and a rename (the engine's: its tagger writes captions too).
pub use loft_worker::data::write_atomic;

impl Datasets {
    pub fn new(root: PathBuf, limits: UploadLimits) -> std::io::Result<Self> {
        std::fs::create_dir_all(&root)?;
        let root = root.canonicalize()?;
        let data_dir = root.parent().map(Path::to_path_buf).unwrap_or_else(|| root.clone());
        Ok(Self { root, limits, allowed_roots: vec![data_dir] })
    }

    /// Adds allowed roots (`--allow-root`); each must be an existing folder.
    pub fn allow_roots(&mut self, roots: &[PathBuf]) -> std::io::Result<()> {
        for r in roots {
            let real = r.canonicalize().map_err(|e| std::io::Error::new(e.kind(), format!("--allow-root {}: {e}", r.display())))?;
            if !real.is_dir() {
                return Err(std::io::Error::other(format!("--allow-root {}: not a folder", r.display())));
            }
            if !self.allowed_roots.contains(&real) {
                self.allowed_roots.push(real);
            }
        }
        Ok(())
    }

    /// `path` resolved (symlinks included), if it lies inside an allowed root.
    pub fn inside_allowed_root(&self, path: &Path) -> Result<PathBuf> {
        if path.as_os_str().to_string_lossy().contains(['%', '\\']) {
            return Err(DatasetError::Forbidden(format!("{}: percent-encoded or backslash paths are not accepted", path.display())));
        }
        let real = path.canonicalize().map_err(|_| DatasetError::NotFound(format!("{}: no such file or folder", path.display())))?;
        if self.allowed_roots.iter().any(|r| real.starts_with(r)) {
            Ok(real)
        } else {
            Err(DatasetError::Forbidden(format!("{} is outside the allowed folders (the data directory and --allow-root)", path.display())))
        }
    }

    /// Base models under the allowed roots, for the model picker: single-file `.safetensors`
    /// checkpoints (over 500 MB, so LoRA files stay out) and diffusers folders
    /// (`model_index.json`), at most three folders deep; `(path, label)`.
    pub fn model_candidates(&self) -> Vec<(String, String)> {
        let mut out = vec![];
        fn walk(dir: &Path, depth: usize, out: &mut Vec<(String, String)>) {
            if out.len() >= 200 {
                return;
            }
            if dir.join("model_index.json").is_file() {
                out.push((dir.display().to_string(), format!("{} (diffusers folder)", dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default())));
                return;
            }
            let Ok(entries) = std::fs::read_dir(dir) else { return };
            let mut entries: Vec<_> = entries.flatten().collect();
            entries.sort_by_key(|e| e.file_name());
            for e in entries {
                let p = e.path();
                let name = e.file_name().to_string_lossy().into_owned();
                if name.starts_with('.') || matches!(name.as_str(), "datasets" | "cache" | "jobs" | "tmp") {
                    continue;
                }
                if p.is_dir() && depth > 0 {
                    walk(&p, depth - 1, out);
                } else if name.ends_with(".safetensors") {
                    let size = e.metadata().map(|m| m.len()).unwrap_or(0);
                    if size > 500_000_000 {
                        out.push((p.display().to_string(), format!("{name} ({:.1} GB)", size as f64 / 1e9)));
                    }
                }
            }
        }
        for r in &self.allowed_roots {
            walk(r, 3, &mut out);
        }
        out
    }

    /// A path under the root from checked names, resolved: an existing path must still lie
    /// inside the root once symlinks are followed.
    fn resolve(&self, parts: &[(&str, &str)]) -> Result<PathBuf> {
        let mut path = self.root.clone();
        for (what, name) in parts {
            check_name(what, name)?;
            path.push(name);
        }
        if let Ok(real) = path.canonicalize() {
            if !real.starts_with(&self.root) {
                return Err(DatasetError::Forbidden(format!("{} leads outside the datasets folder (a symlink)", parts.last().map(|p| p.1).unwrap_or(""))));
            }
        }
        Ok(path)
    }

    /// An existing dataset's folder.
    pub fn dataset_dir(&self, name: &str) -> Result<PathBuf> {
        let dir = self.resolve(&[("dataset", name)])?;
        if !dir.is_dir() {
            return Err(DatasetError::NotFound(format!("no dataset {name:?}")));
        }
        Ok(dir)
    }

    /// An existing subset's folder.
    pub fn subset_dir(&self, name: &str, subset: &str) -> Result<PathBuf> {
        self.dataset_dir(name)?;
        let dir = self.resolve(&[("dataset", name), ("subset", subset)])?;
        if !dir.is_dir() {
            return Err(DatasetError::NotFound(format!("dataset {name:?} has no subset {subset:?}")));
        }
        Ok(dir)
    }

    /// An existing image (or its caption's image) in a subset.
    pub fn image_path(&self, name: &str, subset: &str, file: &str) -> Result<PathBuf> {
        self.subset_dir(name, subset)?;
        let path = self.resolve(&[("dataset", name), ("subset", subset), ("file", file)])?;
        if !is_image(&path) || !path.is_file() {
            return Err(DatasetError::NotFound(format!("subset {subset:?} has no image {file:?}")));
        }
        Ok(path)
    }

    pub fn create(&self, name: &str) -> Result<PathBuf> {
        let dir = self.resolve(&[("dataset", name)])?;
        match std::fs::create_dir(&dir) {
            Ok(()) => Ok(dir),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Err(DatasetError::Conflict(format!("a dataset {name:?} exists already"))),
            Err(e) => Err(io_error(format!("creating dataset {name:?}"), e)),
        }
    }

    /// Renames a dataset (its folder).
    pub fn rename(&self, name: &str, new_name: &str) -> Result<()> {
        let dir = self.dataset_dir(name)?;
        let target = self.resolve(&[("new name", new_name)])?;
        if target.exists() {
            return Err(DatasetError::Conflict(format!("a dataset {new_name:?} exists already")));
        }
        std::fs::rename(&dir, &target).map_err(|e| io_error(format!("renaming dataset {name:?}"), e))
    }

    pub fn delete(&self, name: &str) -> Result<()> {
        let dir = self.dataset_dir(name)?;
        // A symlinked dataset folder is unlinked, never followed.
        if dir.symlink_metadata().map(|m| m.file_type().is_symlink()).unwrap_or(false) {
            return std::fs::remove_file(&dir).map_err(|e| io_error(format!("deleting dataset {name:?}"), e));
        }
        std::fs::remove_dir_all(&dir).map_err(|e| io_error(format!("deleting dataset {name:?}"), e))
    }

    /// Creates subset `REPEATS_CLASS`; returns its folder name.
    pub fn create_subset(&self, name: &str, class_tokens: &str, repeats: u32) -> Result<String> {
        self.dataset_dir(name)?;
        if repeats == 0 || repeats > 10_000 {
            return Err(DatasetError::Invalid(format!("repeats {repeats}: from 1 to 10000")));
        }
        check_name("class tokens", class_tokens)?;
        let folder = format!("{repeats}_{class_tokens}");
        let dir = self.resolve(&[("dataset", name), ("subset", &folder)])?;
        match std::fs::create_dir(&dir) {
            Ok(()) => Ok(folder),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Err(DatasetError::Conflict(format!("dataset {name:?} has a subset {folder:?} already"))),
            Err(e) => Err(io_error(format!("creating subset {folder:?}"), e)),
        }
    }

    /// Changes a subset's repeats and/or class tokens (renames its folder); returns the new name.
    pub fn update_subset(&self, name: &str, subset: &str, repeats: Option<u32>, class_tokens: Option<&str>) -> Result<String> {
        let dir = self.subset_dir(name, subset)?;
        let (old_repeats, old_class) = parse_subset_folder(subset).unwrap_or((1, subset.to_string()));
        let repeats = repeats.unwrap_or(old_repeats);
        let class = class_tokens.unwrap_or(&old_class);
        if repeats == 0 || repeats > 10_000 {
            return Err(DatasetError::Invalid(format!("repeats {repeats}: from 1 to 10000")));
        }
        check_name("class tokens", class)?;
        let folder = format!("{repeats}_{class}");
        if folder == subset {
            return Ok(folder);
        }
        let target = self.resolve(&[("dataset", name), ("subset", &folder)])?;
        if target.exists() {
            return Err(DatasetError::Conflict(format!("dataset {name:?} has a subset {folder:?} already")));
        }
        std::fs::rename(&dir, &target).map_err(|e| io_error(format!("renaming subset {subset:?}"), e))?;
        Ok(folder)
    }

    pub fn delete_subset(&self, name: &str, subset: &str) -> Result<()> {
        let dir = self.subset_dir(name, subset)?;
        std::fs::remove_dir_all(&dir).map_err(|e| io_error(format!("deleting subset {subset:?}"), e))
    }

    /// The subset uploads go to when none is named: the first one, or `1_NAME` made for them.
    pub fn default_subset(&self, name: &str) -> Result<String> {
        match subset_folders(&self.dataset_dir(name)?).into_iter().next() {
            Some((folder, _)) => Ok(folder),
            None => self.create_subset(name, name, 1),
        }
    }

    /// Every dataset with its counts. Cheap (names and file sizes only, no image is opened): the
    /// form's dataset picker calls it on every render of the Dataset tab.
    pub fn list(&self) -> Result<Vec<DatasetSummary>> {
        let mut out = vec![];
        let entries = std::fs::read_dir(&self.root).map_err(|e| io_error("reading the datasets folder", e))?;
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.starts_with('.') || !entry.path().is_dir() || check_name("dataset", &name).is_err() {
                continue;
            }
            let Ok(dir) = self.dataset_dir(&name) else { continue };
            let folders = subset_folders(&dir);
            let (mut images, mut bytes) = (0, 0);
            for (_, path) in &folders {
                for (_, size) in image_files(path) {
                    images += 1;
                    bytes += size;
                }
            }
            out.push(DatasetSummary { name, subsets: folders.len(), images, bytes });
        }
        out.sort_by(|a, b| a.name.to_lowercase().cmp(&b.name.to_lowercase()));
        Ok(out)
    }

    /// A dataset's subsets (the `N_class` folders sd-scripts reads) and their images, with the
    /// sizes from their headers and their captions.
    pub fn get(&self, name: &str) -> Result<Dataset> {
        let dir = self.dataset_dir(name)?;
        let subsets = subset_folders(&dir)
            .into_iter()
            .map(|(folder, path)| {
                let (repeats, class_tokens) = parse_subset_folder(&folder).expect("a subset folder");
                Subset { images: list_images(&path), folder, repeats, class_tokens }
            })
            .collect();
        Ok(Dataset { name: name.to_string(), path: dir, subsets })
    }
}

/// A dataset's `N_class` folders (name, path), sorted.
fn subset_folders(dir: &Path) -> Vec<(String, PathBuf)> {
    let mut out: Vec<(String, PathBuf)> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| (e.file_name().to_string_lossy().into_owned(), e.path()))
        .filter(|(folder, path)| parse_subset_folder(folder).is_some() && path.is_dir())
        .collect();
    out.sort();
    out
}

/// The image files of a folder (name, size in bytes), sorted; dot-files left out.
fn image_files(dir: &Path) -> Vec<(String, u64)> {
    let mut out: Vec<(String, u64)> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| is_image(&e.path()) && e.path().is_file() && !e.file_name().to_string_lossy().starts_with('.'))
        .map(|e| (e.file_name().to_string_lossy().into_owned(), e.metadata().map(|m| m.len()).unwrap_or(0)))
        .collect();
    out.sort();
    out
}

impl Dataset {
    /// Keeps only the images whose caption has `tag` (exact, case-insensitive; comma-separated
    /// tags, as the bulk operations see them).
    pub fn filter_by_tag(&mut self, tag: &str) {
        let wanted = tag.trim().to_lowercase();
        for s in &mut self.subsets {
            s.images.retain(|img| img.caption.as_deref().unwrap_or("").split(',').any(|t| t.trim().to_lowercase() == wanted));
        }
    }
}

/// The images of one folder with their sizes (read from the headers) and captions.
fn list_images(dir: &Path) -> Vec<ImageEntry> {
    image_files(dir)
        .into_iter()
        .map(|(file, bytes)| {
            let path = dir.join(&file);
            let (width, height) = image::ImageReader::open(&path)
                .ok()
                .and_then(|r| r.with_guessed_format().ok())
                .and_then(|r| r.into_dimensions().ok())
                .unwrap_or((0, 0));
            let caption = std::fs::read_to_string(path.with_extension("txt")).ok();
            ImageEntry { file, width, height, bytes, caption }
        })
        .collect()
}
