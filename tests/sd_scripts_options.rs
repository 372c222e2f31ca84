//! Issue 15's "done when": an sd-scripts config using LoRA+, masked loss with an alpha channel,
//! a validation split, weighted captions and `network_weights` from an earlier Loft run imports
//! with `loft import-sd-scripts` and trains to the end with no refusal, reporting its validation
//! loss and writing TensorBoard logs.

use std::path::{Path, PathBuf};

mod common;

use common::{loft, text, tiny_model};

/// Six 32² RGBA images whose left quarter is transparent, with weighted captions.
fn dataset(root: &Path) -> PathBuf {
    let sub = root.join("data/3_blob");
    std::fs::create_dir_all(&sub).unwrap();
    for i in 0..6u32 {
        let img = image::RgbaImage::from_fn(32, 32, |x, y| image::Rgba([(x * 7) as u8, (y * 6) as u8, (40 * i) as u8, if x < 8 { 0 } else { 255 }]));
        img.save(sub.join(format!("{i}.png"))).unwrap();
        std::fs::write(sub.join(format!("{i}.txt")), format!("(a blob:1.2), [picture] {i}")).unwrap();
    }
    root.join("data")
}

#[test]
fn an_sd_scripts_config_with_the_formerly_refused_options_trains() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let data = dataset(root);
    let common = format!(
        "pretrained_model_name_or_path = \"{model}\"\ntrain_data_dir = \"{data}\"\nresolution = 32\nmin_bucket_reso = 16\nmax_bucket_reso = 64\nbucket_reso_steps = 8\nnetwork_dim = 4\nnetwork_alpha = 4\nlearning_rate = 0.01\nsave_precision = \"float\"\nmixed_precision = \"no\"\n",
        model = tiny_model().display(),
        data = data.display()
    );
    // An earlier Loft run to continue from.
    let first = root.join("first.toml");
    std::fs::write(&first, format!("{common}output_dir = \"{}\"\noutput_name = \"earlier\"\nmax_train_epochs = 0\nmax_train_steps = 2\nsave_every_n_epochs = 0\n", root.join("first").display())).unwrap();
    let o = loft(&["train", first.to_str().unwrap()]);
    assert!(o.status.success(), "{}", text(&o));
    let earlier = root.join("first/earlier.safetensors");
    assert!(earlier.is_file());

    // The sd-scripts file, as a kohya_ss user has it.
    let kohya = root.join("kohya.toml");
    std::fs::write(
        &kohya,
        format!(
            "{common}output_dir = \"{out}\"\noutput_name = \"continued\"\nnetwork_module = \"networks.lora\"\nnetwork_args = [\"loraplus_lr_ratio=4\"]\nnetwork_weights = \"{earlier}\"\nmasked_loss = true\nalpha_mask = true\nvalidation_split = 0.34\nvalidation_seed = 3\nweighted_captions = true\nmax_train_epochs = 2\nlogging_dir = \"{logs}\"\n",
            out = root.join("out").display(),
            earlier = earlier.display(),
            logs = root.join("logs").display()
        ),
    )
    .unwrap();
    let config = root.join("loft.toml");
    let o = loft(&["import-sd-scripts", kohya.to_str().unwrap(), "--out", config.to_str().unwrap()]);
    assert!(o.status.success(), "{}", text(&o));
    let imported = std::fs::read_to_string(&config).unwrap();
    for key in ["loraplus_lr_ratio", "network_weights", "masked_loss", "alpha_mask", "validation_split", "weighted_captions", "logging_dir"] {
        assert!(imported.contains(key), "{key} imported: {imported}");
    }
    let o = loft(&["train", config.to_str().unwrap()]);
    let t = text(&o);
    assert!(o.status.success(), "{t}");
    assert!(!t.contains("not support"), "no refusal: {t}");
    assert!(t.contains("network_weights:") && t.contains("LoRA+ parameter groups"), "{t}");
    assert!(t.contains("validation loss"), "{t}");
    assert!(root.join("out/continued.safetensors").is_file());
    let logs: Vec<_> = walk(&root.join("logs")).into_iter().filter(|p| p.to_string_lossy().contains("tfevents")).collect();
    assert_eq!(logs.len(), 1, "{logs:?}");
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = vec![];
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}

/// sd-scripts flattens one level of tables.
fn flat_toml(text: &str) -> toml::Table {
    let parsed: toml::Table = toml::from_str(text).unwrap();
    let mut flat = toml::Table::new();
    for (k, v) in parsed {
        match v {
            toml::Value::Table(t) => flat.extend(t),
            other => {
                flat.insert(k, other);
            }
        }
    }
    flat
}

/// A Flux.1 export names sd-scripts' Flux trainer and LoRA module, carries the Flux options
/// and the model's parts, leaves the DDPM options out, and imports back as the same job.
#[test]
fn a_flux_export_names_the_flux_trainer_and_carries_its_options() {
    use loft::registry::Registry;
    use loft::sd_scripts::{export, import};
    use serde_json::json;

    let registry = Registry::embedded().unwrap();
    let config = json!({
        "model_family": "flux_dev", "pretrained_model_name_or_path": "/models/FLUX.1-dev", "train_data_dir": "/nowhere/data",
        "output_dir": "/o", "mixed_precision": "bf16", "guidance_scale": 1.0, "timestep_sampling": "shift", "discrete_flow_shift": 3.1582,
        "model_prediction_type": "raw", "train_blocks": "single", "clip_skip": 2, "min_snr_gamma": 5.0,
    });
    let e = export(&registry, config.as_object().unwrap(), "/o/prompts.txt").unwrap_or_else(|e| panic!("{e:?}"));
    assert_eq!(e.script, "flux_train_network.py");
    assert!(e.toml.contains("accelerate launch flux_train_network.py"), "{}", e.toml);
    let flat = flat_toml(&e.toml);
    assert_eq!(flat["network_module"].as_str(), Some("networks.lora_flux"));
    assert_eq!(flat["guidance_scale"].as_float(), Some(1.0));
    assert_eq!(flat["timestep_sampling"].as_str(), Some("shift"));
    assert_eq!(flat["discrete_flow_shift"].as_float(), Some(3.1582));
    assert_eq!(flat["sigmoid_scale"].as_float(), Some(1.0), "used by shift sampling");
    assert_eq!(flat["model_prediction_type"].as_str(), Some("raw"));
    assert_eq!(flat["t5xxl_max_token_length"].as_integer(), Some(512));
    assert_eq!(flat["pretrained_model_name_or_path"].as_str(), Some("/models/FLUX.1-dev"));
    assert_eq!(flat["clip_l"].as_str(), Some("/models/FLUX.1-dev/text_encoder"));
    assert_eq!(flat["t5xxl"].as_str(), Some("/models/FLUX.1-dev/text_encoder_2"));
    assert_eq!(flat["ae"].as_str(), Some("/models/FLUX.1-dev/vae"));
    let args: Vec<&str> = flat["network_args"].as_array().unwrap().iter().map(|v| v.as_str().unwrap()).collect();
    assert!(args.contains(&"train_blocks=single") && args.contains(&"train_t5xxl=False"), "{args:?}");
    for key in ["clip_skip", "min_snr_gamma", "v_parameterization", "noise_offset", "max_token_length", "logit_mean", "mode_scale", "v2"] {
        assert!(!flat.contains_key(key), "{key} exported:\n{}", e.toml);
    }

    // Read back as the same Flux job.
    let back = import(&registry, &e.toml, None, None).unwrap_or_else(|e| panic!("{e:?}"));
    assert!(back.ignored.is_empty(), "{:?}", back.ignored);
    assert_eq!(back.config["model_family"], json!("flux_dev"));
    assert_eq!(back.config["network_algo"], json!("lora"));
    assert_eq!(back.config["train_blocks"], json!("single"));
    let again = export(&registry, &back.config, "/o/prompts.txt").unwrap();
    assert_eq!(again.toml, e.toml);

    // Schnell: no guidance input, 256 T5 tokens; the family survives the round trip.
    let mut schnell = config.clone();
    schnell["model_family"] = json!("flux_schnell");
    let e = export(&registry, schnell.as_object().unwrap(), "/o/prompts.txt").unwrap();
    let flat = flat_toml(&e.toml);
    assert!(!flat.contains_key("guidance_scale"), "{}", e.toml);
    assert_eq!(flat["t5xxl_max_token_length"].as_integer(), Some(256));
    assert_eq!(import(&registry, &e.toml, None, None).unwrap().config["model_family"], json!("flux_schnell"));
}
