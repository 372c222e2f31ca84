//! Where a run starts from other files, as sd-scripts does it:
//!
//! - `base_weights` (+ `base_weights_multiplier`): LoRA files merged into the frozen model before
//!   training, with the same merge as `loft lora merge` ([`StableDiffusion::apply_networks_with`]);
//!   the new network trains on top of it and is saved without it.
//! - `network_weights`: an earlier network file of the same algorithm loaded into the adapters
//!   before the first step (sd-scripts' `network.load_weights`: layers the file does not cover
//!   start fresh). Without `dim_from_weights` the network is built with the configured ranks and
//!   every file tensor must have the shape that network has, as torch's `load_state_dict`
//!   requires; with it, dim/alpha (and conv dim/alpha) are taken from the file.

use std::collections::HashMap;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};

use super::config::TrainConfig;
use crate::lora_file::{FileAlgo, LoraFile, MultiplierRule};
use crate::models::pipeline::StableDiffusion;
use crate::networks::{build_adapter, NetworkAlgo};

/// Adapter tensors by kohya name (the name the network writes), then by file key.
pub type AdapterState = HashMap<String, HashMap<String, Tensor>>;

/// Merges the `base_weights` files into the frozen model, in order, each at its multiplier (1.0
/// where `base_weights_multiplier` has none, as sd-scripts). Returns a line for the log.
pub fn merge_base_weights(model: &mut StableDiffusion, cfg: &TrainConfig) -> Result<Option<String>> {
    if cfg.base_weights.is_empty() {
        return Ok(None);
    }
    let mut lines = vec![];
    for (i, path) in cfg.base_weights.iter().enumerate() {
        let multiplier = cfg.base_weights_multiplier.get(i).copied().unwrap_or(1.0);
        let file = LoraFile::load(path).with_context(|| format!("base_weights {}", path.display()))?;
        let unmatched = model
            .merge_networks(&[(&file, multiplier)], MultiplierRule::Lycoris)
            .with_context(|| format!("base_weights {}", path.display()))?;
        let mut line = format!("merged {} ({} modules) at {multiplier}", path.display(), file.modules.len() - unmatched.len());
        if let Some(first) = unmatched.first() {
            line += &format!(", {} modules match no layer (first: {first})", unmatched.len());
        }
        lines.push(line);
    }
    Ok(Some(format!("base_weights: {} into the base model", lines.join("; "))))
}

/// Whether a module saved as `file` can be loaded into a network of `algo`: the same algorithm,
/// or — kohya LoRA, LoCon, LyCORIS LoCon and DyLoRA store the same `lora_down`/`lora_up`/`alpha`
/// tensors — any of the LoRA family into any other; norm modules go with any algorithm.
fn loads_into(file: FileAlgo, algo: NetworkAlgo) -> bool {
    let lora_family = |a: FileAlgo| matches!(a, FileAlgo::Lora | FileAlgo::Locon | FileAlgo::LycorisLocon | FileAlgo::Dylora);
    file == FileAlgo::Norm
        || file == FileAlgo::written_by(algo, false)
        || file == FileAlgo::written_by(algo, true)
        || (lora_family(file) && lora_family(FileAlgo::written_by(algo, false)))
}

/// The file `network_weights` names, loaded.
pub fn load_network_weights(cfg: &TrainConfig) -> Result<Option<LoraFile>> {
    if cfg.network_weights.as_os_str().is_empty() {
        return Ok(None);
    }
    let file = LoraFile::load(&cfg.network_weights).with_context(|| format!("network_weights {}", cfg.network_weights.display()))?;
    if let Some(m) = file.modules.iter().find(|m| !loads_into(m.algo, cfg.network_algo)) {
        bail!(
            "network_weights {}: module {} is {}, but network_algo is {}: continue a file with the algorithm it was trained with",
            cfg.network_weights.display(),
            m.name,
            m.algo.name(),
            cfg.network_algo.name()
        );
    }
    Ok(Some(file))
}

/// `dim_from_weights`: the config with network_dim/alpha and conv_dim/alpha read from the
/// file (the first 1×1/linear module and the first k×k module that have a rank), as
/// sd-scripts' `create_network_from_weights` reads them.
pub fn with_dims_from(cfg: &TrainConfig, file: &LoraFile) -> Result<TrainConfig> {
    let mut out = cfg.clone();
    let spatial = |m: &&crate::lora_file::LoadedModule| {
        m.tensors.values().any(|t| t.dims().len() == 4 && t.dims()[2] * t.dims()[3] > 1)
    };
    let linear = file.modules.iter().filter(|m| m.rank.is_some()).find(|m| !spatial(m));
    let conv = file.modules.iter().filter(|m| m.rank.is_some()).find(spatial);
    match linear.or(conv) {
        Some(m) => {
            out.network_dim = m.rank.unwrap_or(out.network_dim);
            out.network_alpha = m.alpha.unwrap_or(out.network_dim as f64);
        }
        None => bail!(
            "dim_from_weights: {} has no module with a rank (its algorithm has none); turn dim_from_weights off",
            cfg.network_weights.display()
        ),
    }
    if let Some(m) = conv {
        out.conv_dim = m.rank;
        out.conv_alpha = m.alpha.or(m.rank.map(|r| r as f64));
    }
    Ok(out)
}

/// The adapters' starting tensors from `file`, keyed by the names the network uses, on
/// `device` in f32. Unless `dims_from_file`, every tensor must have the shape the configured
/// network gives it (the error names the module, the tensor and both shapes). Also returns the
/// file's modules that match no layer of the model.
pub fn adapter_state(
    cfg: &TrainConfig,
    model: &StableDiffusion,
    file: &LoraFile,
    device: &Device,
    dims_from_file: bool,
) -> Result<(AdapterState, Vec<String>)> {
    let layers: HashMap<String, (String, std::sync::Arc<crate::models::Layer>)> = model
        .layer_names()
        .into_iter()
        .flat_map(|(names, _, layer)| {
            let written = names[0].clone();
            names.into_iter().map(move |n| (n, (written.clone(), layer.clone())))
        })
        .collect();
    let options = cfg.network_options();
    let mut state = AdapterState::new();
    let mut unmatched = vec![];
    for m in &file.modules {
        let Some((name, layer)) = layers.get(&m.name) else {
            unmatched.push(m.name.clone());
            continue;
        };
        let mut tensors = HashMap::new();
        for (key, t) in &m.tensors {
            tensors.insert(key.clone(), t.to_dtype(DType::F32)?.to_device(device)?);
        }
        if !dims_from_file && m.algo != FileAlgo::Norm {
            let fresh = build_adapter(cfg.network_algo, &options, &layer.base(), name)
                .with_context(|| format!("network_weights: module {}", m.name))?;
            for (key, want) in fresh.state_tensors()? {
                if let Some(got) = tensors.get(&key) {
                    if got.dims() != want.dims() {
                        bail!(
                            "network_weights {}: module {} `{key}` is {:?} in the file but {:?} in this network \
                             (network_dim {}, conv_dim {:?}); set the ranks to the file's or turn on dim_from_weights",
                            cfg.network_weights.display(),
                            m.name,
                            got.dims(),
                            want.dims(),
                            cfg.network_dim,
                            cfg.conv_dim
                        );
                    }
                }
            }
        }
        state.insert(name.clone(), tensors);
    }
    if state.is_empty() {
        bail!(
            "network_weights {}: none of its {} modules matches a layer of this {} model (first: {})",
            cfg.network_weights.display(),
            file.modules.len(),
            model.family.name(),
            file.modules.first().map(|m| m.name.as_str()).unwrap_or("none")
        );
    }
    Ok((state, unmatched))
}
