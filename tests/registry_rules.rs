//! The registry's rules, checked against the reference tables (expected sets are written here from
//! reference/network-options.md, not read back from fields/).

use std::collections::BTreeSet;

use loft::registry::{Config, Registry};
use serde_json::{json, Value};

fn registry() -> Registry {
    Registry::embedded().expect("the embedded registry loads and lints clean")
}

fn config(pairs: &[(&str, Value)]) -> Config {
    pairs.iter().map(|(k, v)| (k.to_string(), v.clone())).collect()
}

fn visible_network_fields(r: &Registry, algo: &str) -> BTreeSet<String> {
    let section = r.section("network").unwrap();
    r.evaluate_section(section, &config(&[("network_algo", json!(algo))]))
        .into_iter()
        .filter(|f| f.visible)
        .map(|f| f.key)
        .collect()
}

/// Fields every algorithm shows: the algorithm itself, the preset, rank/alpha, the dropouts, and
/// the shared network inputs.
const SHARED: &[&str] = &[
    "network_algo",
    "lycoris_preset",
    "network_dim",
    "network_alpha",
    "network_dropout",
    "rank_dropout",
    "module_dropout",
    "network_weights",
    "dim_from_weights",
    "network_train_unet_only",
    "network_train_text_encoder_only",
];

/// reference/network-options.md, row by row (conv dim/alpha for the algorithms that adapt convolutions).
fn expected_specific(algo: &str) -> &'static [&'static str] {
    match algo {
        "lora" => &["conv_dim", "conv_alpha"],
        "locon" => &["conv_dim", "conv_alpha"],
        "lycoris_locon" => &["conv_dim", "conv_alpha", "dora_wd", "wd_on_output", "use_tucker", "orthogonalize", "rs_lora", "train_norm", "use_scalar", "bypass_mode"],
        "loha" => &["conv_dim", "conv_alpha", "dora_wd", "wd_on_output", "use_tucker", "rs_lora", "train_norm", "use_scalar", "bypass_mode"],
        "ia3" => &["train_on_input"],
        "lokr" => &[
            "conv_dim", "conv_alpha", "factor", "unbalanced_factorization", "full_matrix", "decompose_both", "dora_wd", "wd_on_output",
            "use_tucker", "orthogonalize", "rs_lora", "train_norm", "use_scalar", "bypass_mode",
        ],
        "dylora" => &["conv_dim", "conv_alpha", "block_size", "train_norm", "bypass_mode"],
        "diag_oft" => &["rescaled", "use_constraint", "constraint", "train_norm", "bypass_mode"],
        "boft" => &["rescaled", "use_constraint", "constraint", "train_norm", "bypass_mode"],
        "glora" | "glora_ex" => &["conv_dim", "conv_alpha", "use_tucker", "orthogonalize", "rs_lora", "train_norm", "use_scalar", "bypass_mode"],
        "abba" => &["conv_dim", "conv_alpha", "dora_wd", "wd_on_output", "train_norm", "use_scalar", "bypass_mode"],
        "full" => &["train_norm"],
        other => panic!("no reference row for {other}"),
    }
}

const ALGOS: &[&str] = &["lora", "locon", "lycoris_locon", "loha", "ia3", "lokr", "dylora", "diag_oft", "boft", "glora", "glora_ex", "abba", "full"];

#[test]
fn algorithm_choices_are_the_thirteen() {
    let r = registry();
    let values: Vec<String> = r.field("network_algo").unwrap().choices.iter().map(|c| c.value.clone()).collect();
    assert_eq!(values, ALGOS);
    let families: Vec<String> = r.field("model_family").unwrap().choices.iter().map(|c| c.value.clone()).collect();
    assert_eq!(families, ["sd15", "sd2", "sdxl", "flux_dev", "flux_schnell"]);
}

#[test]
fn each_algorithm_shows_exactly_its_options() {
    let r = registry();
    for algo in ALGOS {
        let expected: BTreeSet<String> = SHARED.iter().chain(expected_specific(algo)).map(|s| s.to_string()).collect();
        let shown = visible_network_fields(&r, algo);
        assert_eq!(shown, expected, "visible Network fields for {algo}: extra {:?}, missing {:?}", shown.difference(&expected).collect::<Vec<_>>(), expected.difference(&shown).collect::<Vec<_>>());
    }
}

#[test]
fn kohya_algorithms_grey_preset_and_lora_greys_conv() {
    let r = registry();
    let section = r.section("network").unwrap();
    let state = |algo: &str, key: &str| {
        r.evaluate_section(section, &config(&[("network_algo", json!(algo))])).into_iter().find(|f| f.key == key).unwrap()
    };
    for algo in ["lora", "locon"] {
        assert!(!state(algo, "lycoris_preset").enabled, "preset greyed for {algo}");
    }
    assert!(state("loha", "lycoris_preset").enabled);
    assert!(!state("lora", "conv_dim").enabled && !state("lora", "conv_alpha").enabled);
    assert!(state("locon", "conv_dim").enabled && state("lycoris_locon", "conv_alpha").enabled);
}

#[test]
fn wd_on_output_turns_weight_decomposition_on_and_off() {
    let r = registry();
    let mut cfg = config(&[("network_algo", json!("lokr"))]);
    r.merge_form(&mut cfg, &[("wd_on_output".into(), "false".into()), ("wd_on_output".into(), "true".into())]);
    let resolved = r.resolve(&cfg);
    assert_eq!(resolved["wd_on_output"], json!(true));
    assert_eq!(resolved["dora_wd"], json!(true), "turning WD on Output on turns Weight Decomposition on");
    // Turning Weight Decomposition off again turns WD on Output off (it means nothing alone).
    r.merge_form(&mut cfg, &[("dora_wd".into(), "false".into()), ("wd_on_output".into(), "true".into())]);
    let resolved = r.resolve(&cfg);
    assert_eq!(resolved["dora_wd"], json!(false));
    assert_eq!(resolved["wd_on_output"], json!(false));
    // Weight Decomposition alone stays as set.
    r.merge_form(&mut cfg, &[("dora_wd".into(), "true".into())]);
    let resolved = r.resolve(&cfg);
    assert_eq!((resolved["dora_wd"].clone(), resolved["wd_on_output"].clone()), (json!(true), json!(false)));
}

#[test]
fn clip_skip_is_greyed_for_sdxl_and_keeps_its_value() {
    let r = registry();
    let model = r.section("model").unwrap();
    let clip = |family: &str| {
        r.evaluate_section(model, &config(&[("model_family", json!(family)), ("clip_skip", json!(2))]))
            .into_iter()
            .find(|f| f.key == "clip_skip")
            .unwrap()
    };
    assert!(clip("sd15").enabled && clip("sd2").enabled);
    let sdxl = clip("sdxl");
    assert!(sdxl.visible && !sdxl.enabled, "greyed, still shown");
    assert_eq!(sdxl.value, json!(2), "value kept");
}

/// Every visible field of every section for a configuration.
fn visible_fields(r: &Registry, pairs: &[(&str, Value)]) -> BTreeSet<String> {
    let cfg = config(pairs);
    r.sections.iter().flat_map(|s| r.evaluate_section(s, &cfg)).filter(|f| f.visible).map(|f| f.key).collect()
}

const FLUX_FIELDS: &[&str] = &[
    "guidance_scale",
    "timestep_sampling",
    "discrete_flow_shift",
    "model_prediction_type",
    "weighting_scheme",
    "t5xxl_max_token_length",
    "apply_t5_attn_mask",
    "train_t5xxl",
    "train_blocks",
];

/// DDPM-only and convolution options, hidden for Flux.1.
const NOT_FLUX: &[&str] = &[
    "clip_skip",
    "v_parameterization",
    "min_snr_gamma",
    "noise_offset",
    "adaptive_noise_scale",
    "noise_offset_random_strength",
    "multires_noise_iterations",
    "multires_noise_discount",
    "zero_terminal_snr",
    "v_pred_like_loss",
    "debiased_estimation_loss",
    "scale_v_pred_loss_like_noise_pred",
    "min_timestep",
    "max_timestep",
    "max_token_length",
    "weighted_captions",
    "sample_sampler",
];

#[test]
fn flux_shows_its_options_and_hides_the_ddpm_ones() {
    let r = registry();
    let dev = visible_fields(&r, &[("model_family", json!("flux_dev")), ("network_algo", json!("lycoris_locon"))]);
    for key in FLUX_FIELDS {
        assert!(dev.contains(*key), "{key} shown for flux_dev");
    }
    for key in NOT_FLUX.iter().chain(&["conv_dim", "conv_alpha", "use_tucker"]) {
        assert!(!dev.contains(*key), "{key} hidden for flux_dev");
    }
    // Options that follow the sampling and weighting choices (sigma + uniform by default).
    for key in ["sigmoid_scale", "logit_mean", "logit_std", "mode_scale"] {
        assert!(!dev.contains(key), "{key} hidden for the default sigma sampling / uniform weighting");
    }
    let sigmoid = visible_fields(&r, &[("model_family", json!("flux_dev")), ("timestep_sampling", json!("sigmoid"))]);
    assert!(sigmoid.contains("sigmoid_scale") && !sigmoid.contains("discrete_flow_shift"));
    let logit = visible_fields(&r, &[("model_family", json!("flux_dev")), ("weighting_scheme", json!("logit_normal"))]);
    assert!(logit.contains("logit_mean") && logit.contains("logit_std") && !logit.contains("mode_scale"));
    let mode = visible_fields(&r, &[("model_family", json!("flux_dev")), ("weighting_scheme", json!("mode")), ("timestep_sampling", json!("uniform"))]);
    assert!(!mode.contains("mode_scale"), "mode weighting draws timesteps only with sigma sampling");

    // Schnell has no guidance input; the rest is as for dev.
    let schnell = visible_fields(&r, &[("model_family", json!("flux_schnell"))]);
    assert!(!schnell.contains("guidance_scale") && schnell.contains("timestep_sampling") && !schnell.contains("clip_skip"));

    // SD 1.5 shows none of the Flux options and all the DDPM ones.
    let sd15 = visible_fields(&r, &[("model_family", json!("sd15")), ("network_algo", json!("lycoris_locon"))]);
    for key in FLUX_FIELDS.iter().chain(&["sigmoid_scale", "logit_mean", "logit_std", "mode_scale"]) {
        assert!(!sd15.contains(*key), "{key} hidden for sd15");
    }
    for key in NOT_FLUX.iter().chain(&["conv_dim", "conv_alpha", "use_tucker"]) {
        assert!(sd15.contains(*key), "{key} shown for sd15");
    }

    // Per-family defaults.
    let dev = r.resolve(&config(&[("model_family", json!("flux_dev"))]));
    let schnell = r.resolve(&config(&[("model_family", json!("flux_schnell"))]));
    assert_eq!((dev["resolution"].clone(), dev["max_bucket_reso"].clone(), dev["gradient_checkpointing"].clone()), (json!(1024), json!(2048), json!(true)));
    assert_eq!((dev["t5xxl_max_token_length"].clone(), schnell["t5xxl_max_token_length"].clone()), (json!(512), json!(256)));
    assert_eq!((dev["timestep_sampling"].clone(), dev["model_prediction_type"].clone(), dev["guidance_scale"].clone()), (json!("sigma"), json!("sigma_scaled"), json!(3.5)));

    // A hidden DDPM value is kept but not used: it is neither validated nor sent to the engine.
    let set = config(&[("model_family", json!("flux_dev")), ("clip_skip", json!(2)), ("min_snr_gamma", json!(5.0)), ("pretrained_model_name_or_path", json!("/m")), ("train_data_dir", json!("/d"))]);
    let active = loft::jobs::config::validated_active(&r, &set).unwrap_or_else(|e| panic!("{e:?}"));
    assert!(!active.contains_key("clip_skip") && !active.contains_key("min_snr_gamma"), "{active:?}");
    assert_eq!(active["guidance_scale"], json!(3.5));

    // Flux offers no kohya LoCon (no convolutions) and no SNR Huber schedule.
    let errors = r.validate(&config(&[("model_family", json!("flux_dev")), ("network_algo", json!("locon"))]));
    assert!(errors.iter().any(|e| e.field == "network_algo"), "{errors:?}");
    let huber = |schedule: &str| r.validate(&config(&[("model_family", json!("flux_dev")), ("loss_type", json!("huber")), ("huber_schedule", json!(schedule))]));
    assert!(huber("snr").iter().any(|e| e.field == "huber_schedule"));
    assert!(!huber("exponential").iter().any(|e| e.field == "huber_schedule"), "{:?}", huber("exponential"));
    let resolved = r.resolve(&config(&[("model_family", json!("flux_dev")), ("loss_type", json!("huber"))]));
    assert_eq!(resolved["huber_schedule"], json!("exponential"));
}

#[test]
fn keep_tokens_separator_greyed_until_keep_tokens_applies() {
    let r = registry();
    let dataset = r.section("dataset").unwrap();
    let sep = |pairs: &[(&str, Value)]| {
        r.evaluate_section(dataset, &config(pairs)).into_iter().find(|f| f.key == "keep_tokens_separator").unwrap().enabled
    };
    assert!(!sep(&[("shuffle_caption", json!(false)), ("caption_tag_dropout_rate", json!(0.0))]));
    assert!(sep(&[("shuffle_caption", json!(true))]));
    assert!(sep(&[("shuffle_caption", json!(false)), ("caption_tag_dropout_rate", json!(0.1))]));
}

#[test]
fn family_overrides_change_defaults_and_bounds() {
    let r = registry();
    let sd15 = r.resolve(&config(&[("model_family", json!("sd15"))]));
    let sdxl = r.resolve(&config(&[("model_family", json!("sdxl"))]));
    assert_eq!(sd15["resolution"], json!(512));
    assert_eq!(sdxl["resolution"], json!(1024));
    // 384 is fine for SD1.5 but below SDXL's minimum of 512.
    let at = |family: &str| {
        let errors = r.validate(&config(&[("model_family", json!(family)), ("resolution", json!(384))]));
        errors.into_iter().filter(|e| e.field == "resolution").collect::<Vec<_>>()
    };
    assert!(at("sd15").is_empty(), "{:?}", at("sd15"));
    let errors = at("sdxl");
    assert_eq!(errors.len(), 1);
    assert_eq!(errors[0].field, "resolution");
    assert!(errors[0].message.contains("at least 512"), "{}", errors[0].message);
    // Defaults follow the family when the user did not set them: a sparse draft keeps only edits.
    let mut draft = Config::new();
    r.merge_form(&mut draft, &[("model_family".into(), "sd15".into())]);
    r.merge_form(&mut draft, &[("model_family".into(), "sdxl".into())]);
    assert_eq!(r.resolve(&draft)["resolution"], json!(1024));
}

#[test]
fn bad_values_of_every_kind_are_named_with_the_bound() {
    let r = registry();
    let cases: &[(&str, Value, &str)] = &[
        ("resolution", json!(16), "at least 32"),
        ("resolution", json!(4096), "at most 2048"),
        ("resolution", json!(520), "multiple of 32"),
        ("resolution", json!("big"), "whole number"),
        ("resolution", json!(512.5), "whole number"),
        ("network_alpha", json!("x"), "a number"),
        ("network_dropout", json!(1.5), "at most 1"),
        ("network_algo", json!("lorax"), "not a choice"),
        ("shuffle_caption", json!("maybe"), "on or off"),
        ("output_name", json!(7), "text"),
        ("output_name", json!("a\nb"), "single line"),
    ];
    for (key, value, expect) in cases {
        let errors = r.validate(&config(&[(key, value.clone())]));
        let e = errors.iter().find(|e| e.field == *key).unwrap_or_else(|| panic!("{key}={value} should fail, got {errors:?}"));
        assert!(e.message.contains(expect), "{key}={value}: '{}' should mention '{expect}'", e.message);
    }
    let unknown = r.validate(&config(&[("no_such_option", json!(1))]));
    assert_eq!(unknown[0].field, "no_such_option");
    // A required path left empty.
    let empty = r.validate(&config(&[("train_data_dir", json!(""))]));
    assert!(empty.iter().any(|e| e.field == "train_data_dir" && e.message.contains("required")), "{empty:?}");
}

#[test]
fn cross_field_checks_name_both_fields() {
    let r = registry();
    let errors = r.validate(&config(&[("min_bucket_reso", json!(1024)), ("max_bucket_reso", json!(512))]));
    let e = errors.iter().find(|e| e.field == "min_bucket_reso").expect("min > max bucket is an error");
    assert!(e.message.contains("1024") && e.message.contains("512"), "{}", e.message);
}

#[test]
fn registry_lint_catches_broken_rules() {
    let good = registry();
    assert!(good.lint().is_empty());
    for field in good.fields() {
        assert!(field.help.len() >= 10, "{} has help", field.key);
    }
    let broken = r#"
[section]
id = "network"
title = "Network"
order = 1
[[field]]
key = "model_family"
label = "Family"
kind = "choice"
default = "sd15"
help = "The model family for this test."
choices = [{ value = "sd15", label = "SD" }]
[[field]]
key = "a"
label = "A"
kind = "integer"
default = 5
min = 0
max = 3
help = "A field whose default is out of bounds."
show_when = { nope = ["x"] }
[[field]]
key = "b"
label = "B"
kind = "toggle"
default = false
help = "A toggle naming a bad value."
disable_when = { model_family = ["sd99"] }
implies = { a = true }
"#;
    let err = Registry::from_files(&[("network.toml".into(), broken.into())]).err().expect("lint rejects it").to_string();
    for needle in ["default 5: must be at most 3", "unknown field `nope`", "sd99", "implies value true is not a value of `a`"] {
        assert!(err.contains(needle), "lint output should mention {needle:?}:\n{err}");
    }
}

#[test]
fn markdown_reference_lists_every_field() {
    let r = registry();
    let md = r.markdown();
    for f in r.fields() {
        assert!(md.contains(&format!("| `{}` |", f.key)), "{} in the reference", f.key);
    }
}
