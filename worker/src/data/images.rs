//! Loading one training image into its bucket: resize so it covers the bucket, crop (centre,
//! random, or around a face), colour augmentation, then a CHW f32 tensor in [-1, 1] as the VAE
//! expects; its loss mask cut at the same place. The caller flips both.

use std::path::Path;

use anyhow::{Context, Result};
use candle_core::{Device, Tensor};
use image::imageops::FilterType;
use rand::Rng;

use super::masks::MaskSource;
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

/// Decodes an image file; errors name the file.
fn decode(path: &Path) -> Result<image::DynamicImage> {
    image::ImageReader::open(path)
        .with_context(|| format!("cannot open the image {}", path.display()))?
        .with_guessed_format()
        .with_context(|| format!("cannot read the image {}", path.display()))?
        .decode()
        .with_context(|| format!("{} is not a readable image", path.display()))
}

/// Resizes `img` so it covers the bucket (`choice.resized`), then cuts the bucket out at `origin`.
fn fit<P: image::Pixel<Subpixel = u8> + 'static>(
    img: image::ImageBuffer<P, Vec<u8>>,
    choice: &BucketChoice,
    origin: (u32, u32),
) -> image::ImageBuffer<P, Vec<u8>> {
    let (w, h) = img.dimensions();
    let resized = choice.resized;
    let img = if (w, h) == resized {
        img
    } else {
        // Area-like filtering when shrinking (as sd-scripts' INTER_AREA), Lanczos when enlarging.
        let filter = if resized.0 < w { FilterType::Triangle } else { FilterType::Lanczos3 };
        image::imageops::resize(&img, resized.0, resized.1, filter)
    };
    image::imageops::crop_imm(&img, origin.0, origin.1, choice.bucket.0, choice.bucket.1).to_image()
}

/// RGB bytes (HWC) → a CHW f32 tensor in [-1, 1].
fn to_tensor(img: image::RgbImage, device: &Device) -> Result<Tensor> {
    let (bw, bh) = (img.width() as usize, img.height() as usize);
    let data: Vec<f32> = img.into_raw().into_iter().map(|v| v as f32 / 127.5 - 1.0).collect();
    Ok(Tensor::from_vec(data, (bh, bw, 3), device)?.permute((2, 0, 1))?.contiguous()?)
}

/// The per-step augmentations of sd-scripts' subsets that change the pixels.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Augment {
    /// Cut the bucket at a random place instead of the centre.
    pub random_crop: bool,
    /// [`super::augment::color_aug`].
    pub color_aug: bool,
    /// `face_crop_aug_range` (min, max), for images whose file names carry a face box.
    pub face_crop: Option<(f64, f64)>,
}

/// Decodes `path`, cuts it to `choice` (centre, random, or around the face in its file name
/// with `aug.face_crop`), applies `aug.color_aug` to the colours, and cuts the loss mask (when
/// asked) at the same place. The image as a CHW tensor in [-1, 1]; the mask as row-major
/// `(bucket h, bucket w)` values in [0, 1]. Random draws come in sd-scripts' order: the crop,
/// then the colour.
pub fn load_fitted(
    path: &Path,
    choice: &BucketChoice,
    aug: &Augment,
    mask: Option<&MaskSource>,
    rng: &mut impl Rng,
    device: &Device,
) -> Result<(Tensor, Option<Vec<f32>>)> {
    let decoded = decode(path)?;
    let size = (decoded.width(), decoded.height());
    let face = aug.face_crop.and_then(|range| Some((range, super::augment::face_box(path)?)));
    let face_plan = face.and_then(|(range, face)| super::augment::face_crop(size, face, range, choice.bucket, aug.random_crop, rng));
    let (choice, origin) = match face_plan {
        Some((plan, origin)) => (plan, origin),
        None => (*choice, crop_origin(choice.resized, choice.bucket, aug.random_crop, rng)),
    };
    let grey: Option<image::GrayImage> = match mask {
        None => None,
        Some(MaskSource::Alpha) if decoded.color().has_alpha() => {
            let rgba = decoded.to_rgba8();
            Some(image::GrayImage::from_fn(rgba.width(), rgba.height(), |x, y| image::Luma([rgba.get_pixel(x, y)[3]])))
        }
        Some(MaskSource::Alpha) => None,
        Some(MaskSource::File(mask_path)) => {
            let rgb = decode(mask_path)?.to_rgb8();
            super::masks::check_size(mask_path, rgb.dimensions(), path, size)?;
            // The red channel, as sd-scripts' apply_masked_loss reads a conditioning image.
            Some(image::GrayImage::from_fn(rgb.width(), rgb.height(), |x, y| image::Luma([rgb.get_pixel(x, y)[0]])))
        }
    };
    let mut rgb = fit(decoded.to_rgb8(), &choice, origin);
    if aug.color_aug {
        super::augment::color_aug(&mut rgb, rng);
    }
    let pixels = to_tensor(rgb, device)?;
    let values = mask.map(|_| match grey {
        Some(g) => fit(g, &choice, origin).into_raw().into_iter().map(|v| v as f32 / 255.0).collect(),
        None => vec![1.0; (choice.bucket.0 * choice.bucket.1) as usize],
    });
    Ok((pixels, values))
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
        let (t, none) = load_fitted(&path, &choice, &Augment::default(), None, &mut rng, &Device::Cpu).unwrap();
        assert!(none.is_none(), "no mask asked for");
        assert_eq!(t.dims(), &[3, choice.bucket.1 as usize, choice.bucket.0 as usize]);
        let values: Vec<f32> = t.flatten_all().unwrap().to_vec1().unwrap();
        assert!(values.iter().all(|v| (-1.0..=1.0).contains(v)));
        let row: Vec<f32> = t.get(0).unwrap().get(0).unwrap().to_vec1().unwrap();
        assert!(row[0] < -0.9 && row[row.len() - 1] > 0.9, "centre crop keeps both halves");
    }

    #[test]
    fn the_mask_is_cut_where_its_image_is() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("stripes.png");
        // 96×32, opaque and white on every third column, transparent and black elsewhere:
        // any misalignment between the image's crop and the mask's shows.
        image::RgbaImage::from_fn(96, 32, |x, _| if x % 3 == 0 { image::Rgba([255, 255, 255, 255]) } else { image::Rgba([0, 0, 0, 0]) })
            .save(&path)
            .unwrap();
        let choice = BucketChoice { bucket: (32, 32), resized: (96, 32), aspect_error: 0.0 };
        for (seed, random_crop) in [(0, false), (1, true), (2, true), (3, true)] {
            let mut rng = StdRng::seed_from_u64(seed);
            let aug = Augment { random_crop, ..Augment::default() };
            let (pixels, mask) = load_fitted(&path, &choice, &aug, Some(&MaskSource::Alpha), &mut rng, &Device::Cpu).unwrap();
            let mask = mask.unwrap();
            let red: Vec<f32> = pixels.get(0).unwrap().flatten_all().unwrap().to_vec1().unwrap();
            assert_eq!(mask.len(), 32 * 32);
            for (r, m) in red.iter().zip(&mask) {
                assert_eq!((*r > 0.0), (*m > 0.5), "seed {seed}: pixel and mask from the same place");
            }
        }
        // An image without alpha is all 1; a mask file of another size is refused naming both.
        let opaque = dir.path().join("opaque.png");
        image::RgbImage::new(32, 32).save(&opaque).unwrap();
        let full = BucketChoice { bucket: (32, 32), resized: (32, 32), aspect_error: 0.0 };
        let load = |mask: &MaskSource| load_fitted(&opaque, &full, &Augment::default(), Some(mask), &mut StdRng::seed_from_u64(0), &Device::Cpu);
        assert!(load(&MaskSource::Alpha).unwrap().1.unwrap().iter().all(|&m| m == 1.0));
        let small = dir.path().join("small.png");
        image::GrayImage::new(16, 16).save(&small).unwrap();
        let err = load(&MaskSource::File(small)).unwrap_err();
        let err = format!("{err:#}");
        assert!(err.contains("small.png") && err.contains("opaque.png") && err.contains("16×16"), "{err}");
    }

    #[test]
    fn a_corrupt_file_names_itself() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bad.png");
        std::fs::write(&path, b"\x89PNG garbage").unwrap();
        let choice = BucketChoice { bucket: (64, 64), resized: (64, 64), aspect_error: 0.0 };
        let err = load_fitted(&path, &choice, &Augment::default(), None, &mut StdRng::seed_from_u64(0), &Device::Cpu).unwrap_err();
        assert!(format!("{err:#}").contains("bad.png"), "{err:#}");
    }
}

/// Whether an encoded image's last structure is there (JPEG's EOI marker, possibly followed by
/// zero padding; PNG's IEND chunk; WebP's full RIFF length). The image crate decodes a cut
/// JPEG "at best effort" without an error (zune-jpeg's strict mode is off), so a truncated
/// file is only caught this way. Other formats: true.
pub fn is_complete(format: image::ImageFormat, bytes: &[u8]) -> bool {
    match format {
        image::ImageFormat::Jpeg => {
            let end = bytes.iter().rposition(|b| *b != 0).map(|i| i + 1).unwrap_or(0);
            end >= 2 && bytes[end - 2..end] == [0xFF, 0xD9]
        }
        image::ImageFormat::Png => bytes.len() >= 12 && bytes[bytes.len() - 12..bytes.len() - 4] == [0, 0, 0, 0, b'I', b'E', b'N', b'D'],
        // RIFF's size field counts every byte after the first 8.
        image::ImageFormat::WebP => bytes.len() >= 12 && u32::from_le_bytes([bytes[4], bytes[5], bytes[6], bytes[7]]) as usize + 8 <= bytes.len(),
        _ => true,
    }
}

/// Whether an image file looks trainable without decoding it (the pre-flight runs over whole
/// datasets before every queueing): its header names an image format and its size, and its end
/// marker is there (see [`is_complete`]). Reads the first bytes and the last few KiB only; damage
/// inside a file with a sound header and end shows at training (uploads are decoded in full).
pub fn check_readable(path: &Path) -> Result<(u32, u32), String> {
    use std::io::{Read, Seek, SeekFrom};
    let mut file = std::fs::File::open(path).map_err(|e| format!("cannot be read: {e}"))?;
    let len = file.metadata().map_err(|e| format!("cannot be read: {e}"))?.len();
    let mut head = vec![0u8; len.min(64) as usize];
    file.read_exact(&mut head).map_err(|e| format!("cannot be read: {e}"))?;
    let format = image::guess_format(&head).map_err(|_| "is not an image".to_string())?;
    // The end marker, read from the tail (JPEG writers may pad it with zeros); WebP's RIFF
    // length is checked against the file's length.
    let complete = if format == image::ImageFormat::WebP {
        head.len() >= 12 && u32::from_le_bytes([head[4], head[5], head[6], head[7]]) as u64 + 8 <= len
    } else {
        let tail_len = len.min(4096);
        let mut tail = vec![0u8; tail_len as usize];
        file.seek(SeekFrom::End(-(tail_len as i64))).and_then(|_| file.read_exact(&mut tail)).map_err(|e| format!("cannot be read: {e}"))?;
        is_complete(format, &tail)
    };
    if !complete {
        return Err("is truncated or damaged (its end marker is missing)".into());
    }
    image::ImageReader::open(path)
        .map_err(|e| format!("cannot be read: {e}"))?
        .with_guessed_format()
        .map_err(|e| format!("cannot be read: {e}"))?
        .into_dimensions()
        .map_err(|e| format!("its header cannot be read: {e}"))
}
