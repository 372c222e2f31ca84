//! The training set of a run: images from the dataset folders with their buckets, the batches
//! of each epoch (a pure function of the seed and the epoch, so a resumed run sees the same
//! order), and the VAE latents, cached on disk by image content and the settings that change
//! them.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::SeedableRng;

use super::config::TrainConfig;
use crate::data::{images::load_for_bucket, scan_train_dir, BadImage, BadImagePolicy, BucketChoice, BucketManager, ImageEntry, Subset};
use crate::lora_file::sha256_hex;
use crate::models::vae::AutoencoderKL;

/// One image of the training set and where it goes.
#[derive(Clone, Debug)]
pub struct TrainImage {
    pub entry: ImageEntry,
    pub bucket: BucketChoice,
    /// sha256 of the file's bytes (the latent cache key's main part).
    pub content_hash: String,
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
        let mut bad = vec![];
        for s in &mut subsets {
            if s.class_tokens.is_empty() {
                s.class_tokens = cfg.class_tokens.clone();
            }
            let (entries, bad_here) = crate::data::dataset::load_subset(s, policy)?;
            bad.extend(bad_here);
            for entry in entries {
                let bucket = match &manager {
                    Some(m) => m.select(entry.width, entry.height),
                    None => fixed_bucket(entry.width, entry.height, cfg.resolution),
                };
                let bytes = std::fs::read(&entry.path).with_context(|| format!("cannot read {}", entry.path.display()))?;
                images.push(TrainImage { content_hash: sha256_hex(&bytes), entry, bucket });
            }
        }
        let num_train_images = images.iter().filter(|i| !i.entry.is_reg).map(|i| i.entry.num_repeats as usize).sum();
        let num_reg_images = images.iter().filter(|i| i.entry.is_reg).map(|i| i.entry.num_repeats as usize).sum();
        if num_train_images == 0 {
            bail!("train_data_dir {}: no usable images", cfg.train_data_dir.display());
        }
        Ok(Self { images, bad, num_train_images, num_reg_images, subsets })
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
fn fixed_bucket(w: u32, h: u32, reso: u32) -> BucketChoice {
    let scale = (reso as f64 / w as f64).max(reso as f64 / h as f64);
    let resized = (((w as f64 * scale) + 0.5) as u32, ((h as f64 * scale) + 0.5) as u32);
    BucketChoice { bucket: (reso, reso), resized: (resized.0.max(reso), resized.1.max(reso)), aspect_error: 0.0 }
}

/// VAE latents for images, cached in memory and (optionally) on disk under a key made of the
/// image's content hash, its bucket, crop and flip, the VAE's identity and the dtype: change
/// any of them and the cache misses; keep them and any run or job reuses the file.
pub struct LatentCache {
    dir: Option<PathBuf>,
    vae_id: String,
    memory: HashMap<String, Tensor>,
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
        sha256_hex(spec.as_bytes())[..32].to_string()
    }

    /// The latents `(C, h, w)` (unscaled VAE mean × scaling factor) of one image, centre-cropped.
    pub fn latents(&mut self, vae: &AutoencoderKL, img: &TrainImage, flip: bool, device: &Device) -> Result<Tensor> {
        let key = self.key(img, flip);
        if let Some(t) = self.memory.get(&key) {
            self.hits += 1;
            return Ok(t.clone());
        }
        if let Some(dir) = &self.dir {
            let path = dir.join(format!("{key}.safetensors"));
            if path.is_file() {
                if let Ok(map) = candle_core::safetensors::load(&path, device) {
                    if let Some(t) = map.get("latents") {
                        self.hits += 1;
                        self.memory.insert(key, t.clone());
                        return Ok(t.clone());
                    }
                }
                // An unreadable cache file is recomputed and rewritten.
            }
        }
        self.misses += 1;
        let latents = encode_image(vae, &img.entry.path, &img.bucket, false, flip, None, device)?;
        if let Some(dir) = &self.dir {
            let path = dir.join(format!("{key}.safetensors"));
            let tmp = dir.join(format!("{key}.part"));
            candle_core::safetensors::save(&HashMap::from([("latents".to_string(), latents.clone())]), &tmp)?;
            std::fs::rename(&tmp, &path).with_context(|| format!("cannot write {}", path.display()))?;
        }
        self.memory.insert(key, latents.clone());
        Ok(latents)
    }
}

/// Loads, crops and encodes one image: `(C, h, w)` f32 latents scaled for the UNet.
pub fn encode_image(
    vae: &AutoencoderKL,
    path: &Path,
    bucket: &BucketChoice,
    random_crop: bool,
    flip: bool,
    rng: Option<&mut StdRng>,
    device: &Device,
) -> Result<Tensor> {
    let mut fallback = StdRng::seed_from_u64(0);
    let rng = rng.unwrap_or(&mut fallback);
    // `load_for_bucket` flips at random; decide here and flip explicitly instead.
    let pixels = load_for_bucket(path, bucket, random_crop, false, rng, device)?;
    let pixels = if flip { pixels.flip(&[2])? } else { pixels };
    let z = vae.encode(&pixels.unsqueeze(0)?.to_dtype(vae_dtype(vae))?)?;
    Ok((z.to_dtype(DType::F32)? * vae.scaling_factor())?.squeeze(0)?)
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
