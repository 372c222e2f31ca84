//! A Loft configuration as a kohya sd-scripts run: the `--config_file` TOML for
//! `train_network.py` (SD 1.x/2.x), `sdxl_train_network.py` or `flux_train_network.py`
//! (Flux.1 dev/schnell), built from the registry's `export` names, so a user can take a job to
//! sd-scripts (or compare the two).
//!
//! The configuration is validated and resolved exactly as for training, and only *active*
//! fields (shown, not greyed) are exported. Values sd-scripts must not receive are left out
//! (empty text and paths, and the zeros that mean "unset" in Loft but something else in
//! sd-scripts); `network_algo` becomes `network_module` + `algo=`; `attention` becomes its
//! flag; `sample_prompts` goes to a prompts file the TOML names. sd-scripts reads repeats and
//! class tokens from `N_name` folder names, so those two Loft defaults are reported, not
//! exported. The TOML groups keys under the registry's sections; sd-scripts flattens one level.

use toml::{Table, Value as Toml};

use crate::jobs::config::validated_active;
use std::path::PathBuf;

use anyhow::{bail, Context};
use clap::Args;

use std::path::Path;

use loft_worker::models::{synthetic, ModelFamily};
use loft_worker::train::network::{lycoris_preset_toml, planned_modules};
use loft_worker::train::TrainConfig;

use crate::registry::{Config, FieldError, Kind, Registry};

/// What an export produced.
#[derive(Debug, Clone)]
pub struct SdScriptsConfig {
    /// `train_network.py`, `sdxl_train_network.py` or `flux_train_network.py`.
    pub script: &'static str,
    /// The `--config_file` TOML.
    pub toml: String,
    /// The sample prompts file's text, when there are prompts (the TOML names the file).
    pub sample_prompts: Option<String>,
    /// Settings sd-scripts has no place for, each with why.
    pub not_exported: Vec<(String, String)>,
    /// A LyCORIS preset file (name, TOML) that `network_args` names with `preset=`, where
    /// LyCORIS's built-in preset of that name would build other modules than Loft trains.
    pub preset_file: Option<(String, String)>,
    /// The dataset config (`dataset.toml`) that `dataset_config` names: `[general]` with the
    /// dataset options, one `[[datasets]]` with a `[[datasets.subsets]]` per `N_class` folder.
    pub dataset_file: Option<(String, String)>,
}

/// A registry value as TOML: booleans, text, and numbers typed by the field's kind.
fn plain_toml(kind: &Kind, value: &serde_json::Value) -> Option<Toml> {
    Some(match value {
        serde_json::Value::Bool(b) => Toml::Boolean(*b),
        serde_json::Value::String(s) => Toml::String(s.clone()),
        serde_json::Value::Number(n) if matches!(kind, Kind::Integer) => Toml::Integer(n.as_i64().unwrap_or_default()),
        serde_json::Value::Number(n) => Toml::Float(n.as_f64().unwrap_or_default()),
        _ => return None,
    })
}

/// The dataset config file, when the training folder can be read here: the dataset options in
/// `[general]` (where sd-scripts' ConfigSanitizer takes them all), and each `N_class` folder
/// of the training (and regularisation) folder as a DreamBooth subset with its repeats and
/// class tokens. `None`, with the reason in `not_exported`, when the folder cannot be read.
fn dataset_file(registry: &Registry, active: &Config, not_exported: &mut Vec<(String, String)>) -> Option<(String, String)> {
    use loft_worker::data::dataset::scan_train_dir;
    let text = |key: &str| active.get(key).and_then(|v| v.as_str()).unwrap_or("").trim().to_string();
    let caption_extension = text("caption_extension");
    let ext = if caption_extension.is_empty() { ".caption".to_string() } else { caption_extension };
    let mut subsets = vec![];
    for (key, is_reg) in [("train_data_dir", false), ("reg_data_dir", true)] {
        let dir = text(key);
        if dir.is_empty() {
            continue;
        }
        match scan_train_dir(Path::new(&dir), &ext, is_reg) {
            Ok((found, _)) if !found.is_empty() => subsets.extend(found),
            Ok(_) => {
                not_exported.push(("dataset.toml".into(), format!("{key} {dir} has no N_name folders here; sd-scripts reads {key} from the main file")));
                return None;
            }
            Err(e) => {
                not_exported.push(("dataset.toml".into(), format!("{key} {dir} cannot be read here ({e}); sd-scripts reads {key} from the main file")));
                return None;
            }
        }
    }
    if subsets.is_empty() {
        return None;
    }
    let mut general = Table::new();
    for field in registry.fields() {
        let Some(name) = field.export.as_ref().and_then(|e| e.dataset.as_deref()) else { continue };
        let Some(value) = active.get(&field.key) else { continue };
        // Per subset (from the folder names), or subset-only in sd-scripts.
        if matches!(name, "num_repeats" | "class_tokens" | "alpha_mask") || value.as_str() == Some("") || (value.as_f64() == Some(0.0) && ZERO_IS_UNSET.contains(&field.key.as_str())) {
            continue;
        }
        if name == "resize_interpolation" && value.as_str() == Some("auto") {
            continue;
        }
        if let Some(v) = plain_toml(&field.kind, value) {
            general.insert(name.to_string(), v);
        }
    }
    let alpha_mask = active.get("alpha_mask").and_then(|v| v.as_bool()) == Some(true);
    let subsets: Vec<Toml> = subsets
        .into_iter()
        .map(|s| {
            let mut t = Table::new();
            t.insert("image_dir".into(), Toml::String(s.image_dir.display().to_string()));
            t.insert("num_repeats".into(), Toml::Integer(s.num_repeats as i64));
            if !s.class_tokens.is_empty() {
                t.insert("class_tokens".into(), Toml::String(s.class_tokens));
            }
            if s.is_reg {
                t.insert("is_reg".into(), Toml::Boolean(true));
            }
            if alpha_mask {
                t.insert("alpha_mask".into(), Toml::Boolean(true));
            }
            Toml::Table(t)
        })
        .collect();
    let mut dataset = Table::new();
    dataset.insert("subsets".into(), Toml::Array(subsets));
    let mut doc = Table::new();
    doc.insert("general".into(), Toml::Table(general));
    doc.insert("datasets".into(), Toml::Array(vec![Toml::Table(dataset)]));
    let body = toml::to_string(&doc).ok()?;
    Some(("dataset.toml".into(), format!("# sd-scripts dataset config exported by Loft (the main file names it with dataset_config).\n\n{body}")))
}

/// Loft zeros meaning "not set" where sd-scripts reads 0 as a value (a frozen learning rate,
/// every-0-epochs, a fixed seed of 0, …).
const ZERO_IS_UNSET: &[&str] = &[
    "max_train_epochs",
    "save_every_n_epochs",
    "save_every_n_steps",
    "save_last_n_epochs",
    "save_last_n_steps",
    "save_last_n_epochs_state",
    "save_last_n_steps_state",
    "sample_every_n_epochs",
    "sample_every_n_steps",
    "validate_every_n_epochs",
    "validate_every_n_steps",
    "max_validation_steps",
    "unet_lr",
    "text_encoder_lr",
    "loraplus_lr_ratio",
    "loraplus_unet_lr_ratio",
    "loraplus_text_encoder_lr_ratio",
    "seed",
    "validation_seed",
];

/// The LyCORIS `algo=` name of a Loft algorithm, or `None` for kohya's own `networks.lora`.
fn lycoris_algo(algo: &str) -> Option<&'static str> {
    Some(match algo {
        "lora" | "locon" => return None,
        "lycoris_locon" => "locon",
        "loha" => "loha",
        "ia3" => "ia3",
        "lokr" => "lokr",
        "dylora" => "dylora",
        "diag_oft" => "diag-oft",
        "boft" => "boft",
        "glora" => "glora",
        "glora_ex" => "glora-ex",
        "abba" => "abba",
        "full" => "full",
        _ => return None,
    })
}

/// Whether a `model_family` value is Flux.1 (trained with `flux_train_network.py`).
fn is_flux_family(family: &str) -> bool {
    matches!(family, "flux_dev" | "flux_schnell")
}

/// The `clip_l`, `t5xxl` and `ae` paths sd-scripts' Flux trainer needs, for a Loft Flux model:
/// the parts of the diffusers FluxPipeline folder, which is the model path itself or, for a
/// BFL transformer file (`flux1-dev.safetensors`), the folder named like it beside it.
fn flux_parts(model: &str) -> [(&'static str, String); 3] {
    let path = Path::new(model);
    let is_file = !path.is_dir() && path.extension().and_then(|e| e.to_str()).is_some_and(|e| matches!(e.to_ascii_lowercase().as_str(), "safetensors" | "sft" | "ckpt"));
    let folder = if is_file { path.with_extension("") } else { path.to_path_buf() };
    let part = |name: &str| folder.join(name).to_string_lossy().into_owned();
    [("clip_l", part("text_encoder")), ("t5xxl", part("text_encoder_2")), ("ae", part("vae"))]
}

/// The export's header line that says which Flux.1 model it is for (sd-scripts reads dev or
/// schnell from the checkpoint; import reads the family back from this line).
const FAMILY_COMMENT: &str = "# model_family: ";

/// A value as sd-scripts' `network_args` / `optimizer_args` text (`True`, `0.5`, `full`).
fn arg_text(v: &serde_json::Value) -> String {
    match v {
        serde_json::Value::Bool(true) => "True".into(),
        serde_json::Value::Bool(false) => "False".into(),
        serde_json::Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// The start of the export's comment line that names the Loft preset the preset file was
/// written from: import reads the name back from it.
const PRESET_COMMENT: &str = "# LyCORIS builds the layers Loft trains";

/// The Loft preset named on an export's [`PRESET_COMMENT`] line, if the text has one.
fn preset_named_in_comment(text: &str) -> Option<String> {
    let line = text.lines().find(|l| l.starts_with(PRESET_COMMENT))?;
    let (_, rest) = line.split_once("(preset \"")?;
    rest.split_once('"').map(|(name, _)| name.to_string())
}

/// The file name of the LyCORIS preset an export writes.
pub const LYCORIS_PRESET_FILE: &str = "lycoris_preset.toml";

/// The LyCORIS preset file that builds, on sd-scripts' model of `family` at its standard size,
/// the modules Loft trains for this choice (see [`lycoris_preset_toml`]).
fn lycoris_preset_file(active: &Config, family: &str) -> Result<(String, String), String> {
    let family = match family {
        "sdxl" => ModelFamily::Sdxl,
        "sd2" => ModelFamily::Sd2,
        _ => ModelFamily::Sd15,
    };
    let train = TrainConfig::read_fields(active).map_err(|e| e.message)?;
    let (unet, encoders) = synthetic::configs(family).map_err(|e| e.to_string())?;
    let (planned, skipped) = planned_modules(
        family,
        &unet,
        &encoders,
        train.network_algo,
        &train.network_options(),
        &train.lycoris_preset,
        train.trains_unet(),
        train.trains_text_encoder(),
    )
    .map_err(|e| format!("cannot list the layers to train: {e:#}"))?;
    if planned.is_empty() {
        return Err(format!("preset {:?} adapts no layer of a {} model with {}", train.lycoris_preset, family.name(), train.network_algo.name()));
    }
    let mut comment = format!(
        "LyCORIS preset written by Loft: the {} layers Loft trains with {} and preset {:?} on {}\n(sd-scripts' {} model at its standard size). Pass it as network_args preset=FILE.",
        planned.len(),
        train.network_algo.name(),
        train.lycoris_preset,
        family.name(),
        if family == ModelFamily::Sdxl { "SDXL" } else { "SD" },
    );
    if !skipped.is_empty() {
        comment += &format!("\nLeft out, as in Loft ({}):", skipped.len());
        for (name, why) in &skipped {
            comment += &format!("\n  {name}: {why}");
        }
    }
    Ok((LYCORIS_PRESET_FILE.to_string(), lycoris_preset_toml(&planned, &comment)))
}

/// Exports `config`; `prompts_file` is the path the TOML gives for the sample prompts (the
/// LyCORIS preset file, when there is one, is named as its sibling).
pub fn export(registry: &Registry, config: &Config, prompts_file: &str) -> Result<SdScriptsConfig, Vec<FieldError>> {
    let active = validated_active(registry, config)?;
    let text = |key: &str| active.get(key).and_then(|v| v.as_str()).unwrap_or("").to_string();

    let mut sections: Vec<(String, Table)> = vec![];
    let mut put = |section: &str, key: &str, value: Toml| {
        match sections.iter_mut().find(|(s, _)| s == section) {
            Some((_, t)) => t.insert(key.to_string(), value),
            None => {
                let mut t = Table::new();
                t.insert(key.to_string(), value);
                sections.push((section.to_string(), t));
                None
            }
        };
    };
    let mut network_args: Vec<String> = vec![];
    // The user's own optimizer_args come first; registry fields fill in keys not given there.
    let mut optimizer_args: Vec<String> = text("optimizer_args").split_whitespace().map(str::to_string).collect();
    let mut not_exported = vec![];
    let mut sample_prompts = None;

    if text("output_dir").is_empty() {
        not_exported.push(("output_dir".to_string(), "empty means the job's own folder in Loft; sd-scripts needs one: add output_dir".to_string()));
    }
    let algo = text("network_algo");
    let family = text("model_family");
    let flux = is_flux_family(&family);
    match lycoris_algo(&algo) {
        Some(name) => {
            put("network", "network_module", Toml::String("lycoris.kohya".into()));
            network_args.push(format!("algo={name}"));
        }
        None if flux => put("network", "network_module", Toml::String("networks.lora_flux".into())),
        None => put("network", "network_module", Toml::String("networks.lora".into())),
    }
    if flux {
        // sd-scripts' Flux trainer takes the text encoders and the autoencoder as their own
        // files; Loft reads them from the model's diffusers folder (Flux's `vae` is `ae`).
        let model = text("pretrained_model_name_or_path");
        for (key, path) in flux_parts(&model) {
            // The fields, where set, name the files themselves (`vae` is Flux's `ae`).
            let own = if key == "ae" { text("vae") } else { text(key) };
            let path = if own.is_empty() { path } else { own };
            put("model", key, Toml::String(path));
        }
    }
    if family == "sd2" {
        put("model", "v2", Toml::Boolean(true));
    }
    match text("attention").as_str() {
        "sdpa" => put("training", "sdpa", Toml::Boolean(true)),
        "xformers" => put("training", "xformers", Toml::Boolean(true)),
        "mem_eff_attn" => put("training", "mem_eff_attn", Toml::Boolean(true)),
        _ => {}
    }

    // The dataset as sd-scripts' dataset config; the main file then names it instead of the
    // folders (sd-scripts ignores train_data_dir / reg_data_dir beside a dataset_config).
    let dataset_file = dataset_file(registry, &active, &mut not_exported);
    for field in registry.fields() {
        let Some(export) = &field.export else { continue };
        let Some(value) = active.get(&field.key) else { continue };
        let key = field.key.as_str();
        if dataset_file.is_some() && matches!(key, "train_data_dir" | "reg_data_dir") {
            continue;
        }
        // Flux: the VAE is exported as `ae`, and clip_l / t5xxl, with the parts (above).
        if flux && matches!(key, "vae" | "clip_l" | "t5xxl") {
            continue;
        }
        // kohya's networks.lora_flux options; LyCORIS has no equivalent.
        if flux && lycoris_algo(&algo).is_some() && matches!(key, "train_blocks" | "train_t5xxl") {
            if value != &field.default {
                not_exported.push((key.to_string(), format!("a networks.lora_flux option; lycoris.kohya ({algo}) has none, so sd-scripts would adapt the default layers")));
            }
            continue;
        }
        let section = field.section.as_str();
        let is_zero = value.as_f64() == Some(0.0);
        if value.as_str() == Some("") || (is_zero && ZERO_IS_UNSET.contains(&key)) {
            continue;
        }
        if let Some(name) = &export.network_arg {
            network_args.push(format!("{name}={}", arg_text(value)));
            continue;
        }
        if let Some(name) = &export.optimizer_arg {
            if !optimizer_args.iter().any(|a| a.split_once('=').is_some_and(|(k, _)| k == name)) {
                optimizer_args.push(format!("{name}={}", arg_text(value)));
            }
            continue;
        }
        let name = match (&export.arg, &export.dataset) {
            (Some(arg), _) => arg.as_str(),
            (None, Some(d)) if d == "batch_size" => "train_batch_size",
            (None, Some(d)) if d == "num_repeats" || d == "class_tokens" => {
                if value != &field.default {
                    not_exported.push((key.to_string(), "sd-scripts takes repeats and class tokens from N_name folder names".to_string()));
                }
                continue;
            }
            (None, Some(d)) => d.as_str(),
            (None, None) => continue,
        };
        let toml_value = match (key, value) {
            ("optimizer_args", _) => continue,
            // Loft's "auto" is sd-scripts' unset (its own default per resize).
            ("resize_interpolation", v) if v.as_str() == Some("auto") => continue,
            // Loft's "auto" is sd-scripts' unset (TensorBoard when logging_dir is given).
            ("log_with", v) if v.as_str() == Some("auto") => continue,
            // Loft's "auto" follows the device; sd-scripts has no such value.
            ("mixed_precision", v) if v.as_str() == Some("auto") => {
                not_exported.push((key.to_string(), "\"auto\" follows the device in Loft; sd-scripts takes fp16/bf16 from this key or accelerate's config: set mixed_precision to bf16 (or fp16) to export it".to_string()));
                continue;
            }
            // Lists in sd-scripts (nargs="*"), read as the engine reads them (one path per
            // line; numbers separated by commas, a malformed one refused by name).
            ("base_weights" | "base_weights_multiplier", _) => {
                let lists = TrainConfig::read_fields(&active).map_err(|e| vec![FieldError { field: e.field, message: e.message }])?;
                match key {
                    "base_weights" => Toml::Array(lists.base_weights.iter().map(|p| Toml::String(p.display().to_string())).collect()),
                    _ if lists.base_weights.is_empty() => continue,
                    _ => Toml::Array(lists.base_weights_multiplier.into_iter().map(Toml::Float).collect()),
                }
            }
            ("max_token_length", v) if v.as_str() == Some("75") => continue,
            ("max_token_length", v) => Toml::Integer(v.as_str().and_then(|s| s.parse().ok()).unwrap_or(75)),
            ("sample_prompts", v) => {
                sample_prompts = v.as_str().map(|s| format!("{}\n", s.trim_end()));
                Toml::String(prompts_file.to_string())
            }
            (_, v) => match plain_toml(&field.kind, v) {
                Some(t) => t,
                None => continue,
            },
        };
        put(section, name, toml_value);
    }
    let preset_file = match lycoris_algo(&algo) {
        // No Flux layer list: LyCORIS builds its own preset of that name on Flux.
        Some(_) if flux => None,
        Some(_) => {
            let (name, text) = lycoris_preset_file(&active, &family).map_err(|e| vec![FieldError { field: "lycoris_preset".into(), message: e }])?;
            let path = match Path::new(prompts_file).parent().filter(|p| !p.as_os_str().is_empty()) {
                Some(dir) => dir.join(&name).to_string_lossy().into_owned(),
                None => name.clone(),
            };
            network_args.retain(|a| !a.starts_with("preset="));
            network_args.insert(1, format!("preset={path}"));
            Some((name, text))
        }
        None => None,
    };
    if let Some((name, _)) = &dataset_file {
        let path = match Path::new(prompts_file).parent().filter(|p| !p.as_os_str().is_empty()) {
            Some(dir) => dir.join(name).to_string_lossy().into_owned(),
            None => name.clone(),
        };
        put("dataset", "dataset_config", Toml::String(path));
    }
    if !network_args.is_empty() {
        put("network", "network_args", Toml::Array(network_args.into_iter().map(Toml::String).collect()));
    }
    if !optimizer_args.is_empty() {
        put("optimizer", "optimizer_args", Toml::Array(optimizer_args.into_iter().map(Toml::String).collect()));
    }

    let script = match family.as_str() {
        "sdxl" => "sdxl_train_network.py",
        _ if flux => "flux_train_network.py",
        _ => "train_network.py",
    };
    let mut out = format!("# sd-scripts configuration exported by Loft.\n# Run: accelerate launch {script} --config_file THIS_FILE\n");
    if flux {
        out.push_str(&format!("{FAMILY_COMMENT}{family} (sd-scripts tells dev from schnell by the checkpoint)\n"));
        out.push_str("# clip_l, t5xxl and ae name the parts of the diffusers Flux folder Loft reads; sd-scripts loads each from one\n");
        out.push_str("# .safetensors file (BFL/ComfyUI layout): use text_encoder/model.safetensors or clip_l.safetensors, t5xxl_fp16.safetensors\n");
        out.push_str("# and ae.safetensors (the diffusers T5 is split in shards, and its VAE has other key names).\n");
        if lycoris_algo(&algo).is_some() {
            out.push_str(&format!(
                "# LyCORIS builds its own preset \"{}\" on Flux.1 (Loft writes no Flux layer list), so its layers can differ from Loft's.\n",
                text("lycoris_preset")
            ));
        }
    }
    if matches!(algo.as_str(), "glora_ex" | "abba") {
        out.push_str(&format!("# network_algo {algo} needs a LyCORIS build that has algo={}.\n", lycoris_algo(&algo).unwrap_or("")));
    }
    if let Some((name, _)) = &preset_file {
        out.push_str(&format!(
            "{PRESET_COMMENT} (preset \"{}\") from {name} (network_args preset=…), written beside this file: keep them together.\n",
            text("lycoris_preset")
        ));
    }
    for (key, why) in &not_exported {
        out.push_str(&format!("# not exported: {key} ({why})\n"));
    }
    let mut table = Table::new();
    for (name, t) in sections {
        table.insert(name, Toml::Table(t));
    }
    out.push('\n');
    out.push_str(&toml::to_string(&table).map_err(|e| vec![FieldError { field: "config".into(), message: format!("cannot write TOML: {e}") }])?);
    Ok(SdScriptsConfig { script, toml: out, sample_prompts, not_exported, preset_file, dataset_file })
}

/// What an import produced.
#[derive(Debug, Clone)]
pub struct Imported {
    /// The configuration in the registry's keys (only what the file set).
    pub config: Config,
    /// Keys of the file Loft has no place for, each with why.
    pub ignored: Vec<(String, String)>,
}

/// The Loft algorithm of an sd-scripts `network_module` and LyCORIS `algo=`.
fn loft_algo(module: &str, algo: Option<&str>, has_conv_dim: bool) -> Result<&'static str, String> {
    match (module, algo) {
        ("networks.lora", _) => Ok(if has_conv_dim { "locon" } else { "lora" }),
        // Flux has no convolutions: kohya's Flux module is always a plain LoRA.
        ("networks.lora_flux", _) => Ok("lora"),
        ("lycoris.kohya", Some(a)) => match a {
            "lora" | "locon" => Ok("lycoris_locon"),
            "loha" => Ok("loha"),
            "ia3" => Ok("ia3"),
            "lokr" => Ok("lokr"),
            "dylora" => Ok("dylora"),
            "diag-oft" => Ok("diag_oft"),
            "boft" => Ok("boft"),
            "glora" => Ok("glora"),
            "glora-ex" => Ok("glora_ex"),
            "abba" => Ok("abba"),
            "full" => Ok("full"),
            other => Err(format!("network_args: LyCORIS algo={other} has no Loft equivalent")),
        },
        ("lycoris.kohya", None) => Ok("lycoris_locon"),
        (other, _) => Err(format!("network_module {other:?}: Loft trains networks.lora, networks.lora_flux and lycoris.kohya networks")),
    }
}

/// A TOML or `key=value` text value as the field's kind wants it.
fn typed(kind: &Kind, v: &Toml) -> Option<serde_json::Value> {
    let as_text = || match v {
        Toml::String(s) => Some(s.clone()),
        Toml::Integer(i) => Some(i.to_string()),
        Toml::Float(f) => Some(f.to_string()),
        Toml::Boolean(b) => Some(b.to_string()),
        _ => None,
    };
    Some(match kind {
        Kind::Toggle => match v {
            Toml::Boolean(b) => json_bool(*b),
            Toml::String(s) => json_bool(matches!(s.to_ascii_lowercase().as_str(), "true" | "1" | "yes")),
            _ => return None,
        },
        Kind::Integer => serde_json::Value::from(match v {
            Toml::Integer(i) => *i,
            Toml::Float(f) if f.fract() == 0.0 => *f as i64,
            Toml::String(s) => s.trim().parse::<i64>().ok()?,
            _ => return None,
        }),
        Kind::Float => serde_json::Value::from(match v {
            Toml::Integer(i) => *i as f64,
            Toml::Float(f) => *f,
            Toml::String(s) => s.trim().parse::<f64>().ok()?,
            _ => return None,
        }),
        // sd-scripts' list arguments (base_weights, base_weights_multiplier): one item per line
        // in a multi-line field, separated by commas in a text field.
        Kind::Multiline | Kind::Text if matches!(v, Toml::Array(_)) => {
            let Toml::Array(items) = v else { unreachable!() };
            let items: Option<Vec<String>> = items.iter().map(|i| typed(&Kind::Text, i).and_then(|t| t.as_str().map(str::to_string))).collect();
            serde_json::Value::String(items?.join(if *kind == Kind::Multiline { "\n" } else { ", " }))
        }
        _ => serde_json::Value::String(as_text()?),
    })
}

fn json_bool(b: bool) -> serde_json::Value {
    serde_json::Value::Bool(b)
}

/// Reads an sd-scripts `--config_file` TOML (tables are flattened, as sd-scripts does) into the
/// registry's keys. `sample_prompts` is the prompts file's text when the caller could read it;
/// `family` overrides the model family (an sd-scripts file does not say SDXL; Loft's own export
/// names its script in the header). The result is validated; problems name the Loft field.
pub fn import(registry: &Registry, text: &str, sample_prompts: Option<&str>, family: Option<&str>) -> Result<Imported, Vec<FieldError>> {
    let fail = |field: &str, message: String| vec![FieldError { field: field.to_string(), message }];
    let parsed: Table = toml::from_str(text).map_err(|e| fail("config", format!("not valid TOML: {e}")))?;
    let mut flat = Table::new();
    for (k, v) in parsed {
        match v {
            Toml::Table(t) => flat.extend(t),
            other => {
                flat.insert(k, other);
            }
        }
    }
    let mut by_arg = std::collections::HashMap::new();
    let mut by_network_arg = std::collections::HashMap::new();
    let mut by_optimizer_arg = std::collections::HashMap::new();
    for f in registry.fields() {
        let Some(e) = &f.export else { continue };
        if let Some(a) = &e.arg {
            by_arg.insert(a.clone(), f);
        }
        if let Some(d) = &e.dataset {
            by_arg.insert(if d == "batch_size" { "train_batch_size".to_string() } else { d.clone() }, f);
        }
        if let Some(n) = &e.network_arg {
            by_network_arg.insert(n.clone(), f);
        }
        if let Some(o) = &e.optimizer_arg {
            by_optimizer_arg.insert(o.clone(), f);
        }
    }
    let mut config = Config::new();
    let mut ignored = vec![];
    let list = |v: &Toml| -> Vec<(String, String)> {
        let items: Vec<String> = match v {
            Toml::Array(a) => a.iter().filter_map(|x| x.as_str().map(str::to_string)).collect(),
            Toml::String(s) => s.split_whitespace().map(str::to_string).collect(),
            _ => vec![],
        };
        items.iter().map(|i| i.split_once('=').map(|(k, v)| (k.trim().to_string(), v.trim().to_string())).unwrap_or((i.clone(), String::new()))).collect()
    };
    let network_args = flat.get("network_args").map(&list).unwrap_or_default();
    let algo_arg = network_args.iter().find(|(k, _)| k == "algo").map(|(_, v)| v.as_str());
    let module = flat.get("network_module").and_then(|v| v.as_str()).unwrap_or("networks.lora");
    let has_conv = network_args.iter().any(|(k, _)| k == "conv_dim");
    let algo = loft_algo(module, algo_arg, has_conv).map_err(|m| fail("network_algo", m))?;
    config.insert("network_algo".into(), algo.into());
    for (k, v) in &network_args {
        if k == "algo" {
            continue;
        }
        if k == "preset" && v.ends_with(".toml") {
            // A preset file: Loft's own exports name the preset it was written from.
            match preset_named_in_comment(text) {
                Some(name) => {
                    config.insert("lycoris_preset".into(), name.into());
                }
                None => ignored.push((
                    format!("network_args {k}"),
                    format!("{v} is a LyCORIS preset file; Loft does not read its layer list: choose the preset in the Network tab"),
                )),
            }
            continue;
        }
        match by_network_arg.get(k.as_str()) {
            Some(f) => match typed(&f.kind, &Toml::String(v.clone())) {
                Some(val) => {
                    config.insert(f.key.clone(), val);
                }
                None => ignored.push((format!("network_args {k}"), format!("{v:?} is not a {:?}", f.kind))),
            },
            None => ignored.push((format!("network_args {k}"), "not a Loft option".into())),
        }
    }
    let mut optimizer_rest = vec![];
    for (k, v) in flat.get("optimizer_args").map(&list).unwrap_or_default() {
        match by_optimizer_arg.get(k.as_str()).and_then(|f| Some((f, typed(&f.kind, &Toml::String(v.clone()))?))) {
            Some((f, val)) => {
                config.insert(f.key.clone(), val);
            }
            None => optimizer_rest.push(format!("{k}={v}")),
        }
    }
    if !optimizer_rest.is_empty() {
        config.insert("optimizer_args".into(), optimizer_rest.join(" ").into());
    }
    let header_sdxl = text.lines().take(5).any(|l| l.starts_with('#') && l.contains("sdxl_train_network.py"));
    // Loft's Flux exports say which model; a Flux file is recognised by its script, module or
    // Flux-only model keys (dev unless told otherwise).
    let header_family = text.lines().take(5).find_map(|l| l.strip_prefix(FAMILY_COMMENT)).and_then(|r| r.split_whitespace().next()).filter(|f| is_flux_family(f));
    let flux_file = text.lines().take(5).any(|l| l.starts_with('#') && l.contains("flux_train_network.py"))
        || module == "networks.lora_flux"
        || ["t5xxl", "ae", "guidance_scale"].iter().any(|k| flat.contains_key(*k));
    let family = family.map(str::to_string).unwrap_or_else(|| {
        if let Some(f) = header_family {
            f.to_string()
        } else if flux_file {
            "flux_dev".into()
        } else if header_sdxl {
            "sdxl".into()
        } else if flat.get("v2").and_then(|v| v.as_bool()) == Some(true) {
            "sd2".into()
        } else {
            "sd15".into()
        }
    });
    let flux = is_flux_family(&family);
    config.insert("model_family".into(), family.into());
    // What a Loft export derives from the model path (Flux's clip_l, t5xxl and ae).
    let derived = flux_parts(flat.get("pretrained_model_name_or_path").and_then(|v| v.as_str()).unwrap_or(""));
    for (k, v) in &flat {
        match k.as_str() {
            "network_module" | "network_args" | "optimizer_args" | "v2" => continue,
            "clip_l" | "t5xxl" | "ae" if flux => {
                let given = v.as_str().unwrap_or("");
                if derived.iter().any(|(name, path)| name == k && path == given) {
                    continue;
                }
                // Separate files: Loft's clip_l / t5xxl fields, and the autoencoder its VAE option.
                config.insert(if k == "ae" { "vae".into() } else { k.clone() }, given.into());
                continue;
            }
            "sdpa" | "xformers" | "mem_eff_attn" => {
                if v.as_bool() == Some(true) {
                    config.insert("attention".into(), k.as_str().into());
                }
                continue;
            }
            "sample_prompts" => {
                match sample_prompts {
                    Some(p) => {
                        config.insert("sample_prompts".into(), p.trim_end().into());
                    }
                    None => ignored.push((k.clone(), "the prompts file could not be read".into())),
                }
                continue;
            }
            _ => {}
        }
        let Some(f) = by_arg.get(k.as_str()) else {
            ignored.push((k.clone(), "not a Loft option".into()));
            continue;
        };
        match typed(&f.kind, v) {
            Some(val) => {
                config.insert(f.key.clone(), val);
            }
            None => ignored.push((k.clone(), format!("{v} is not a {:?}", f.kind))),
        }
    }
    // sd-scripts' unset is Loft's 0 where Loft's default is something else (max_train_epochs
    // 10, save_every_n_epochs 1): a file without the key means "unset", not Loft's default.
    for key in ZERO_IS_UNSET {
        let Some(f) = registry.field(key) else { continue };
        if !config.contains_key(*key) && f.default.as_f64().is_some_and(|d| d != 0.0) {
            let zero = if matches!(f.kind, Kind::Integer) { serde_json::Value::from(0) } else { serde_json::Value::from(0.0) };
            config.insert(key.to_string(), zero);
        }
    }
    // A required path the file does not give is for the user to fill in, not a problem of the
    // file (e.g. sd-scripts' dataset_config instead of train_data_dir): reported, not refused.
    let mut errors = registry.validate(&config);
    errors.retain(|e| {
        let absent_required = registry.field(&e.field).is_some_and(|f| f.required) && !config.contains_key(&e.field);
        if absent_required {
            ignored.push((e.field.clone(), format!("not in the file: {}", e.message)));
        }
        !absent_required
    });
    if !errors.is_empty() {
        return Err(errors);
    }
    Ok(Imported { config, ignored })
}

#[derive(Args, Debug)]
pub struct ExportArgs {
    /// A TOML file with the registry's keys (as for `loft train`).
    pub config: PathBuf,
    /// Folder to write `sd-scripts.toml` (and `sample_prompts.txt`) into.
    #[arg(long)]
    pub out: PathBuf,
}

/// `loft export-sd-scripts CONFIG --out DIR`.
pub fn export_cli(args: ExportArgs) -> anyhow::Result<()> {
    let registry = Registry::embedded()?;
    let config = crate::train_cli::read_config_file(&args.config)?;
    std::fs::create_dir_all(&args.out).with_context(|| format!("cannot create {}", args.out.display()))?;
    let prompts = args.out.join("sample_prompts.txt");
    let exported = match export(&registry, &config, &prompts.to_string_lossy()) {
        Ok(e) => e,
        Err(errors) => {
            let list: Vec<String> = errors.iter().map(|e| format!("  {}: {}", e.field, e.message)).collect();
            bail!("{} has {} problem(s); nothing was written:\n{}", args.config.display(), errors.len(), list.join("\n"));
        }
    };
    let toml_path = args.out.join("sd-scripts.toml");
    std::fs::write(&toml_path, &exported.toml).with_context(|| format!("cannot write {}", toml_path.display()))?;
    if let Some(text) = &exported.sample_prompts {
        std::fs::write(&prompts, text).with_context(|| format!("cannot write {}", prompts.display()))?;
    }
    if let Some((name, text)) = &exported.preset_file {
        let path = args.out.join(name);
        std::fs::write(&path, text).with_context(|| format!("cannot write {}", path.display()))?;
        println!("wrote {} (the LyCORIS preset network_args names)", path.display());
    }
    if let Some((name, text)) = &exported.dataset_file {
        let path = args.out.join(name);
        std::fs::write(&path, text).with_context(|| format!("cannot write {}", path.display()))?;
        println!("wrote {} (the dataset config dataset_config names)", path.display());
    }
    for (key, why) in &exported.not_exported {
        eprintln!("not exported: {key} ({why})");
    }
    println!("wrote {}", toml_path.display());
    println!("run: accelerate launch {} --config_file {}", exported.script, toml_path.display());
    Ok(())
}

#[derive(Args, Debug)]
pub struct ImportArgs {
    /// An sd-scripts `--config_file` TOML.
    pub file: PathBuf,
    /// Where to write the Loft config (registry keys, for `loft train` or a preset).
    #[arg(long)]
    pub out: PathBuf,
    /// The model family (`sd15`, `sd2`, `sdxl`, `flux_dev`, `flux_schnell`): sd-scripts files do
    /// not say SDXL, nor Flux dev or schnell (a Flux file is read as dev unless Loft wrote it).
    #[arg(long)]
    pub family: Option<String>,
}

/// `loft import-sd-scripts FILE --out CONFIG.toml [--family sdxl]`.
pub fn import_cli(args: ImportArgs) -> anyhow::Result<()> {
    let registry = Registry::embedded()?;
    let text = std::fs::read_to_string(&args.file).with_context(|| format!("cannot read {}", args.file.display()))?;
    // The prompts file, as written or beside the TOML.
    let prompts = toml::from_str::<Table>(&text).ok().and_then(|t| {
        let path = t.get("sample_prompts").or_else(|| t.values().find_map(|v| v.as_table()?.get("sample_prompts")))?.as_str()?.to_string();
        let beside = args.file.parent().map(|d| d.join(&path));
        std::fs::read_to_string(&path).ok().or_else(|| std::fs::read_to_string(beside?).ok())
    });
    let imported = match import(&registry, &text, prompts.as_deref(), args.family.as_deref()) {
        Ok(i) => i,
        Err(errors) => {
            let list: Vec<String> = errors.iter().map(|e| format!("  {}: {}", e.field, e.message)).collect();
            bail!("{} has {} problem(s); nothing was written:\n{}", args.file.display(), errors.len(), list.join("\n"));
        }
    };
    let body = toml::to_string(&imported.config).context("writing the config as TOML")?;
    std::fs::write(&args.out, format!("# Loft config imported from {}\n{body}", args.file.display())).with_context(|| format!("cannot write {}", args.out.display()))?;
    for (key, why) in &imported.ignored {
        eprintln!("not imported: {key} ({why})");
    }
    println!("wrote {} ({} options)", args.out.display(), imported.config.len());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// The argument names of sd-scripts (tests/parity/sd_scripts_args.py).
    fn sd_scripts_args() -> Vec<String> {
        let fixture: serde_json::Value = serde_json::from_str(include_str!("../tests/fixtures/sd-scripts/args.json")).unwrap();
        fixture["args"].as_array().unwrap().iter().map(|a| a.as_str().unwrap().to_string()).collect()
    }

    fn export_of(v: serde_json::Value) -> (SdScriptsConfig, Table) {
        let registry = Registry::embedded().unwrap();
        let mut config = json!({"pretrained_model_name_or_path": "/m/model.safetensors", "train_data_dir": "/d", "output_dir": "/o"});
        for (k, val) in v.as_object().unwrap() {
            config[k] = val.clone();
        }
        let e = export(&registry, config.as_object().unwrap(), "/o/prompts.txt").unwrap_or_else(|e| panic!("{e:?}"));
        // sd-scripts flattens one level of tables.
        let parsed: Table = toml::from_str(&e.toml).unwrap();
        let mut flat = Table::new();
        for (_, t) in parsed {
            for (k, v) in t.as_table().unwrap() {
                assert!(flat.insert(k.clone(), v.clone()).is_none(), "{k} twice");
            }
        }
        (e, flat)
    }

    /// Every algorithm on every family exports only keys sd-scripts' parser knows, with the
    /// right script and network module.
    #[test]
    fn every_algorithm_and_family_uses_only_sd_scripts_arguments() {
        let known = sd_scripts_args();
        let registry = Registry::embedded().unwrap();
        let algos: Vec<String> = registry.field("network_algo").unwrap().choices.iter().map(|c| c.value.clone()).collect();
        assert_eq!(algos.len(), 13);
        for family in ["sd15", "sd2", "sdxl"] {
            for algo in &algos {
                let (e, flat) = export_of(json!({"model_family": family, "network_algo": algo}));
                for k in flat.keys() {
                    assert!(known.contains(k), "{family}/{algo}: {k} is not an sd-scripts argument");
                }
                assert_eq!(e.script, if family == "sdxl" { "sdxl_train_network.py" } else { "train_network.py" });
                assert_eq!(flat.get("v2").and_then(|v| v.as_bool()), (family == "sd2").then_some(true), "{family}");
                let args: Vec<&str> = flat["network_args"].as_array().map(|a| a.iter().map(|v| v.as_str().unwrap()).collect()).unwrap_or_default();
                match algo.as_str() {
                    "lora" | "locon" => {
                        assert_eq!(flat["network_module"].as_str(), Some("networks.lora"));
                        assert!(!args.iter().any(|a| a.starts_with("algo=") || a.starts_with("preset=")), "{args:?}");
                    }
                    other => {
                        assert_eq!(flat["network_module"].as_str(), Some("lycoris.kohya"));
                        assert_eq!(args[0], format!("algo={}", lycoris_algo(other).unwrap()));
                    }
                }
            }
        }
    }

    /// Flux.1 exports: flux_train_network.py with networks.lora_flux (LyCORIS keeps
    /// lycoris.kohya), only sd-scripts arguments, the model's parts as clip_l/t5xxl/ae, the Flux
    /// options and none of the DDPM ones; kohya LoCon is not a Flux choice.
    #[test]
    fn flux_exports_use_the_flux_trainer_and_only_sd_scripts_arguments() {
        let known = sd_scripts_args();
        let registry = Registry::embedded().unwrap();
        let algos: Vec<String> = registry.field("network_algo").unwrap().choices.iter().map(|c| c.value.clone()).filter(|a| a != "locon").collect();
        for family in ["flux_dev", "flux_schnell"] {
            for algo in &algos {
                let (e, flat) = export_of(json!({"model_family": family, "network_algo": algo, "clip_skip": 2, "noise_offset": 0.1}));
                for k in flat.keys() {
                    assert!(known.contains(k), "{family}/{algo}: {k} is not an sd-scripts argument");
                }
                assert_eq!(e.script, "flux_train_network.py");
                assert!(e.toml.contains(&format!("{FAMILY_COMMENT}{family} ")), "{}", e.toml);
                assert_eq!(flat["clip_l"].as_str(), Some("/m/model/text_encoder"), "the folder beside the BFL file");
                assert_eq!(flat["t5xxl"].as_str(), Some("/m/model/text_encoder_2"));
                assert_eq!(flat["ae"].as_str(), Some("/m/model/vae"));
                for k in ["v2", "clip_skip", "noise_offset", "min_snr_gamma", "v_parameterization", "max_token_length", "min_timestep", "vae"] {
                    assert!(!flat.contains_key(k), "{family}/{algo}: {k} exported");
                }
                assert_eq!(flat.contains_key("guidance_scale"), family == "flux_dev", "{family}: guidance only for dev");
                assert_eq!(flat["timestep_sampling"].as_str(), Some("sigma"));
                assert_eq!(flat["t5xxl_max_token_length"].as_integer(), Some(if family == "flux_dev" { 512 } else { 256 }));
                let args: Vec<&str> = flat["network_args"].as_array().map(|a| a.iter().map(|v| v.as_str().unwrap()).collect()).unwrap_or_default();
                match lycoris_algo(algo) {
                    None => {
                        assert_eq!(flat["network_module"].as_str(), Some("networks.lora_flux"));
                        assert!(args.contains(&"train_blocks=all") && args.contains(&"train_t5xxl=False"), "{args:?}");
                    }
                    Some(name) => {
                        assert_eq!(flat["network_module"].as_str(), Some("lycoris.kohya"));
                        assert_eq!(args[0], format!("algo={name}"));
                        assert!(args.contains(&"preset=full") && e.preset_file.is_none(), "LyCORIS's own preset on Flux: {args:?}");
                        assert!(!args.iter().any(|a| a.starts_with("train_blocks=") || a.starts_with("train_t5xxl=")), "{args:?}");
                    }
                }
            }
        }
        // A diffusers folder (a dotted name is not a file), a VAE of the user's own, and LoCon.
        let (_, flat) = export_of(json!({"model_family": "flux_dev", "pretrained_model_name_or_path": "/m/FLUX.1-dev", "vae": "/v/ae"}));
        assert_eq!((flat["clip_l"].as_str(), flat["ae"].as_str()), (Some("/m/FLUX.1-dev/text_encoder"), Some("/v/ae")));
        let mut config = json!({"model_family": "flux_dev", "network_algo": "locon", "pretrained_model_name_or_path": "/m", "train_data_dir": "/d"});
        let errors = export(&registry, config.as_object().unwrap(), "p.txt").unwrap_err();
        assert!(errors.iter().any(|e| e.field == "network_algo"), "{errors:?}");
        // LyCORIS has no train_blocks: a Flux choice it cannot follow is reported.
        config["network_algo"] = json!("lokr");
        config["train_blocks"] = json!("single");
        let e = export(&registry, config.as_object().unwrap(), "p.txt").unwrap();
        assert!(e.not_exported.iter().any(|(k, _)| k == "train_blocks"), "{:?}", e.not_exported);
    }

    /// Import reads a Flux export back (family from the header, lora_flux as LoRA, the derived
    /// clip_l/t5xxl/ae skipped, a separate ae as the VAE), and a foreign Flux file as dev.
    #[test]
    fn import_of_a_flux_export_exports_the_same() {
        let registry = Registry::embedded().unwrap();
        let algos: Vec<String> = registry.field("network_algo").unwrap().choices.iter().map(|c| c.value.clone()).filter(|a| a != "locon").collect();
        for family in ["flux_dev", "flux_schnell"] {
            for algo in &algos {
                let config = json!({
                    "model_family": family, "network_algo": algo, "pretrained_model_name_or_path": "/m/flux1.safetensors", "train_data_dir": "/d",
                    "output_dir": "/o", "network_dim": 12, "guidance_scale": 1.0, "timestep_sampling": "shift", "discrete_flow_shift": 3.1582,
                    "sigmoid_scale": 1.5, "model_prediction_type": "raw", "weighting_scheme": "cosmap", "t5xxl_max_token_length": 128,
                    "apply_t5_attn_mask": true, "vae": "/v/ae.safetensors", "sample_prompts": "a cat", "seed": 7,
                });
                let first = export(&registry, config.as_object().unwrap(), "p.txt").unwrap();
                let back = import(&registry, &first.toml, first.sample_prompts.as_deref(), None).unwrap_or_else(|e| panic!("{family}/{algo}: {e:?}"));
                assert!(back.ignored.is_empty(), "{family}/{algo}: {:?}", back.ignored);
                assert_eq!(back.config["model_family"], family);
                assert_eq!(back.config["network_algo"], algo.as_str());
                assert_eq!(back.config["vae"], "/v/ae.safetensors");
                let second = export(&registry, &back.config, "p.txt").unwrap();
                assert_eq!(first.toml, second.toml, "{family}/{algo}");
            }
        }
        let text = "pretrained_model_name_or_path = \"/m/flux1-dev.safetensors\"\nclip_l = \"/te/clip_l.safetensors\"\nt5xxl = \"/te/t5xxl_fp16.safetensors\"\nae = \"/m/flux1-dev/vae\"\nnetwork_module = \"networks.lora_flux\"\nguidance_scale = 1.0\n";
        let got = import(&registry, text, None, None).unwrap();
        assert_eq!((got.config["model_family"].clone(), got.config["network_algo"].clone()), (json!("flux_dev"), json!("lora")));
        assert!(!got.config.contains_key("vae"), "the folder's own vae/ is no separate VAE");
        // Separate text encoder files become Loft's clip_l / t5xxl fields.
        assert_eq!((got.config["clip_l"].clone(), got.config["t5xxl"].clone()), (json!("/te/clip_l.safetensors"), json!("/te/t5xxl_fp16.safetensors")));
        // And export names them again.
        let mut config = got.config.clone();
        config.insert("train_data_dir".into(), json!("/d"));
        let back = export(&registry, &config, "p.txt").unwrap();
        assert!(back.toml.contains("clip_l = \"/te/clip_l.safetensors\""), "{}", back.toml);
    }

    #[test]
    fn values_sd_scripts_must_not_receive_are_left_out() {
        let (e, flat) = export_of(json!({
            "seed": 0, "max_train_epochs": 0, "unet_lr": 0, "max_token_length": "75", "vae": "",
            "optimizer_type": "AdamW", "optimizer_args": "weight_decay=0.1 betas=0.9,0.99",
            "sample_prompts": "a cat --n dog\na dog", "num_repeats": 4, "attention": "xformers",
        }));
        for k in ["seed", "max_train_epochs", "unet_lr", "max_token_length", "vae", "resize_interpolation", "num_repeats"] {
            assert!(!flat.contains_key(k), "{k} exported: {}", e.toml);
        }
        assert_eq!(flat["xformers"].as_bool(), Some(true));
        assert!(!flat.contains_key("sdpa"));
        // The user's optimizer_args win over the registry's weight_decay.
        let opt: Vec<&str> = flat["optimizer_args"].as_array().unwrap().iter().map(|v| v.as_str().unwrap()).collect();
        assert_eq!(opt.iter().filter(|a| a.starts_with("weight_decay=")).collect::<Vec<_>>(), vec![&"weight_decay=0.1"]);
        assert_eq!(flat["sample_prompts"].as_str(), Some("/o/prompts.txt"));
        assert_eq!(e.sample_prompts.as_deref(), Some("a cat --n dog\na dog\n"));
        // num_repeats lives in folder names; Loft's mixed_precision "auto" has no sd-scripts value.
        // (And the dataset config: the test's /d is not a folder here.)
        assert_eq!(e.not_exported.iter().map(|(k, _)| k.as_str()).collect::<Vec<_>>(), vec!["dataset.toml", "num_repeats", "mixed_precision"], "each is reported");
        assert!(!flat.contains_key("mixed_precision"));
        assert!(e.toml.contains("# not exported: num_repeats"));
        // Values that apply are typed as sd-scripts expects them.
        let (_, flat) = export_of(json!({"max_token_length": "225", "seed": 42, "network_dim": 16, "learning_rate": 0.0002}));
        assert_eq!(flat["max_token_length"].as_integer(), Some(225));
        assert_eq!(flat["seed"].as_integer(), Some(42));
        assert_eq!(flat["network_dim"].as_integer(), Some(16));
        assert_eq!(flat["learning_rate"].as_float(), Some(0.0002));
    }

    /// Import is export's inverse: for every algorithm and family, with non-default values in
    /// each kind of slot (args, network_args, optimizer_args, prompts, attention), importing
    /// the export and exporting again gives the same file.
    #[test]
    fn import_of_an_export_exports_the_same() {
        let registry = Registry::embedded().unwrap();
        let algos: Vec<String> = registry.field("network_algo").unwrap().choices.iter().map(|c| c.value.clone()).collect();
        for family in ["sd15", "sd2", "sdxl"] {
            for algo in &algos {
                let config = json!({
                    "model_family": family, "network_algo": algo, "pretrained_model_name_or_path": "/m", "train_data_dir": "/d",
                    "output_dir": "/o", "network_dim": 12, "rank_dropout": 0.1, "optimizer_type": "Prodigy", "d_coef": 2.0,
                    "optimizer_args": "betas=0.9,0.99", "shuffle_caption": true, "keep_tokens": 2, "max_token_length": "150",
                    "attention": "xformers", "sample_prompts": "a cat --n dog", "sample_every_n_epochs": 2, "seed": 7,
                    "max_train_epochs": if algo == "lora" { 0 } else { 4 }, "save_every_n_epochs": 0,
                });
                let first = export(&registry, config.as_object().unwrap(), "p.txt").unwrap();
                let back = import(&registry, &first.toml, first.sample_prompts.as_deref(), None).unwrap_or_else(|e| panic!("{family}/{algo}: {e:?}"));
                assert!(back.ignored.is_empty(), "{family}/{algo}: {:?}", back.ignored);
                assert_eq!(back.config["model_family"], family);
                let second = export(&registry, &back.config, "p.txt").unwrap();
                assert_eq!(first.toml, second.toml, "{family}/{algo}");
                assert_eq!(first.sample_prompts, second.sample_prompts);
            }
        }
    }

    /// A hand-written kohya file: sections flattened, unknown keys reported, bad values named.
    #[test]
    fn import_reads_a_kohya_file() {
        let registry = Registry::embedded().unwrap();
        let text = r#"
            pretrained_model_name_or_path = "/models/v1-5.safetensors"
            v2 = false
            [net]
            network_module = "networks.lora"
            network_dim = 32
            network_alpha = 16
            network_args = ["conv_dim=8", "conv_alpha=4", "module_dropout=0.1"]
            [opt]
            optimizer_type = "AdamW8bit"
            optimizer_args = ["weight_decay=0.05", "betas=0.9,0.99"]
            learning_rate = 1e-4
            sdpa = true
            train_batch_size = 2
            log_with = "tensorboard"
            log_tracker_config = "trackers.toml"
        "#;
        let got = import(&registry, text, None, None).unwrap();
        let c = &got.config;
        assert_eq!(c["network_algo"], "locon", "conv_dim makes kohya's LoRA a LoCon");
        assert_eq!((c["network_dim"].clone(), c["network_alpha"].clone(), c["conv_dim"].clone()), (json!(32), json!(16.0), json!(8)));
        assert_eq!((c["weight_decay"].clone(), c["optimizer_args"].clone()), (json!(0.05), json!("betas=0.9,0.99")));
        assert_eq!((c["attention"].clone(), c["train_batch_size"].clone(), c["model_family"].clone()), (json!("sdpa"), json!(2), json!("sd15")));
        let ignored: Vec<&str> = got.ignored.iter().map(|(k, _)| k.as_str()).collect();
        assert!(ignored.contains(&"log_tracker_config") && ignored.contains(&"train_data_dir"), "{ignored:?}");
        assert_eq!(c["log_with"], "tensorboard");
        assert!(!ignored.contains(&"network_dim"));
        let errors = import(&registry, "network_dim = -4", None, None).unwrap_err();
        assert!(errors.iter().any(|e| e.field == "network_dim"), "{errors:?}");
        let errors = import(&registry, "network_module = \"networks.oft\"", None, None).unwrap_err();
        assert_eq!(errors[0].field, "network_algo");
    }

    /// sd-scripts' list arguments: base_weights / base_weights_multiplier export as TOML lists
    /// (a string would be iterated character by character by sd-scripts' nargs="*" loop) and
    /// import back into the multi-line and comma-separated fields.
    #[test]
    fn base_weights_are_lists_both_ways() {
        let (_, flat) = export_of(json!({"base_weights": "/l/style.safetensors\n\n/l/char.safetensors\n", "base_weights_multiplier": "0.8, -0.5"}));
        let paths: Vec<&str> = flat["base_weights"].as_array().unwrap().iter().map(|v| v.as_str().unwrap()).collect();
        assert_eq!(paths, ["/l/style.safetensors", "/l/char.safetensors"]);
        let mults: Vec<f64> = flat["base_weights_multiplier"].as_array().unwrap().iter().map(|v| v.as_float().unwrap()).collect();
        assert_eq!(mults, [0.8, -0.5]);
        let (_, flat) = export_of(json!({"base_weights_multiplier": "0.8"}));
        assert!(!flat.contains_key("base_weights_multiplier"), "no files, no strengths");

        let registry = Registry::embedded().unwrap();
        let text = "base_weights = [\"/l/a.safetensors\", \"/l/b.safetensors\"]\nbase_weights_multiplier = [1.0, 0.25]\n";
        let got = import(&registry, text, None, None).unwrap();
        assert_eq!(got.config["base_weights"], "/l/a.safetensors\n/l/b.safetensors");
        assert_eq!(got.config["base_weights_multiplier"], "1, 0.25");
        let cfg = loft_worker::train::TrainConfig::read_fields(&got.config).unwrap();
        assert_eq!(cfg.base_weights, [std::path::PathBuf::from("/l/a.safetensors"), "/l/b.safetensors".into()]);
        assert_eq!(cfg.base_weights_multiplier, [1.0, 0.25]);
        let bad = json!({"base_weights": "/l/a.safetensors", "base_weights_multiplier": "1.0, x"});
        let e = loft_worker::train::TrainConfig::read_fields(bad.as_object().unwrap()).unwrap_err();
        assert!(e.field == "base_weights_multiplier" && e.message.contains("\"x\""), "{e}");
    }

    /// With a training folder on this machine, the export writes sd-scripts' dataset config: the
    /// dataset options under `[general]` (only keys sd-scripts' ConfigSanitizer accepts there), a
    /// subset per `N_class` folder with its repeats and class tokens (regularisation ones marked),
    /// and the main file names it instead of the folders.
    #[test]
    fn the_dataset_config_lists_the_subsets() {
        // sd-scripts' [general] keys (library/config_util.py, shared/reference/algorithms.md §4).
        const GENERAL: &[&str] = &[
            "batch_size", "resolution", "network_multiplier", "enable_bucket", "min_bucket_reso", "max_bucket_reso", "bucket_reso_steps", "bucket_no_upscale",
            "validation_seed", "validation_split", "resize_interpolation", "num_repeats", "color_aug", "flip_aug", "random_crop", "face_crop_aug_range",
            "shuffle_caption", "caption_separator", "keep_tokens", "keep_tokens_separator", "secondary_separator", "enable_wildcard", "token_warmup_min",
            "token_warmup_step", "caption_prefix", "caption_suffix", "custom_attributes", "caption_extension", "class_tokens", "cache_info",
            "caption_dropout_rate", "caption_dropout_every_n_epochs", "caption_tag_dropout_rate",
        ];
        let tmp = tempfile::tempdir().unwrap();
        for d in ["train/10_ohwx cat", "train/3_style", "train/notes", "reg/1_cat"] {
            std::fs::create_dir_all(tmp.path().join(d)).unwrap();
        }
        let (e, flat) = export_of(json!({
            "train_data_dir": tmp.path().join("train"), "reg_data_dir": tmp.path().join("reg"),
            "shuffle_caption": true, "keep_tokens": 1, "flip_aug": true, "resolution": 768, "train_batch_size": 2, "alpha_mask": true,
            "masked_loss": true,
        }));
        assert!(!flat.contains_key("train_data_dir") && !flat.contains_key("reg_data_dir"), "{}", e.toml);
        assert_eq!(flat["dataset_config"].as_str(), Some("/o/dataset.toml"));
        let (name, text) = e.dataset_file.expect("a dataset config");
        assert_eq!(name, "dataset.toml");
        let doc: Table = toml::from_str(&text).unwrap();
        let general = doc["general"].as_table().unwrap();
        for k in general.keys() {
            assert!(GENERAL.contains(&k.as_str()), "[general] {k} is not a key sd-scripts accepts there");
        }
        assert_eq!((general["shuffle_caption"].as_bool(), general["keep_tokens"].as_integer(), general["resolution"].as_integer(), general["batch_size"].as_integer()), (Some(true), Some(1), Some(768), Some(2)));
        let subsets = doc["datasets"][0]["subsets"].as_array().unwrap();
        let summary: Vec<(String, i64, String, bool, bool)> = subsets
            .iter()
            .map(|s| {
                let dir = s["image_dir"].as_str().unwrap();
                (dir.rsplit('/').next().unwrap().to_string(), s["num_repeats"].as_integer().unwrap(), s["class_tokens"].as_str().unwrap().to_string(), s.get("is_reg").is_some(), s["alpha_mask"].as_bool().unwrap())
            })
            .collect();
        assert_eq!(
            summary,
            [("10_ohwx cat".to_string(), 10, "ohwx cat".to_string(), false, true), ("3_style".into(), 3, "style".into(), false, true), ("1_cat".into(), 1, "cat".into(), true, true)]
        );
        // A folder that is not here: no dataset config, the folders stay in the main file.
        let (e, flat) = export_of(json!({"train_data_dir": "/nowhere/at/all"}));
        assert!(e.dataset_file.is_none() && flat.contains_key("train_data_dir"));
        assert!(e.not_exported.iter().any(|(k, why)| k == "dataset.toml" && why.contains("/nowhere/at/all")), "{:?}", e.not_exported);
    }

    #[test]
    fn invalid_configs_are_refused_by_field() {
        let registry = Registry::embedded().unwrap();
        let bad = json!({"pretrained_model_name_or_path": "/m", "train_data_dir": "/d", "network_dim": -3, "network_algo": "lorax"});
        let errors = export(&registry, bad.as_object().unwrap(), "p.txt").unwrap_err();
        for f in ["network_dim", "network_algo"] {
            assert!(errors.iter().any(|e| e.field == f), "{f}: {errors:?}");
        }
        let errors = export(&registry, json!({"pretrained_model_name_or_path": "/m"}).as_object().unwrap(), "p.txt").unwrap_err();
        assert_eq!(errors.iter().map(|e| e.field.as_str()).collect::<Vec<_>>(), vec!["train_data_dir"]);
    }
}
