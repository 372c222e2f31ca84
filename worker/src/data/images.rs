//! Loading one training image into its bucket: resize so it covers the bucket, crop (centre or
//! random), optional horizontal flip, then a CHW f32 tensor in [-1, 1] as the VAE expects.

use std::path::Path;

use anyhow::{Context, Result};
use candle_core::{Device, Tensor};
use image::imageops::FilterType;
use rand::Rng;

use super::BucketChoice;

/// Where the crop starts inside the resized image: centred, or random when `random_crop`.
fn crop_origin(resized: (u32, u32), bucket: (u32, u32), random_crop: bool, rng: &mut impl Rng) -> (u32, u32) {
    let (spare_x, spare_y) = (resized.0 - bucket.0, resized.1 - bucket.1);
    if random_crop {
        (rng.random_range(0..=spare_x), rng.random_range(0..=spare_y))
    } else {
        (spare_x / 2, spare_y / 2)
    }
}

/// Decodes `path` and fits it to `choice`. Errors name the file.
pub fn load_for_bucket(
    path: &Path,
    choice: &BucketChoice,
    random_crop: bool,
    flip: bool,
    rng: &mut impl Rng,
    device: &Device,
) -> Result<Tensor> {
    let img = image::ImageReader::open(path)
        .with_context(|| format!("cannot open the image {}", path.display()))?
        .with_guessed_format()
        .with_context(|| format!("cannot read the image {}", path.display()))?
        .decode()
        .with_context(|| format!("{} is not a readable image", path.display()))?
        .to_rgb8();
    let (w, h) = img.dimensions();
    let resized = choice.resized;
    let bucket = choice.bucket;
    let img = if (w, h) == resized {
        img
    } else {
        // Area-like filtering when shrinking (as sd-scripts' INTER_AREA), Lanczos when enlarging.
        let filter = if resized.0 < w { FilterType::Triangle } else { FilterType::Lanczos3 };
        image::imageops::resize(&img, resized.0, resized.1, filter)
    };
    let (x0, y0) = crop_origin(resized, bucket, random_crop, rng);
    let mut img = image::imageops::crop_imm(&img, x0, y0, bucket.0, bucket.1).to_image();
    if flip && rng.random_bool(0.5) {
        image::imageops::flip_horizontal_in_place(&mut img);
    }
    let (bw, bh) = (bucket.0 as usize, bucket.1 as usize);
    let data: Vec<f32> = img.into_raw().into_iter().map(|v| v as f32 / 127.5 - 1.0).collect();
    // HWC → CHW
    let tensor = Tensor::from_vec(data, (bh, bw, 3), device)?.permute((2, 0, 1))?.contiguous()?;
    Ok(tensor)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::BucketManager;
    use rand::rngs::StdRng;
    use rand::SeedableRng;

    #[test]
    fn fits_the_bucket_in_range_and_centred() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("wide.png");
        // Left half black, right half white, 300×100.
        image::RgbImage::from_fn(300, 100, |x, _| if x < 150 { image::Rgb([0, 0, 0]) } else { image::Rgb([255, 255, 255]) })
            .save(&path)
            .unwrap();
        let buckets = BucketManager::new((128, 128), 64, 256, 64, false);
        let choice = buckets.select(300, 100);
        let mut rng = StdRng::seed_from_u64(1);
        let t = load_for_bucket(&path, &choice, false, false, &mut rng, &Device::Cpu).unwrap();
        assert_eq!(t.dims(), &[3, choice.bucket.1 as usize, choice.bucket.0 as usize]);
        let values: Vec<f32> = t.flatten_all().unwrap().to_vec1().unwrap();
        assert!(values.iter().all(|v| (-1.0..=1.0).contains(v)));
        let row: Vec<f32> = t.get(0).unwrap().get(0).unwrap().to_vec1().unwrap();
        assert!(row[0] < -0.9 && row[row.len() - 1] > 0.9, "centre crop keeps both halves");
        // Flip mirrors: with flip on, some seed flips it.
        let flipped = (0..8).any(|seed| {
            let mut rng = StdRng::seed_from_u64(seed);
            let t = load_for_bucket(&path, &choice, false, true, &mut rng, &Device::Cpu).unwrap();
            let row: Vec<f32> = t.get(0).unwrap().get(0).unwrap().to_vec1().unwrap();
            row[0] > 0.9
        });
        assert!(flipped);
    }

    #[test]
    fn a_corrupt_file_names_itself() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bad.png");
        std::fs::write(&path, b"\x89PNG garbage").unwrap();
        let choice = BucketChoice { bucket: (64, 64), resized: (64, 64), aspect_error: 0.0 };
        let err = load_for_bucket(&path, &choice, false, false, &mut StdRng::seed_from_u64(0), &Device::Cpu).unwrap_err();
        assert!(format!("{err:#}").contains("bad.png"), "{err:#}");
    }
}
