//! Dataset folders in the sd-scripts (DreamBooth) layout.
//!
//! ```text
//! train_data_dir/
//!   10_sks dog/          ← 10 repeats, class tokens "sks dog"
//!     001.png
//!     001.txt            ← the caption (caption_extension), else the class tokens are used
//!   3_style/
//!     a.jpg  a.txt
//! ```
//! A corrupt or unreadable image is reported by name and either skipped or fatal, never a panic.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

pub const IMAGE_EXTENSIONS: &[&str] = &["png", "jpg", "jpeg", "webp", "bmp"];

/// One folder of images with its repeat count.
#[derive(Debug, Clone, PartialEq)]
pub struct Subset {
    pub image_dir: PathBuf,
    pub num_repeats: u32,
    /// Used as the caption of an image that has no caption file.
    pub class_tokens: String,
    pub is_reg: bool,
    pub caption_extension: String,
    /// sd-scripts' `enable_wildcard`: keep every non-empty line of a caption file (one is
    /// chosen per step), not just the first.
    pub enable_wildcard: bool,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ImageEntry {
    pub path: PathBuf,
    pub caption: String,
    pub num_repeats: u32,
    pub is_reg: bool,
    pub width: u32,
    pub height: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BadImagePolicy {
    /// Report the image and train without it.
    Skip,
    /// Stop with an error naming the image.
    Fail,
}

/// An image that could not be used, and why.
#[derive(Debug, Clone, PartialEq)]
pub struct BadImage {
    pub path: PathBuf,
    pub reason: String,
}

/// Reads the `N_name` subfolders of a train (or regularisation) folder. A folder whose name does
/// not start with a repeat count is skipped, as sd-scripts does, and listed in the second value.
pub fn scan_train_dir(dir: &Path, caption_extension: &str, is_reg: bool) -> Result<(Vec<Subset>, Vec<PathBuf>)> {
    let entries = std::fs::read_dir(dir).with_context(|| format!("cannot read the dataset folder {}", dir.display()))?;
    let mut subsets = Vec::new();
    let mut ignored = Vec::new();
    let mut paths: Vec<PathBuf> = entries.filter_map(|e| e.ok().map(|e| e.path())).filter(|p| p.is_dir()).collect();
    paths.sort();
    for path in paths {
        let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        match name.split_once('_').and_then(|(n, rest)| n.parse::<u32>().ok().map(|n| (n, rest.to_string()))) {
            Some((repeats, class_tokens)) if repeats > 0 => subsets.push(Subset {
                image_dir: path,
                num_repeats: repeats,
                class_tokens,
                is_reg,
                caption_extension: caption_extension.to_string(),
                enable_wildcard: false,
            }),
            _ => ignored.push(path),
        }
    }
    if subsets.is_empty() {
        bail!(
            "the dataset folder {} has no `N_name` subfolders (e.g. `10_sks dog` for 10 repeats); put the images in one",
            dir.display()
        );
    }
    Ok((subsets, ignored))
}

pub fn is_image(path: &Path) -> bool {
    path.extension().and_then(|e| e.to_str()).is_some_and(|e| IMAGE_EXTENSIONS.contains(&e.to_ascii_lowercase().as_str()))
}

/// Reads an image's caption file (the subset's extension, then `.caption`/`.txt` as fall-backs),
/// or returns the class tokens.
fn read_caption(image: &Path, subset: &Subset) -> Result<String> {
    let mut candidates = vec![subset.caption_extension.clone()];
    for ext in [".txt", ".caption"] {
        if !candidates.iter().any(|c| c == ext) {
            candidates.push(ext.to_string());
        }
    }
    // sd-scripts also reads the caption of `name.txt` for `name_cx_cy_w_h.png`, an image its
    // face-detection tool renamed with the face box.
    let mut bases = vec![image.to_path_buf()];
    if let Some(stem) = image.file_stem().map(|s| s.to_string_lossy().into_owned()) {
        let tokens: Vec<&str> = stem.split('_').collect();
        if tokens.len() >= 5 {
            bases.push(image.with_file_name(format!("{}.x", tokens[..tokens.len() - 4].join("_"))));
        }
    }
    for (base, ext) in bases.iter().flat_map(|b| candidates.iter().map(move |e| (b, e))) {
        let path = base.with_extension(ext.trim_start_matches('.'));
        if path.is_file() {
            let text = std::fs::read_to_string(&path).with_context(|| format!("cannot read the caption {}", path.display()))?;
            // sd-scripts uses the first line of the file, or with wildcards every non-empty
            // line (stripped, joined by newlines; one is chosen per step).
            if subset.enable_wildcard {
                return Ok(text.lines().map(str::trim).filter(|l| !l.is_empty()).collect::<Vec<_>>().join("\n"));
            }
            return Ok(text.lines().next().unwrap_or("").trim().to_string());
        }
    }
    Ok(subset.class_tokens.clone())
}

/// Lists a subset's images with their captions and sizes. Each image's header is decoded to check
/// it is an image and learn its size; a bad one is reported by name per `policy`.
pub fn load_subset(subset: &Subset, policy: BadImagePolicy) -> Result<(Vec<ImageEntry>, Vec<BadImage>)> {
    let entries = std::fs::read_dir(&subset.image_dir)
        .with_context(|| format!("cannot read the image folder {}", subset.image_dir.display()))?;
    let mut paths: Vec<PathBuf> = entries.filter_map(|e| e.ok().map(|e| e.path())).filter(|p| p.is_file() && is_image(p)).collect();
    paths.sort();
    let mut images = Vec::new();
    let mut bad = Vec::new();
    for path in paths {
        let size = image::ImageReader::open(&path)
            .map_err(|e| e.to_string())
            .and_then(|r| r.with_guessed_format().map_err(|e| e.to_string()))
            .and_then(|r| r.into_dimensions().map_err(|e| e.to_string()));
        match size {
            Ok((width, height)) if width > 0 && height > 0 => images.push(ImageEntry {
                caption: read_caption(&path, subset)?,
                path,
                num_repeats: subset.num_repeats,
                is_reg: subset.is_reg,
                width,
                height,
            }),
            Ok(_) | Err(_) => {
                let reason = match size {
                    Err(e) => format!("not a readable image: {e}"),
                    Ok(_) => "the image has no pixels".to_string(),
                };
                if policy == BadImagePolicy::Fail {
                    bail!("{}: {reason}", path.display());
                }
                bad.push(BadImage { path, reason });
            }
        }
    }
    Ok((images, bad))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn png(path: &Path, w: u32, h: u32) {
        image::RgbImage::from_fn(w, h, |x, y| image::Rgb([(x * 7) as u8, (y * 5) as u8, 128])).save(path).unwrap();
    }

    #[test]
    fn reads_the_kohya_layout() {
        let root = tempfile::tempdir().unwrap();
        let dog = root.path().join("10_sks dog");
        let style = root.path().join("3_style");
        std::fs::create_dir_all(&dog).unwrap();
        std::fs::create_dir_all(&style).unwrap();
        std::fs::create_dir_all(root.path().join("notes")).unwrap();
        png(&dog.join("a.png"), 64, 48);
        std::fs::write(dog.join("a.txt"), "sks dog, grass\nsecond line ignored").unwrap();
        png(&dog.join("b.png"), 32, 32);
        png(&style.join("c.png"), 40, 80);
        std::fs::write(style.join("c.caption"), "painting").unwrap();
        std::fs::write(style.join("broken.jpg"), b"this is not a jpeg").unwrap();
        std::fs::write(style.join("readme.md"), "not an image").unwrap();

        let (subsets, ignored) = scan_train_dir(root.path(), ".txt", false).unwrap();
        assert_eq!(subsets.len(), 2);
        assert_eq!((subsets[0].num_repeats, subsets[0].class_tokens.as_str()), (10, "sks dog"));
        assert_eq!((subsets[1].num_repeats, subsets[1].class_tokens.as_str()), (3, "style"));
        assert_eq!(ignored, vec![root.path().join("notes")]);

        let (dogs, bad) = load_subset(&subsets[0], BadImagePolicy::Fail).unwrap();
        assert!(bad.is_empty());
        assert_eq!(dogs.len(), 2);
        assert_eq!((dogs[0].caption.as_str(), dogs[0].width, dogs[0].height), ("sks dog, grass", 64, 48));
        assert_eq!(dogs[1].caption, "sks dog", "no caption file: the class tokens");

        let (styles, bad) = load_subset(&subsets[1], BadImagePolicy::Skip).unwrap();
        assert_eq!(styles.len(), 1);
        assert_eq!(styles[0].caption, "painting", "the .caption fall-back");
        assert_eq!(bad.len(), 1);
        assert!(bad[0].path.ends_with("broken.jpg") && bad[0].reason.contains("not a readable image"), "{bad:?}");
        let err = load_subset(&subsets[1], BadImagePolicy::Fail).unwrap_err().to_string();
        assert!(err.contains("broken.jpg"), "{err}");
    }

    #[test]
    fn wildcards_keep_every_line_of_a_caption() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("2_cat");
        std::fs::create_dir_all(&dir).unwrap();
        png(&dir.join("a.png"), 8, 8);
        std::fs::write(dir.join("a.txt"), "  first {x|y}  \n\n second\n").unwrap();
        let (mut subsets, _) = scan_train_dir(root.path(), ".txt", false).unwrap();
        assert_eq!(load_subset(&subsets[0], BadImagePolicy::Fail).unwrap().0[0].caption, "first {x|y}");
        subsets[0].enable_wildcard = true;
        assert_eq!(load_subset(&subsets[0], BadImagePolicy::Fail).unwrap().0[0].caption, "first {x|y}\nsecond");
    }

    #[test]
    fn a_folder_without_repeat_subfolders_is_a_clear_error() {
        let root = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(root.path().join("images")).unwrap();
        let err = scan_train_dir(root.path(), ".txt", false).unwrap_err().to_string();
        assert!(err.contains("N_name"), "{err}");
        let err = scan_train_dir(&root.path().join("missing"), ".txt", false).unwrap_err().to_string();
        assert!(err.contains("missing"), "{err}");
    }
}
