//! What the engine refuses: no option by name any more (`UNSUPPORTED_WHEN_SET` is empty), and
//! the options issue 15 made train are accepted when set. What is still refused is bound to the
//! hardware or to numbers (full_bf16 needs bf16 matrix multiplies, which the CPU backend lacks;
//! full_fp16 with Prodigy or default-eps AdamW divides by zero) and each refusal names its
//! reason, in the error and in the field's help.

use loft_worker::train::config::UNSUPPORTED_WHEN_SET;
use loft_worker::train::TrainConfig;
use serde_json::{json, Value};

fn registry_help(key: &str) -> Option<String> {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../fields");
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "toml") {
            let text = std::fs::read_to_string(&path).unwrap();
            let table: toml_like::Doc = toml_like::parse(&text);
            if let Some(help) = table.help_of(key) {
                return Some(help);
            }
        }
    }
    None
}

/// Just enough of the registry files to find a field's help (the root crate owns the parser).
mod toml_like {
    pub struct Doc(Vec<(String, String)>);
    pub fn parse(text: &str) -> Doc {
        let mut out = vec![];
        let mut key = None;
        for line in text.lines() {
            if let Some(k) = line.strip_prefix("key = \"") {
                key = Some(k.trim_end_matches('"').to_string());
            } else if let (Some(h), Some(k)) = (line.strip_prefix("help = \""), key.as_ref()) {
                out.push((k.clone(), h.trim_end_matches('"').to_string()));
            }
        }
        Doc(out)
    }
    impl Doc {
        pub fn help_of(&self, key: &str) -> Option<String> {
            self.0.iter().find(|(k, _)| k == key).map(|(_, h)| h.clone())
        }
    }
}

#[test]
fn no_option_is_refused_by_name_and_the_numeric_refusals_say_why() {
    assert!(UNSUPPORTED_WHEN_SET.is_empty(), "{UNSUPPORTED_WHEN_SET:?}");
    let base = json!({"pretrained_model_name_or_path": "/m", "train_data_dir": "/d", "output_dir": "/o"});
    let with = |pairs: &[(&str, Value)]| {
        let mut map = base.clone();
        for (k, v) in pairs {
            map[*k] = v.clone();
        }
        TrainConfig::from_map(map.as_object().unwrap())
    };
    // Accepted: full_fp16 with fp16 and an optimizer computing in f32; full_bf16 with bf16.
    for opt in ["AdamW8bit", "Lion", "Adafactor"] {
        let cfg = with(&[("full_fp16", json!(true)), ("mixed_precision", json!("fp16")), ("optimizer_type", json!(opt))]).unwrap_or_else(|e| panic!("{opt}: {e:?}"));
        assert!(cfg.full_fp16);
    }
    with(&[("full_fp16", json!(true)), ("mixed_precision", json!("fp16")), ("optimizer_type", json!("AdamW")), ("optimizer_args", json!("eps=1e-6"))]).unwrap();
    for opt in ["AdamW", "Prodigy", "Lion"] {
        with(&[("full_bf16", json!(true)), ("mixed_precision", json!("bf16")), ("optimizer_type", json!(opt))]).unwrap_or_else(|e| panic!("{opt}: {e:?}"));
    }
    // Refused, naming the field and the reason.
    let refused: &[(&[(&str, Value)], &str, &str)] = &[
        (&[("full_fp16", json!(true)), ("mixed_precision", json!("no"))], "full_fp16", "mixed_precision = \"fp16\""),
        (&[("full_bf16", json!(true)), ("mixed_precision", json!("fp16"))], "full_bf16", "mixed_precision = \"bf16\""),
        (&[("full_fp16", json!(true)), ("full_bf16", json!(true))], "full_bf16", "together"),
        (&[("full_fp16", json!(true)), ("mixed_precision", json!("fp16")), ("optimizer_type", json!("Prodigy"))], "full_fp16", "underflow"),
        (&[("full_fp16", json!(true)), ("mixed_precision", json!("fp16")), ("optimizer_type", json!("AdamW"))], "full_fp16", "eps"),
    ];
    for (pairs, field, why) in refused {
        let errs = with(pairs).unwrap_err();
        assert!(errs.iter().any(|e| e.field == *field && e.message.contains(why)), "{pairs:?}: {errs:?}");
    }
    for key in ["full_fp16", "full_bf16"] {
        let help = registry_help(key).unwrap_or_else(|| panic!("{key} is a registry field"));
        assert!(!help.contains("does not do this yet"), "{key}'s help still says it is not implemented: {help}");
    }
    assert!(registry_help("full_bf16").unwrap().contains("CPU"), "full_bf16's help names the CPU refusal");
    assert!(registry_help("full_fp16").unwrap().contains("Prodigy"), "full_fp16's help names the optimizers it refuses");
}

#[test]
fn the_options_issue_15_made_train_are_accepted() {
    let set: &[(&str, Value)] = &[
        ("network_weights", json!("/w.safetensors")),
        ("dim_from_weights", json!(true)),
        ("base_weights", json!("/b.safetensors")),
        ("base_weights_multiplier", json!(0.5)),
        ("loraplus_lr_ratio", json!(16.0)),
        ("loraplus_unet_lr_ratio", json!(16.0)),
        ("loraplus_text_encoder_lr_ratio", json!(4.0)),
        ("masked_loss", json!(true)),
        ("alpha_mask", json!(true)),
        ("validation_split", json!(0.1)),
        ("weighted_captions", json!(true)),
        ("enable_wildcard", json!(true)),
        ("color_aug", json!(true)),
        ("face_crop_aug_range", json!("2.0,4.0")),
        ("enable_bucket", json!(false)),
        ("fp8_base", json!(true)),
        ("logging_dir", json!("/logs")),
        ("full_fp16", json!(true)),
        ("mixed_precision", json!("fp16")),
        ("optimizer_type", json!("Lion")),
    ];
    let mut map = json!({"pretrained_model_name_or_path": "/m", "train_data_dir": "/d", "output_dir": "/o"});
    for (k, v) in set {
        map[*k] = v.clone();
    }
    let cfg = TrainConfig::from_map(map.as_object().unwrap()).unwrap_or_else(|e| panic!("{e:?}"));
    assert!(cfg.masked_loss && cfg.fp8_base && cfg.weighted_captions && cfg.enable_wildcard && cfg.color_aug && cfg.full_fp16);
    assert_eq!((cfg.validation_split, cfg.loraplus_lr_ratio), (0.1, 16.0));
}
