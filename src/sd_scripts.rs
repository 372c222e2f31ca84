//! A Loft configuration as a kohya sd-scripts run: the `--config_file` TOML for
//! `train_network.py` (SD 1.x/2.x) or `sdxl_train_network.py`, built from the registry's
//! `export` names, so a user can take a job to sd-scripts (or compare the two).
//!
//! The configuration is validated and resolved exactly as for training, and only *active*
//! fields (shown, not greyed) are exported. Values sd-scripts must not receive are left out
//! (empty text and paths, and the zeros that mean "unset" in Loft but something else in
//! sd-scripts); `network_algo` becomes `network_module` + `algo=`; `attention` becomes its
//! flag; `sample_prompts` goes to a prompts file the TOML names. sd-scripts reads repeats and
//! class tokens from `N_name` folder names, so those two Loft defaults are reported, not
//! exported. The TOML groups keys under the registry's sections; sd-scripts flattens one level.

use toml::{Table, Value as Toml};

use crate::jobs::config::active_config;
use std::path::PathBuf;

use anyhow::{bail, Context};
use clap::Args;

use crate::registry::{Config, FieldError, Kind, Registry};

/// What an export produced.
#[derive(Debug, Clone)]
pub struct SdScriptsConfig {
    /// `train_network.py` or `sdxl_train_network.py`.
    pub script: &'static str,
    /// The `--config_file` TOML.
    pub toml: String,
    /// The sample prompts file's text, when there are prompts (the TOML names the file).
    pub sample_prompts: Option<String>,
    /// Settings sd-scripts has no place for, each with why.
    pub not_exported: Vec<(String, String)>,
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

/// A value as sd-scripts' `network_args` / `optimizer_args` text (`True`, `0.5`, `full`).
fn arg_text(v: &serde_json::Value) -> String {
    match v {
        serde_json::Value::Bool(true) => "True".into(),
        serde_json::Value::Bool(false) => "False".into(),
        serde_json::Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// Exports `config`; `prompts_file` is the path the TOML gives for the sample prompts.
pub fn export(registry: &Registry, config: &Config, prompts_file: &str) -> Result<SdScriptsConfig, Vec<FieldError>> {
    let mut config = config.clone();
    registry.apply_links(&mut config, &[]);
    let errors = registry.validate(&config);
    if !errors.is_empty() {
        return Err(errors);
    }
    let resolved = registry.resolve(&config);
    let active = active_config(registry, &resolved);
    // Required paths (the base model, the images): a config without them would not run.
    let missing: Vec<FieldError> = registry
        .fields()
        .filter(|f| f.required && active.get(&f.key).and_then(|v| v.as_str()).is_some_and(str::is_empty))
        .map(|f| FieldError { field: f.key.clone(), message: format!("{} is required", f.label) })
        .collect();
    if !missing.is_empty() {
        return Err(missing);
    }
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
    match lycoris_algo(&algo) {
        Some(name) => {
            put("network", "network_module", Toml::String("lycoris.kohya".into()));
            network_args.push(format!("algo={name}"));
        }
        None => put("network", "network_module", Toml::String("networks.lora".into())),
    }
    let family = text("model_family");
    if family == "sd2" {
        put("model", "v2", Toml::Boolean(true));
    }
    match text("attention").as_str() {
        "sdpa" => put("training", "sdpa", Toml::Boolean(true)),
        "xformers" => put("training", "xformers", Toml::Boolean(true)),
        "mem_eff_attn" => put("training", "mem_eff_attn", Toml::Boolean(true)),
        _ => {}
    }

    for field in registry.fields() {
        let Some(export) = &field.export else { continue };
        let Some(value) = active.get(&field.key) else { continue };
        let key = field.key.as_str();
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
            ("max_token_length", v) if v.as_str() == Some("75") => continue,
            ("max_token_length", v) => Toml::Integer(v.as_str().and_then(|s| s.parse().ok()).unwrap_or(75)),
            ("sample_prompts", v) => {
                sample_prompts = v.as_str().map(|s| format!("{}\n", s.trim_end()));
                Toml::String(prompts_file.to_string())
            }
            (_, serde_json::Value::Bool(b)) => Toml::Boolean(*b),
            (_, serde_json::Value::String(s)) => Toml::String(s.clone()),
            (_, serde_json::Value::Number(n)) if matches!(field.kind, Kind::Integer) => Toml::Integer(n.as_i64().unwrap_or_default()),
            (_, serde_json::Value::Number(n)) => Toml::Float(n.as_f64().unwrap_or_default()),
            _ => continue,
        };
        put(section, name, toml_value);
    }
    if !network_args.is_empty() {
        put("network", "network_args", Toml::Array(network_args.into_iter().map(Toml::String).collect()));
    }
    if !optimizer_args.is_empty() {
        put("optimizer", "optimizer_args", Toml::Array(optimizer_args.into_iter().map(Toml::String).collect()));
    }

    let script = if family == "sdxl" { "sdxl_train_network.py" } else { "train_network.py" };
    let mut out = format!("# sd-scripts configuration exported by Loft.\n# Run: accelerate launch {script} --config_file THIS_FILE\n");
    if matches!(algo.as_str(), "glora_ex" | "abba") {
        out.push_str(&format!("# network_algo {algo} needs a LyCORIS build that has algo={}.\n", lycoris_algo(&algo).unwrap_or("")));
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
    Ok(SdScriptsConfig { script, toml: out, sample_prompts, not_exported })
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
    for (key, why) in &exported.not_exported {
        eprintln!("not exported: {key} ({why})");
    }
    println!("wrote {}", toml_path.display());
    println!("run: accelerate launch {} --config_file {}", exported.script, toml_path.display());
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
        assert_eq!(e.not_exported.iter().map(|(k, _)| k.as_str()).collect::<Vec<_>>(), vec!["num_repeats"], "num_repeats is reported");
        assert!(e.toml.contains("# not exported: num_repeats"));
        // Values that apply are typed as sd-scripts expects them.
        let (_, flat) = export_of(json!({"max_token_length": "225", "seed": 42, "network_dim": 16, "learning_rate": 0.0002}));
        assert_eq!(flat["max_token_length"].as_integer(), Some(225));
        assert_eq!(flat["seed"].as_integer(), Some(42));
        assert_eq!(flat["network_dim"].as_integer(), Some(16));
        assert_eq!(flat["learning_rate"].as_float(), Some(0.0002));
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
