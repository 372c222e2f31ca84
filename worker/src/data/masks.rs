//! Loss masks (sd-scripts' `masked_loss` and `alpha_mask`): a grey value per pixel in [0, 1]
//! that weights the loss, 1 = learn this part of the image, 0 = ignore it.
//!
//! A mask comes from one of two places, as in sd-scripts:
//! - a mask image in `conditioning_data_dir` with the training image's file name (any image
//!   extension; its red channel, so a greyscale file reads as itself), the same size as the
//!   training image;
//! - the training image's own alpha channel (`alpha_mask`); an image without one is all 1.
//!
//! The mask is resized and cropped to the bucket exactly as its image is (see
//! [`super::images::load_fitted`]), flipped with it, then brought to the latent grid by area
//! averaging (torch's `interpolate(mode="area")`, which sd-scripts' `apply_masked_loss` uses).

use std::path::{Path, PathBuf};

use super::dataset::IMAGE_EXTENSIONS;

/// Where an image's loss mask comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MaskSource {
    /// The image's alpha channel (all 1 when it has none).
    Alpha,
    /// A mask image file (its red channel).
    File(PathBuf),
}

/// torch's `interpolate(mode="area")` of a row-major `(h, w)` grid to `(out_h, out_w)`: each
/// output cell is the mean of the input cells from `floor(i·in/out)` to `ceil((i+1)·in/out)`
/// (adaptive average pooling), so for an exact factor it is the mean of each block.
pub fn area_resize(values: &[f32], (h, w): (usize, usize), (out_h, out_w): (usize, usize)) -> Vec<f32> {
    assert_eq!(values.len(), h * w, "area_resize: {} values for a {h}×{w} grid", values.len());
    let span = |i: usize, input: usize, output: usize| (i * input / output, ((i + 1) * input).div_ceil(output));
    let mut out = Vec::with_capacity(out_h * out_w);
    for oy in 0..out_h {
        let (y0, y1) = span(oy, h, out_h);
        for ox in 0..out_w {
            let (x0, x1) = span(ox, w, out_w);
            let mut sum = 0.0f64;
            for y in y0..y1 {
                sum += values[y * w + x0..y * w + x1].iter().map(|&v| v as f64).sum::<f64>();
            }
            out.push((sum / ((y1 - y0) * (x1 - x0)) as f64) as f32);
        }
    }
    out
}

/// A mask must have its image's size (as sd-scripts requires); the error names both files.
pub fn check_size(mask: &Path, mask_size: (u32, u32), image: &Path, image_size: (u32, u32)) -> anyhow::Result<()> {
    if mask_size != image_size {
        anyhow::bail!(
            "the mask {} is {}×{} but its image {} is {}×{}: a mask must have its image's size",
            mask.display(),
            mask_size.0,
            mask_size.1,
            image.display(),
            image_size.0,
            image_size.1
        );
    }
    Ok(())
}

/// Mirrors a row-major `(h, w)` grid left to right, as a horizontal flip of its image does.
pub fn flip_horizontal(values: &mut [f32], w: usize) {
    for row in values.chunks_mut(w) {
        row.reverse();
    }
}

/// The mask file of a training image: `conditioning_dir/<subset folder>/<stem>.<ext>` when the
/// mask folder mirrors the dataset's `N_name` folders, else `conditioning_dir/<stem>.<ext>`.
/// Extensions are tried in [`IMAGE_EXTENSIONS`] order, lower then upper case.
pub fn find_mask_file(conditioning_dir: &Path, image: &Path) -> Option<PathBuf> {
    let stem = image.file_stem()?;
    let subset_folder = image.parent().and_then(|p| p.file_name());
    let mut folders = vec![];
    if let Some(sub) = subset_folder {
        folders.push(conditioning_dir.join(sub));
    }
    folders.push(conditioning_dir.to_path_buf());
    for folder in folders {
        for ext in IMAGE_EXTENSIONS {
            for ext in [ext.to_string(), ext.to_ascii_uppercase()] {
                let mut name = stem.to_os_string();
                name.push(".");
                name.push(&ext);
                let candidate = folder.join(name);
                if candidate.is_file() {
                    return Some(candidate);
                }
            }
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn area_resize_averages_blocks_and_overlapping_spans() {
        // 2×4 → 1×2: the mean of each 2×2 block.
        let v = [0.0, 1.0, 1.0, 1.0, 0.0, 1.0, 0.0, 0.0];
        assert_eq!(area_resize(&v, (2, 4), (1, 2)), vec![0.5, 0.5]);
        // 1×3 → 1×2: spans [0, 2) and [1, 3) overlap in the middle cell (adaptive pooling).
        assert_eq!(area_resize(&[0.0, 3.0, 6.0], (1, 3), (1, 2)), vec![1.5, 4.5]);
        // The identity size is the identity.
        assert_eq!(area_resize(&v, (2, 4), (2, 4)), v.to_vec());
    }

    #[test]
    fn finds_masks_in_a_mirrored_or_flat_folder() {
        let root = tempfile::tempdir().unwrap();
        let data = root.path().join("data/10_dog");
        let masks = root.path().join("masks");
        std::fs::create_dir_all(&data).unwrap();
        std::fs::create_dir_all(masks.join("10_dog")).unwrap();
        std::fs::write(masks.join("10_dog/a.png"), b"").unwrap();
        std::fs::write(masks.join("b.JPG"), b"").unwrap();
        assert_eq!(find_mask_file(&masks, &data.join("a.jpg")), Some(masks.join("10_dog/a.png")));
        assert_eq!(find_mask_file(&masks, &data.join("b.png")), Some(masks.join("b.JPG")));
        assert_eq!(find_mask_file(&masks, &data.join("c.png")), None);
    }

    #[test]
    fn flips_rows() {
        let mut v = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0];
        flip_horizontal(&mut v, 3);
        assert_eq!(v, [3.0, 2.0, 1.0, 6.0, 5.0, 4.0]);
    }
}
