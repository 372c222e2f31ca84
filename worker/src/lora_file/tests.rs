use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Tensor};

use super::*;
use crate::networks::testutil::{assert_close, conv_base, linear_base, randomize};
use crate::networks::{build_adapter, Adapter, BaseLayer, LayerKind, NetworkAlgo, NetworkOptions};

fn tmpdir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("loft-lora-file-{tag}-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn opts_for(algo: NetworkAlgo) -> NetworkOptions {
    let mut o = NetworkOptions {
        dim: 4,
        alpha: 2.0,
        block_size: 2,
        ..Default::default()
    };
    if algo.is_kohya() {
        o.conv_dim = Some(4);
        o.conv_alpha = Some(2.0);
    }
    o
}

const Q: &str = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q";
const CONV: &str = "lora_unet_down_blocks_0_resnets_0_conv1";
const SHORT: &str = "lora_unet_down_blocks_0_resnets_0_conv_shortcut";

fn bases() -> Vec<(&'static str, BaseLayer)> {
    vec![
        (Q, linear_base(12, 16, false, 1).unwrap()),
        (CONV, conv_base(8, 16, 3, 1, 1, true, 2).unwrap()),
        (SHORT, conv_base(8, 16, 1, 1, 0, true, 3).unwrap()),
    ]
}

#[test]
fn sha256_matches_the_standard_vectors() {
    assert_eq!(
        sha256_hex(b""),
        "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
    );
    assert_eq!(
        sha256_hex(b"abc"),
        "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    );
    assert_eq!(
        sha256_hex(b"abcdbcdecdefdefgefghfghighijhijkijkljklmklmnlmnomnopnopq"),
        "248d6a61d20638b8e5c026930c3e6039a33ce45964ff2167f6ecedd419db06c1"
    );
    let a = vec![b'a'; 1000];
    assert_eq!(
        sha256_hex(&a),
        "41edece42d63e8d9bf515a9ba6932e1c20cbc9f5a5d134645adb5db1b9737ea3"
    );
}

#[test]
fn python_formatting_of_metadata_values() {
    assert_eq!(py_float(2.0), "2.0");
    assert_eq!(py_float(0.5), "0.5");
    assert_eq!(py_float(1e-4), "0.0001");
    assert_eq!(py_float(1e-5), "1e-05");
    assert_eq!(py_float(3e-6), "3e-06");
    assert_eq!(py_float(1.5e16), "1.5e+16");
    assert_eq!(py_float(-4.0), "-4.0");
    assert_eq!(py_bool(true), "True");
    let args = vec![
        ("algo".to_string(), "locon".to_string()),
        ("use_tucker".to_string(), "True".to_string()),
    ];
    assert_eq!(
        py_json_dict(&args),
        r#"{"algo": "locon", "use_tucker": "True"}"#
    );
    assert_eq!(py_json_dict(&[]), "{}");
}

#[test]
fn network_args_spell_lycoris_names() {
    let names: Vec<Option<&str>> = NetworkAlgo::ALL
        .iter()
        .map(|a| lycoris_algo_name(*a))
        .collect();
    assert_eq!(
        names,
        vec![
            None,
            None,
            Some("locon"),
            Some("loha"),
            Some("ia3"),
            Some("lokr"),
            Some("dylora"),
            Some("diag-oft"),
            Some("boft"),
            Some("glora"),
            Some("glora-ex"),
            Some("abba"),
            Some("full")
        ]
    );
    let o = NetworkOptions {
        use_tucker: true,
        ..Default::default()
    };
    assert_eq!(
        py_json_dict(&network_args_for(NetworkAlgo::Lokr, &o)),
        r#"{"algo": "lokr", "factor": "-1", "use_tucker": "True"}"#
    );
    let o = NetworkOptions {
        conv_dim: Some(4),
        conv_alpha: Some(2.0),
        ..Default::default()
    };
    assert_eq!(
        py_json_dict(&network_args_for(NetworkAlgo::Locon, &o)),
        r#"{"conv_dim": "4", "conv_alpha": "2.0"}"#
    );
    assert!(network_args_for(NetworkAlgo::Lora, &NetworkOptions::default()).is_empty());
    let o = NetworkOptions {
        constraint: 0.02,
        rescaled: true,
        ..Default::default()
    };
    assert_eq!(
        py_json_dict(&network_args_for(NetworkAlgo::DiagOft, &o)),
        r#"{"algo": "diag-oft", "constraint": "0.02", "rescaled": "True"}"#
    );
}

/// Literal keys LyCORIS / sd-scripts write for each algorithm, on the linear layer `Q`.
fn expected_keys(algo: NetworkAlgo) -> Vec<&'static str> {
    match algo {
        NetworkAlgo::Lora
        | NetworkAlgo::Locon
        | NetworkAlgo::LycorisLocon
        | NetworkAlgo::Dylora => {
            vec!["lora_down.weight", "lora_up.weight", "alpha"]
        }
        NetworkAlgo::Loha => vec!["hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "alpha"],
        NetworkAlgo::Lokr => vec!["lokr_w1", "alpha"],
        NetworkAlgo::Ia3 => vec!["weight", "on_input"],
        NetworkAlgo::DiagOft | NetworkAlgo::Boft => vec!["oft_blocks", "alpha"],
        NetworkAlgo::Glora => vec!["a1.weight", "a2.weight", "b1.weight", "b2.weight", "alpha"],
        NetworkAlgo::GloraEx => vec![
            "a1.weight",
            "a2.weight",
            "b1.weight",
            "b2.weight",
            "c1.weight",
            "c2.weight",
            "alpha",
        ],
        NetworkAlgo::Abba => vec![
            "lora_down1.weight",
            "lora_up1.weight",
            "lora_down2.weight",
            "lora_up2.weight",
            "alpha",
        ],
        NetworkAlgo::Full => vec!["diff"],
    }
}

fn expected_file_algo(algo: NetworkAlgo, base: &BaseLayer) -> FileAlgo {
    let kxk = matches!(base.kind, LayerKind::Conv2d { kernel, .. } if kernel != (1, 1));
    FileAlgo::written_by(algo, kxk)
}

fn round_trip(algo: NetworkAlgo, opts: &NetworkOptions, tag: &str, dtype: Option<DType>) {
    let dir = tmpdir("rt");
    let bases = bases();
    let adapters: Vec<Box<dyn Adapter>> = bases
        .iter()
        .enumerate()
        .map(|(i, (n, b))| {
            let a = build_adapter(algo, opts, b, n).unwrap();
            randomize(a.as_ref(), 40 + i as u64).unwrap();
            a
        })
        .collect();
    let modules: Vec<(String, &dyn Adapter)> = bases
        .iter()
        .zip(&adapters)
        .map(|((n, _), a)| (n.to_string(), a.as_ref()))
        .collect();
    let mut meta = NetworkMetadata::for_network(algo, opts);
    meta.base_model_version = Some(BaseModelVersion::SdV1);
    meta.steps = Some(10);
    let path = dir.join(format!("{tag}.safetensors"));
    save_network(&path, &modules, &meta, dtype).unwrap();

    let f = LoraFile::load(&path).unwrap();
    assert_eq!(f.modules.len(), 3, "{tag}");
    // Metadata: strings, as sd-scripts writes them.
    assert_eq!(
        f.metadata["ss_network_module"],
        NetworkModule::for_algo(algo).as_str()
    );
    assert_eq!(f.metadata["ss_network_dim"], opts.dim.to_string());
    assert_eq!(f.metadata["ss_network_alpha"], "2.0");
    assert_eq!(f.metadata["ss_base_model_version"], "sd_v1");
    assert_eq!(f.metadata["ss_v2"], "False");
    assert_eq!(f.metadata["ss_steps"], "10");
    if let Some(name) = lycoris_algo_name(algo) {
        assert_eq!(f.network_args().unwrap()["algo"], name, "{tag}");
    }
    // sshs_model_hash = sha256 of the data section of the very file.
    let bytes = std::fs::read(&path).unwrap();
    assert_eq!(f.metadata["sshs_model_hash"], addnet_hash(&bytes).unwrap());
    assert_eq!(f.metadata["sshs_model_hash"].len(), 64);
    // Literal keys.
    let header = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let names: Vec<String> = header.names().into_iter().map(|s| s.to_string()).collect();
    for k in expected_keys(algo) {
        let key = format!("{Q}.{k}");
        assert!(names.contains(&key), "{tag}: missing `{key}` in {names:?}");
    }
    if let Some(a) = header
        .tensors()
        .into_iter()
        .find(|(n, _)| n == &format!("{Q}.alpha"))
    {
        assert!(a.1.shape().is_empty(), "{tag}: alpha must be a 0-d scalar");
    }
    // ΔW equal (after the save dtype's rounding).
    let tol = if dtype.is_some() { 2e-2 } else { 1e-5 };
    for ((name, base), a) in bases.iter().zip(&adapters) {
        let m = f.module(name).unwrap();
        assert_eq!(m.algo, expected_file_algo(algo, base), "{tag} {name}");
        let d = m.delta(Some(base)).unwrap();
        assert_close(
            &d.dw,
            &a.delta_weight().unwrap(),
            tol,
            &format!("{tag} {name} ΔW"),
        );
        match (d.db, a.delta_bias().unwrap()) {
            (Some(x), Some(y)) => assert_close(&x, &y, tol, &format!("{tag} {name} Δb")),
            (None, None) => {}
            (x, y) => panic!(
                "{tag} {name}: Δb presence differs: {:?} vs {:?}",
                x.is_some(),
                y.is_some()
            ),
        }
        if !m.needs_base() {
            let d0 = m.delta(None).unwrap();
            let want = a.delta_weight().unwrap();
            let got = d0.dw.reshape(want.dims()).unwrap();
            assert_close(&got, &want, tol, &format!("{tag} {name} ΔW without base"));
        } else {
            let e = m.delta(None).unwrap_err().to_string();
            assert!(e.contains(name) && e.contains("base weight"), "{e}");
        }
    }
}

#[test]
fn save_load_round_trip_every_algorithm() {
    for algo in NetworkAlgo::ALL {
        round_trip(algo, &opts_for(algo), algo.name(), None);
    }
}

#[test]
fn save_load_round_trip_variants() {
    let cases: Vec<(NetworkAlgo, NetworkOptions, &str)> = vec![
        (
            NetworkAlgo::LycorisLocon,
            NetworkOptions {
                use_tucker: true,
                ..opts_for(NetworkAlgo::LycorisLocon)
            },
            "locon_tucker",
        ),
        (
            NetworkAlgo::LycorisLocon,
            NetworkOptions {
                dora_wd: true,
                ..opts_for(NetworkAlgo::LycorisLocon)
            },
            "locon_dora",
        ),
        (
            NetworkAlgo::LycorisLocon,
            NetworkOptions {
                dora_wd: true,
                wd_on_output: false,
                ..opts_for(NetworkAlgo::LycorisLocon)
            },
            "locon_dora_in",
        ),
        (
            NetworkAlgo::LycorisLocon,
            NetworkOptions {
                use_scalar: true,
                rs_lora: true,
                ..opts_for(NetworkAlgo::LycorisLocon)
            },
            "locon_scalar_rs",
        ),
        (
            NetworkAlgo::Loha,
            NetworkOptions {
                use_tucker: true,
                use_scalar: true,
                ..opts_for(NetworkAlgo::Loha)
            },
            "loha_tucker_scalar",
        ),
        (
            NetworkAlgo::Lokr,
            NetworkOptions {
                use_tucker: true,
                factor: 4,
                ..opts_for(NetworkAlgo::Lokr)
            },
            "lokr_tucker_f4",
        ),
        (
            NetworkAlgo::Lokr,
            NetworkOptions {
                decompose_both: true,
                dim: 2,
                ..opts_for(NetworkAlgo::Lokr)
            },
            "lokr_both",
        ),
        (
            NetworkAlgo::Lokr,
            NetworkOptions {
                dora_wd: true,
                ..opts_for(NetworkAlgo::Lokr)
            },
            "lokr_dora",
        ),
        (
            NetworkAlgo::Ia3,
            NetworkOptions {
                train_on_input: true,
                ..opts_for(NetworkAlgo::Ia3)
            },
            "ia3_in",
        ),
        (
            NetworkAlgo::DiagOft,
            NetworkOptions {
                rescaled: true,
                constraint: 0.01,
                ..opts_for(NetworkAlgo::DiagOft)
            },
            "oft_resc",
        ),
        (
            NetworkAlgo::Glora,
            NetworkOptions {
                use_scalar: true,
                ..opts_for(NetworkAlgo::Glora)
            },
            "glora_scalar",
        ),
        (
            NetworkAlgo::Abba,
            NetworkOptions {
                use_scalar: true,
                ..opts_for(NetworkAlgo::Abba)
            },
            "abba_scalar",
        ),
    ];
    for (algo, o, tag) in cases {
        round_trip(algo, &o, tag, None);
    }
    round_trip(
        NetworkAlgo::Lora,
        &opts_for(NetworkAlgo::Lora),
        "lora_f16",
        Some(DType::F16),
    );
    round_trip(
        NetworkAlgo::Loha,
        &opts_for(NetworkAlgo::Loha),
        "loha_bf16",
        Some(DType::BF16),
    );
}

#[test]
fn dora_orientation_and_tucker_are_recovered() {
    let dir = tmpdir("dora");
    let base = conv_base(8, 16, 3, 1, 1, false, 9).unwrap();
    for (on_output, tucker) in [(true, false), (false, true)] {
        let o = NetworkOptions {
            dora_wd: true,
            wd_on_output: on_output,
            use_tucker: tucker,
            ..opts_for(NetworkAlgo::LycorisLocon)
        };
        let a = build_adapter(NetworkAlgo::LycorisLocon, &o, &base, CONV).unwrap();
        let p = dir.join(format!("d{on_output}.safetensors"));
        save_network(
            &p,
            &[(CONV.to_string(), a.as_ref())],
            &NetworkMetadata::for_network(NetworkAlgo::LycorisLocon, &o),
            None,
        )
        .unwrap();
        let f = LoraFile::load(&p).unwrap();
        let m = &f.modules[0];
        assert!(m.dora);
        assert_eq!(m.wd_on_output, Some(on_output));
        assert_eq!(m.tucker, tucker);
        assert_eq!((m.rank, m.alpha), (Some(4), Some(2.0)));
        assert_eq!(m.weight_shape, vec![16, 8, 3, 3]);
    }
}

fn fixture_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/networks/files")
}

#[test]
fn lycoris_written_fixtures_give_the_expected_delta() {
    let dir = fixture_dir();
    let Ok(entries) = std::fs::read_dir(&dir) else {
        eprintln!("no fixtures at {} — skipped", dir.display());
        return;
    };
    let mut names: Vec<String> = entries
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|n| n.ends_with(".safetensors") && !n.ends_with(".expected.safetensors"))
        .collect();
    names.sort();
    let mut checked = 0;
    let mut multiplier_checks = 0;
    for n in &names {
        let stem = n.trim_end_matches(".safetensors");
        let exp_path = dir.join(format!("{stem}.expected.safetensors"));
        if !exp_path.exists() {
            continue;
        }
        let f = LoraFile::load(&dir.join(n)).unwrap_or_else(|e| panic!("{n}: {e:#}"));
        let exp = candle_core::safetensors::load(&exp_path, &candle_core::Device::Cpu).unwrap();
        for m in &f.modules {
            let w = &exp[&format!("{}.org.weight", m.name)];
            let b = exp.get(&format!("{}.org.bias", m.name)).cloned();
            let base = match w.rank() {
                1 => {
                    let c = w.dims()[0];
                    BaseLayer {
                        kind: LayerKind::LayerNorm {
                            features: c,
                            eps: 1e-5,
                        },
                        weight: w.clone(),
                        bias: b,
                    }
                }
                2 => BaseLayer::linear(w.clone(), b).unwrap(),
                _ => BaseLayer::conv2d(w.clone(), b, 1, 0).unwrap(),
            };
            let d = m
                .delta(Some(&base))
                .unwrap_or_else(|e| panic!("{n} {}: {e:#}", m.name));
            let want = &exp[&format!("{}.dw", m.name)];
            assert_rel(&d.dw, want, 1e-5, &format!("{n} {} ΔW", m.name));
            if let Some(db) = exp.get(&format!("{}.db", m.name)) {
                assert_rel(
                    d.db.as_ref().expect("Δb"),
                    db,
                    1e-5,
                    &format!("{n} {} Δb", m.name),
                );
            }
            // W′ at strengths ≠ 1, where LyCORIS applies them inside the math (DoRA, OFT).
            for mult in [0.5, 1.5] {
                let Some(merged) = exp.get(&format!("{}.merged_m{mult}", m.name)) else { continue };
                assert!(m.multiplier_is_nonlinear(), "{n} {}: recorded at m={mult} but applied linearly", m.name);
                let d = m.delta_at(Some(&base), mult, MultiplierRule::Lycoris).unwrap();
                let want = (merged - w).unwrap();
                assert_rel(&d.dw, &want, 1e-5, &format!("{n} {} W′ at m={mult}", m.name));
                // The linear rule is m·ΔW(1) — and it differs, which is why the rule exists.
                let lin = m.delta_at(Some(&base), mult, MultiplierRule::Linear).unwrap();
                assert_rel(&lin.dw, &(exp[&format!("{}.dw", m.name)].clone() * mult).unwrap(), 1e-6, &format!("{n} {} linear m={mult}", m.name));
                let gap = (&lin.dw - &want).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
                let scale = want.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
                assert!(gap > 1e-4 * scale, "{n} {}: the two rules agree at m={mult}", m.name);
                multiplier_checks += 1;
            }
            if !m.needs_base() {
                let d0 = m.delta(None).unwrap();
                assert_rel(
                    &d0.dw.reshape(want.dims()).unwrap(),
                    want,
                    1e-5,
                    &format!("{n} {} ΔW w/o base", m.name),
                );
            }
            checked += 1;
        }
        // Detection agrees with the algorithm the fixture was made with.
        let algo = f
            .metadata
            .get("loft_fixture_algo")
            .cloned()
            .unwrap_or_default();
        let want_algo = |m: &LoadedModule| -> bool {
            match algo.as_str() {
                "lora" => m.algo == FileAlgo::Lora,
                "locon" => matches!(m.algo, FileAlgo::Lora | FileAlgo::Locon),
                "lycoris_locon" => m.algo == FileAlgo::LycorisLocon,
                "train_norm" => m.algo == FileAlgo::Norm,
                other => {
                    m.algo.network_algo().map(|a| a.name()) == Some(other)
                        || (other == "dylora" && m.algo == FileAlgo::Dylora)
                }
            }
        };
        for m in &f.modules {
            assert!(want_algo(m), "{n}: {} detected as {:?}", m.name, m.algo);
        }
    }
    eprintln!("checked {checked} fixture modules in {} files, {multiplier_checks} at strengths ≠ 1", names.len());
    // DoRA, DIAG-OFT and BOFT files, 4 layers each, at two strengths.
    assert_eq!(multiplier_checks, 3 * 4 * 2, "the fixtures record W′ at m = 0.5 and 1.5");
}

fn assert_rel(a: &Tensor, b: &Tensor, tol: f64, what: &str) {
    assert_eq!(a.dims(), b.dims(), "{what}: shapes differ");
    let a = a
        .to_dtype(DType::F64)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f64>()
        .unwrap();
    let b = b
        .to_dtype(DType::F64)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f64>()
        .unwrap();
    let diff = a
        .iter()
        .zip(&b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f64::max);
    let scale = b.iter().map(|x| x.abs()).fold(0.0, f64::max).max(1e-6);
    assert!(diff / scale <= tol, "{what}: rel err {:e}", diff / scale);
}

fn write_raw(dir: &Path, name: &str, tensors: Vec<(&str, Tensor)>) -> PathBuf {
    let p = dir.join(name);
    let t: Vec<(String, Tensor)> = tensors
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
    save_tensors(&p, &t, &BTreeMap::new()).unwrap();
    p
}

#[test]
fn corrupt_and_inconsistent_files_give_named_errors() {
    let dir = tmpdir("bad");
    let dev = candle_core::Device::Cpu;
    let z = |s: &[usize]| Tensor::zeros(s, DType::F32, &dev).unwrap();
    // Missing file.
    let e = format!(
        "{:#}",
        LoraFile::load(&dir.join("nope.safetensors")).unwrap_err()
    );
    assert!(e.contains("nope.safetensors"), "{e}");
    // A good file, then truncated and with a garbage header.
    let good = write_raw(
        &dir,
        "good.safetensors",
        vec![
            (&format!("{Q}.lora_down.weight"), z(&[4, 12])),
            (&format!("{Q}.lora_up.weight"), z(&[16, 4])),
            (&format!("{Q}.alpha"), Tensor::new(2f32, &dev).unwrap()),
        ],
    );
    let bytes = std::fs::read(&good).unwrap();
    assert_eq!(
        LoraFile::load(&good).unwrap().modules[0].algo,
        FileAlgo::Lora
    );
    for (name, data) in [
        ("trunc.safetensors", bytes[..bytes.len() - 10].to_vec()),
        ("short.safetensors", bytes[..5].to_vec()),
        ("header.safetensors", {
            let mut b = bytes.clone();
            b[10] = b'#';
            b
        }),
        ("huge.safetensors", {
            let mut b = bytes.clone();
            b[..8].copy_from_slice(&u64::MAX.to_le_bytes());
            b
        }),
        ("empty.safetensors", vec![]),
    ] {
        let p = dir.join(name);
        std::fs::write(&p, data).unwrap();
        let e = format!("{:#}", LoraFile::load(&p).unwrap_err());
        assert!(e.contains(name), "{name}: {e}");
    }
    // Missing tensor.
    let p = write_raw(
        &dir,
        "miss.safetensors",
        vec![(&format!("{Q}.lora_down.weight"), z(&[4, 12]))],
    );
    let e = format!("{:#}", LoraFile::load(&p).unwrap_err());
    assert!(
        e.contains(&format!("{Q}.lora_up.weight")) && e.contains("missing"),
        "{e}"
    );
    // Wrong shape.
    let p = write_raw(
        &dir,
        "shape.safetensors",
        vec![
            (&format!("{Q}.lora_down.weight"), z(&[4, 12])),
            (&format!("{Q}.lora_up.weight"), z(&[16, 3])),
        ],
    );
    let e = format!("{:#}", LoraFile::load(&p).unwrap_err());
    assert!(
        e.contains(&format!("{Q}.lora_up.weight")) && e.contains("shape"),
        "{e}"
    );
    // Unknown layout and unknown extra tensor.
    let p = write_raw(
        &dir,
        "unknown.safetensors",
        vec![(&format!("{Q}.mystery"), z(&[3]))],
    );
    let e = format!("{:#}", LoraFile::load(&p).unwrap_err());
    assert!(
        e.contains(&format!("{Q}.mystery")) && e.contains("unknown"),
        "{e}"
    );
    let p = write_raw(
        &dir,
        "extra.safetensors",
        vec![
            (&format!("{Q}.hada_w1_a"), z(&[16, 4])),
            (&format!("{Q}.hada_w1_b"), z(&[4, 12])),
            (&format!("{Q}.hada_w2_a"), z(&[16, 4])),
            (&format!("{Q}.hada_w2_b"), z(&[4, 12])),
            (&format!("{Q}.lora_mid.weight"), z(&[4])),
        ],
    );
    let e = format!("{:#}", LoraFile::load(&p).unwrap_err());
    assert!(e.contains(&format!("{Q}.lora_mid.weight")), "{e}");
    // Wrong OFT dimensionality.
    let p = write_raw(
        &dir,
        "oft.safetensors",
        vec![(&format!("{Q}.oft_blocks"), z(&[4, 4]))],
    );
    let e = format!("{:#}", LoraFile::load(&p).unwrap_err());
    assert!(e.contains(&format!("{Q}.oft_blocks")), "{e}");
    // A key without a module prefix.
    let p = write_raw(&dir, "flat.safetensors", vec![("alpha", z(&[]))]);
    let e = format!("{:#}", LoraFile::load(&p).unwrap_err());
    assert!(e.contains("`alpha`"), "{e}");
    // A base that does not fit is an error naming the module, not a panic.
    let f = LoraFile::load(&good).unwrap();
    let wrong = linear_base(7, 16, false, 1).unwrap();
    let e = format!("{:#}", f.modules[0].delta(Some(&wrong)).unwrap_err());
    assert!(e.contains(Q), "{e}");
}

#[test]
fn module_groups() {
    assert_eq!(module_group(Q), ("unet".into(), "down_blocks_0".into()));
    assert_eq!(
        module_group("lora_unet_mid_block_attentions_0_proj_in"),
        ("unet".into(), "mid_block".into())
    );
    assert_eq!(
        module_group("lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q"),
        ("unet".into(), "input_blocks_4".into())
    );
    assert_eq!(
        module_group("lora_te1_text_model_encoder_layers_11_self_attn_q_proj"),
        ("te1".into(), "layers_11".into())
    );
    assert_eq!(
        module_group("lora_te_text_model_encoder_layers_0_mlp_fc1"),
        ("te".into(), "layers_0".into())
    );
    assert_eq!(
        module_group("lora_unet_conv_in"),
        ("unet".into(), "conv_in".into())
    );
}
