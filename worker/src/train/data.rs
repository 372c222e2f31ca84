//! The training set of a run: images from the dataset folders with their buckets, the batches
//! of each epoch (a pure function of the seed and the epoch, so a resumed run sees the same
//! order), and the VAE latents, cached on disk by image content and the settings that change
//! them.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::SeedableRng;

use super::config::TrainConfig;
use crate::data::masks::{area_resize, check_size, find_mask_file, flip_horizontal};
use crate::data::py_random::PyRandom;
use crate::data::images::{load_fitted, Augment};
use crate::data::{scan_train_dir, MaskSource, BadImage, BadImagePolicy, BucketChoice, BucketManager, ImageEntry, Subset};
use crate::lora_file::sha256_hex;
use crate::models::vae::AutoencoderKL;

/// One image of the training set and where it goes.
#[derive(Clone, Debug)]
pub struct TrainImage {
    pub entry: ImageEntry,
    pub bucket: BucketChoice,
    /// sha256 of the file's bytes (the latent cache key's main part).
    pub content_hash: String,
    /// Where its loss mask comes from (`None` = the whole image counts).
    pub mask: Option<MaskSource>,
    /// What identifies the mask in the latent cache key: `alpha`, or the mask file's sha256.
    pub mask_key: String,
}

/// One element of an epoch: an image index and whether it is flipped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Item {
    pub image: usize,
    pub flip: bool,
}

/// The whole training set.
pub struct TrainSet {
    pub images: Vec<TrainImage>,
    /// Images held out by `validation_split` (never trained on).
    pub validation: Vec<TrainImage>,
    /// Images that could not be used (reported, then skipped).
    pub bad: Vec<BadImage>,
    pub num_train_images: usize,
    pub num_reg_images: usize,
    pub subsets: Vec<Subset>,
}

/// A seed for one purpose at one point of the run, so every random choice is reproducible
/// from (seed, epoch, index) alone and a resumed run needs no RNG state.
pub fn derived_seed(seed: u64, purpose: u64, epoch: u64, index: u64) -> u64 {
    // SplitMix64 over the combined inputs.
    let mut z = seed ^ purpose.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ epoch.wrapping_mul(0xBF58_476D_1CE4_E5B9) ^ index.wrapping_mul(0x94D0_49BB_1331_11EB);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

pub const SEED_ORDER: u64 = 1;
pub const SEED_STEP: u64 = 2;

impl TrainSet {
    /// Scans the train (and regularisation) folders, reads image sizes, assigns buckets.
    pub fn load(cfg: &TrainConfig) -> Result<Self> {
        let policy = if cfg.skip_bad_images { BadImagePolicy::Skip } else { BadImagePolicy::Fail };
        let mut subsets = vec![];
        let (train, ignored) = scan_train_dir(&cfg.train_data_dir, &cfg.caption_extension, false)?;
        if train.is_empty() {
            bail!(
                "train_data_dir {}: no N_name subfolders (e.g. 10_mydog) with images{}",
                cfg.train_data_dir.display(),
                if ignored.is_empty() { String::new() } else { format!("; ignored folders without a repeat count: {ignored:?}") }
            );
        }
        subsets.extend(train);
        if !cfg.reg_data_dir.as_os_str().is_empty() {
            subsets.extend(scan_train_dir(&cfg.reg_data_dir, &cfg.caption_extension, true)?.0);
        }
        let manager = if cfg.enable_bucket {
            Some(BucketManager::new((cfg.resolution, cfg.resolution), cfg.min_bucket_reso, cfg.max_bucket_reso, cfg.bucket_reso_steps, cfg.bucket_no_upscale))
        } else {
            None
        };
        let mut images = vec![];
        let mut validation = vec![];
        let mut bad = vec![];
        let mut missing_masks = vec![];
        for s in &mut subsets {
            if s.class_tokens.is_empty() {
                s.class_tokens = cfg.class_tokens.clone();
            }
            s.enable_wildcard = cfg.enable_wildcard;
            let (entries, bad_here) = crate::data::dataset::load_subset(s, policy)?;
            bad.extend(bad_here);
            let (entries, held_out) = split_validation(entries, s.is_reg, cfg);
            let tagged = entries.into_iter().map(|e| (e, false)).chain(held_out.into_iter().map(|e| (e, true)));
            for (entry, held_out) in tagged {
                let bucket = match &manager {
                    Some(m) => m.select(entry.width, entry.height),
                    None => fixed_bucket(entry.width, entry.height, cfg.resolution),
                };
                let bytes = std::fs::read(&entry.path).with_context(|| format!("cannot read {}", entry.path.display()))?;
                let (mask, mask_key) = match mask_source(cfg, &entry) {
                    Ok(Some(MaskSource::File(path))) => {
                        let bytes = std::fs::read(&path).with_context(|| format!("cannot read the mask {}", path.display()))?;
                        let size = image::ImageReader::new(std::io::Cursor::new(&bytes))
                            .with_guessed_format()
                            .map_err(anyhow::Error::from)
                            .and_then(|r| Ok(r.into_dimensions()?))
                            .with_context(|| format!("the mask {} is not a readable image", path.display()))?;
                        check_size(&path, size, &entry.path, (entry.width, entry.height))?;
                        (Some(MaskSource::File(path)), sha256_hex(&bytes))
                    }
                    Ok(Some(MaskSource::Alpha)) => (Some(MaskSource::Alpha), "alpha".to_string()),
                    Ok(None) => (None, String::new()),
                    Err(()) => {
                        missing_masks.push(entry.path.display().to_string());
                        (None, String::new())
                    }
                };
                let image = TrainImage { content_hash: sha256_hex(&bytes), entry, bucket, mask, mask_key };
                if held_out {
                    validation.push(image);
                } else {
                    images.push(image);
                }
            }
        }
        if let Some(first) = missing_masks.first() {
            bail!(
                "conditioning_data_dir {}: no mask image for {} training image(s) (first: {first}); masked_loss needs one per image, with the same file name, in the folder or in a subfolder named like the image's",
                cfg.conditioning_data_dir.display(),
                missing_masks.len()
            );
        }
        let num_train_images = images.iter().filter(|i| !i.entry.is_reg).map(|i| i.entry.num_repeats as usize).sum();
        let num_reg_images = images.iter().filter(|i| i.entry.is_reg).map(|i| i.entry.num_repeats as usize).sum();
        if num_train_images == 0 {
            bail!("train_data_dir {}: no usable images", cfg.train_data_dir.display());
        }
        Ok(Self { images, validation, bad, num_train_images, num_reg_images, subsets })
    }

    /// The epoch's batches: every training image `num_repeats` times (regularisation images
    /// cycled up to the same count, as sd-scripts), grouped by bucket, shuffled within the
    /// bucket, cut into batches, the batches shuffled. With `flip_aug` each item is flipped
    /// with probability ½.
    pub fn epoch_batches(&self, cfg: &TrainConfig, epoch: u64) -> Vec<Vec<Item>> {
        let mut rng = StdRng::seed_from_u64(derived_seed(cfg.seed, SEED_ORDER, epoch, 0));
        let mut items: Vec<usize> = vec![];
        for (i, img) in self.images.iter().enumerate() {
            if !img.entry.is_reg {
                items.extend(std::iter::repeat_n(i, img.entry.num_repeats as usize));
            }
        }
        let reg: Vec<usize> = self
            .images
            .iter()
            .enumerate()
            .filter(|(_, img)| img.entry.is_reg)
            .flat_map(|(i, img)| std::iter::repeat_n(i, img.entry.num_repeats as usize))
            .collect();
        if !reg.is_empty() {
            let n = items.len();
            items.extend(reg.iter().cycle().take(n));
        }
        let mut by_bucket: BTreeMap<(u32, u32), Vec<usize>> = BTreeMap::new();
        for i in items {
            by_bucket.entry(self.images[i].bucket.bucket).or_default().push(i);
        }
        let mut batches = vec![];
        for (_, mut members) in by_bucket {
            members.shuffle(&mut rng);
            for chunk in members.chunks(cfg.train_batch_size) {
                batches.push(chunk.iter().map(|&i| Item { image: i, flip: false }).collect::<Vec<_>>());
            }
        }
        batches.shuffle(&mut rng);
        if cfg.flip_aug {
            for b in &mut batches {
                for item in b {
                    item.flip = rand::Rng::random_bool(&mut rng, 0.5);
                }
            }
        }
        batches
    }

    /// sd-scripts' `ss_tag_frequency`: per subset folder, how often each tag appears.
    pub fn tag_frequency(&self, separator: &str) -> BTreeMap<String, BTreeMap<String, u64>> {
        let mut out: BTreeMap<String, BTreeMap<String, u64>> = BTreeMap::new();
        for img in &self.images {
            let folder = img.entry.path.parent().and_then(|p| p.file_name()).map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
            let tags = out.entry(folder).or_default();
            for t in img.entry.caption.split(separator).map(str::trim).filter(|t| !t.is_empty()) {
                *tags.entry(t.to_string()).or_default() += 1;
            }
        }
        out
    }
}

/// Without buckets every image is resized to cover `reso × reso` and centre-cropped.
pub(crate) fn fixed_bucket(w: u32, h: u32, reso: u32) -> BucketChoice {
    let scale = (reso as f64 / w as f64).max(reso as f64 / h as f64);
    let resized = (((w as f64 * scale) + 0.5) as u32, ((h as f64 * scale) + 0.5) as u32);
    BucketChoice { bucket: (reso, reso), resized: (resized.0.max(reso), resized.1.max(reso)), aspect_error: 0.0 }
}

/// sd-scripts' `split_train_val` on one subset's images (in file-name order): shuffled by
/// Python's `random` seeded with `seed`, the first `ceil(n·(1 − split))` trained on, the rest
/// held out. (sd-scripts takes the last `round(n·split)` for validation, which can overlap the
/// training part by one image; here the two parts never share an image.)
pub fn split_for_validation<T>(mut items: Vec<T>, split: f64, seed: u64) -> (Vec<T>, Vec<T>) {
    if split <= 0.0 {
        return (items, vec![]);
    }
    PyRandom::new(seed).shuffle(&mut items);
    let train = (items.len() as f64 * (1.0 - split)).ceil() as usize;
    let held_out = items.split_off(train.min(items.len()));
    (items, held_out)
}

/// Regularisation subsets are never split.
fn split_validation(entries: Vec<ImageEntry>, is_reg: bool, cfg: &TrainConfig) -> (Vec<ImageEntry>, Vec<ImageEntry>) {
    if is_reg {
        return (entries, vec![]);
    }
    split_for_validation(entries, cfg.validation_split, validation_seed(cfg))
}

/// The seed of the validation split and noise: `validation_seed`, or `seed` when it is 0.
pub fn validation_seed(cfg: &TrainConfig) -> u64 {
    if cfg.validation_seed == 0 {
        cfg.seed
    } else {
        cfg.validation_seed
    }
}

/// An image's loss mask, as sd-scripts chooses it: the mask file from `conditioning_data_dir`
/// with `masked_loss` (regularisation images have none), else the alpha channel with
/// `alpha_mask`. `Err` = a training image without its mask file.
fn mask_source(cfg: &TrainConfig, entry: &ImageEntry) -> Result<Option<MaskSource>, ()> {
    if cfg.masked_loss && !cfg.conditioning_data_dir.as_os_str().is_empty() {
        if entry.is_reg {
            return Ok(None);
        }
        return find_mask_file(&cfg.conditioning_data_dir, &entry.path).map(|p| Some(MaskSource::File(p))).ok_or(());
    }
    Ok(cfg.alpha_mask.then_some(MaskSource::Alpha))
}

/// One image's VAE latents `(C, h, w)` and, when it has a mask, the mask on the latent grid
/// `(1, h, w)`.
#[derive(Clone, Debug)]
pub struct Encoded {
    pub latents: Tensor,
    pub mask: Option<Tensor>,
}

/// VAE latents for images, cached in memory and (optionally) on disk under a key made of the
/// image's content hash, its bucket, crop and flip, the VAE's identity and the dtype: change
/// any of them and the cache misses; keep them and any run or job reuses the file.
pub struct LatentCache {
    dir: Option<PathBuf>,
    vae_id: String,
    memory: HashMap<String, Encoded>,
    pub hits: usize,
    pub misses: usize,
}

impl LatentCache {
    pub fn new(dir: Option<PathBuf>, vae_id: String) -> Result<Self> {
        if let Some(d) = &dir {
            std::fs::create_dir_all(d).with_context(|| format!("cannot create the latent cache {}", d.display()))?;
        }
        Ok(Self { dir, vae_id, memory: HashMap::new(), hits: 0, misses: 0 })
    }

    fn key(&self, img: &TrainImage, flip: bool) -> String {
        let b = &img.bucket;
        let spec = format!(
            "{}|{}x{}|{}x{}|flip={flip}|vae={}|v1",
            img.content_hash, b.bucket.0, b.bucket.1, b.resized.0, b.resized.1, self.vae_id
        );
        // Images without a mask keep the keys they had before masks existed.
        let spec = if img.mask_key.is_empty() { spec } else { format!("{spec}|mask={}", img.mask_key) };
        sha256_hex(spec.as_bytes())[..32].to_string()
    }

    /// The latents `(C, h, w)` (unscaled VAE mean × scaling factor) of one image, centre-cropped,
    /// with its mask.
    pub fn latents(&mut self, vae: &AutoencoderKL, img: &TrainImage, flip: bool, device: &Device) -> Result<Encoded> {
        let key = self.key(img, flip);
        if let Some(e) = self.memory.get(&key) {
            self.hits += 1;
            return Ok(e.clone());
        }
        if let Some(dir) = &self.dir {
            let path = dir.join(format!("{key}.safetensors"));
            if path.is_file() {
                if let Ok(mut map) = candle_core::safetensors::load(&path, device) {
                    let mask = map.remove("mask");
                    if let Some(latents) = map.remove("latents") {
                        if mask.is_some() == img.mask.is_some() {
                            let e = Encoded { latents, mask };
                            self.hits += 1;
                            self.memory.insert(key, e.clone());
                            return Ok(e);
                        }
                    }
                }
                // An unreadable cache file is recomputed and rewritten.
            }
        }
        self.misses += 1;
        let encoded = encode_image(vae, img, &Augment::default(), flip, None, device)?;
        if let Some(dir) = &self.dir {
            let path = dir.join(format!("{key}.safetensors"));
            let tmp = dir.join(format!("{key}.part"));
            let mut tensors = HashMap::from([("latents".to_string(), encoded.latents.clone())]);
            if let Some(m) = &encoded.mask {
                tensors.insert("mask".to_string(), m.clone());
            }
            candle_core::safetensors::save(&tensors, &tmp)?;
            std::fs::rename(&tmp, &path).with_context(|| format!("cannot write {}", path.display()))?;
        }
        self.memory.insert(key, encoded.clone());
        Ok(encoded)
    }
}

/// Loads, crops (and augments) and encodes one image: `(C, h, w)` f32 latents scaled for the
/// UNet, and its mask (cut, flipped and area-averaged onto the latent grid) when it has one.
pub fn encode_image(vae: &AutoencoderKL, img: &TrainImage, aug: &Augment, flip: bool, rng: Option<&mut StdRng>, device: &Device) -> Result<Encoded> {
    let mut fallback = StdRng::seed_from_u64(0);
    let rng = rng.unwrap_or(&mut fallback);
    let (pixels, mut mask_values) = load_fitted(&img.entry.path, &img.bucket, aug, img.mask.as_ref(), rng, device)?;
    let pixels = if flip { pixels.flip(&[2])? } else { pixels };
    let z = vae.encode(&pixels.unsqueeze(0)?.to_dtype(vae_dtype(vae))?)?;
    let latents = vae.to_model_latents(&z.to_dtype(DType::F32)?)?.squeeze(0)?;
    let mask = match mask_values.as_mut() {
        Some(values) => {
            let (bw, bh) = (img.bucket.bucket.0 as usize, img.bucket.bucket.1 as usize);
            if flip {
                flip_horizontal(values, bw);
            }
            let (_, lh, lw) = latents.dims3()?;
            Some(Tensor::from_vec(area_resize(values, (bh, bw), (lh, lw)), (1, lh, lw), device)?)
        }
        None => None,
    };
    Ok(Encoded { latents, mask })
}

fn vae_dtype(vae: &AutoencoderKL) -> DType {
    use crate::models::ModelLayers;
    vae.layers().first().map(|l| l.base().weight.dtype()).unwrap_or(DType::F32)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn derived_seeds_differ_and_repeat() {
        assert_eq!(derived_seed(1, 2, 3, 4), derived_seed(1, 2, 3, 4));
        assert_ne!(derived_seed(1, 2, 3, 4), derived_seed(1, 2, 3, 5));
        assert_ne!(derived_seed(1, 2, 3, 4), derived_seed(1, 2, 4, 4));
    }
}
