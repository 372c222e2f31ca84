//! `loft train` and `loft sample` as a user runs them: a TOML config with the registry's keys
//! on the tiny fixture model and a generated dataset; bad configs refused by key before any
//! work; the trained file loads in `loft lora inspect` and changes what `loft sample` draws;
//! an interrupted run finishes with `--resume`.

use std::path::{Path, PathBuf};

mod common;

use common::{loft, text, tiny_model};

fn dataset(root: &Path) -> PathBuf {
    let sub = root.join("data/3_blob");
    std::fs::create_dir_all(&sub).unwrap();
    for i in 0..3u8 {
        let img = image::RgbImage::from_fn(40, 32, |x, y| image::Rgb([(x * 6) as u8, (y * 7) as u8, 80 * i]));
        img.save(sub.join(format!("{i}.png"))).unwrap();
        std::fs::write(sub.join(format!("{i}.txt")), format!("blob, picture {i}")).unwrap();
    }
    root.join("data")
}

fn write_config(root: &Path, extra: &str) -> PathBuf {
    let path = root.join("job.toml");
    let config = format!(
        r#"
pretrained_model_name_or_path = "{model}"
train_data_dir = "{data}"
output_dir = "{out}"
output_name = "blob"
resolution = 32
min_bucket_reso = 16
max_bucket_reso = 64
bucket_reso_steps = 8
network_dim = 4
network_alpha = 4
learning_rate = 0.01
max_train_epochs = 2
save_every_n_epochs = 1
save_precision = "float"
sample_prompts = "blob --w 32 --h 32 --s 4 --d 3"
sample_every_n_epochs = 1
{extra}
"#,
        model = tiny_model().display(),
        data = dataset(root).display(),
        out = root.join("out").display(),
    );
    std::fs::write(&path, config).unwrap();
    path
}

#[test]
fn train_refuses_bad_configs_by_key_before_any_work() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = write_config(tmp.path(), "train_batch_size = 0\nmasked_loss = true\nno_such_option = 1\n");
    let o = loft(&["train", cfg.to_str().unwrap()]);
    assert!(!o.status.success());
    let t = text(&o);
    assert!(t.contains("train_batch_size"), "{t}");
    assert!(t.contains("no_such_option"), "{t}");
    assert!(t.contains("nothing was run"), "{t}");
    assert!(!tmp.path().join("out").exists(), "nothing written");
    let o = loft(&["train", tmp.path().join("missing.toml").to_str().unwrap()]);
    assert!(text(&o).contains("missing.toml"));
}

#[test]
fn train_then_inspect_then_sample_with_the_lora() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = write_config(tmp.path(), "");
    let o = loft(&["train", cfg.to_str().unwrap()]);
    assert!(o.status.success(), "{}", text(&o));
    let out = tmp.path().join("out");
    let file = out.join("blob.safetensors");
    assert!(file.is_file(), "{}", text(&o));
    assert!(out.join("blob-000001.safetensors").is_file(), "epoch 1 file");
    let samples: Vec<_> = std::fs::read_dir(out.join("sample")).unwrap().collect();
    assert_eq!(samples.len(), 2, "one sample per epoch");

    let o = loft(&["lora", "inspect", file.to_str().unwrap()]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("lora"), "{}", text(&o));

    let plain = tmp.path().join("plain.png");
    let with = tmp.path().join("with.png");
    let model = tiny_model();
    let common = ["sample", "--model", model.to_str().unwrap(), "--prompt", "blob", "--steps", "4", "--seed", "1", "--width", "32", "--height", "32"];
    let o = loft(&[&common[..], &["--out", plain.to_str().unwrap()]].concat());
    assert!(o.status.success(), "{}", text(&o));
    let lora = format!("{}:1.0", file.display());
    let o = loft(&[&common[..], &["--lora", &lora, "--sampler", "ddim", "--out", with.to_str().unwrap()]].concat());
    assert!(o.status.success(), "{}", text(&o));
    let o = loft(&[&common[..], &["--sampler", "ddim", "--out", tmp.path().join("plain-ddim.png").to_str().unwrap()]].concat());
    assert!(o.status.success(), "{}", text(&o));
    let a = image::open(tmp.path().join("plain-ddim.png")).unwrap().to_rgb8();
    let b = image::open(&with).unwrap().to_rgb8();
    assert_eq!(a.dimensions(), (32, 32));
    assert_ne!(a.as_raw(), b.as_raw(), "the LoRA changes the picture");
    assert!(image::open(&plain).is_ok());

    // The trained file merges into the base model, and the merged model draws what the model
    // with the LoRA applied draws.
    let merged = tmp.path().join("merged");
    let o = loft(&["lora", "merge", "--base", model.to_str().unwrap(), "--lora", file.to_str().unwrap(), "--out", merged.to_str().unwrap()]);
    assert!(o.status.success(), "{}", text(&o));
    let via_merge = tmp.path().join("via-merge.png");
    let merged_args = ["sample", "--model", merged.to_str().unwrap(), "--prompt", "blob", "--steps", "4", "--seed", "1", "--width", "32", "--height", "32"];
    let o = loft(&[&merged_args[..], &["--sampler", "ddim", "--out", via_merge.to_str().unwrap()]].concat());
    assert!(o.status.success(), "{}", text(&o));
    let c = image::open(&via_merge).unwrap().to_rgb8();
    let max_diff = b.as_raw().iter().zip(c.as_raw()).map(|(x, y)| (*x as i32 - *y as i32).abs()).max().unwrap();
    assert!(max_diff <= 2, "merged vs applied differ by {max_diff}/255");
}

/// Flux as a user runs it: `loft train` on the tiny Flux dev folder with samples, `loft lora
/// inspect` on the result, `loft lora merge` into BFL's single-file transformer, and `loft
/// sample` drawing the same picture from the merged file as from the base with the LoRA.
#[test]
fn flux_train_inspect_merge_and_sample() {
    let tmp = tempfile::tempdir().unwrap();
    let fixtures = tiny_model().parent().unwrap().to_path_buf();
    let dev = fixtures.join("tiny-flux-dev");
    let path = tmp.path().join("job.toml");
    std::fs::write(
        &path,
        format!(
            r#"
model_family = "flux_dev"
pretrained_model_name_or_path = "{model}"
train_data_dir = "{data}"
output_dir = "{out}"
output_name = "fluxblob"
resolution = 32
min_bucket_reso = 16
max_bucket_reso = 64
bucket_reso_steps = 16
network_dim = 4
network_alpha = 4
learning_rate = 0.01
max_train_epochs = 2
t5xxl_max_token_length = 16
network_train_unet_only = true
save_precision = "float"
sample_prompts = "blob --w 32 --h 32 --s 3 --d 3 --g 3.5"
sample_every_n_epochs = 1
"#,
            model = dev.display(),
            data = dataset(tmp.path()).display(),
            out = tmp.path().join("out").display()
        ),
    )
    .unwrap();
    let o = loft(&["train", path.to_str().unwrap()]);
    assert!(o.status.success(), "{}", text(&o));
    let file = tmp.path().join("out/fluxblob.safetensors");
    assert!(file.is_file());
    assert_eq!(std::fs::read_dir(tmp.path().join("out/sample")).unwrap().count(), 2, "one sample per epoch");
    let o = loft(&["lora", "inspect", file.to_str().unwrap()]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("flux1"), "{}", text(&o));
    // Resize to rank 2, and convert the LoKr-free file back to a plain LoRA at rank 2 against
    // the BFL base: both read and write Flux names.
    let resized = tmp.path().join("resized.safetensors");
    let o = loft(&["lora", "resize", file.to_str().unwrap(), "--rank", "2", "--out", resized.to_str().unwrap()]);
    assert!(o.status.success(), "{}", text(&o));
    let converted = tmp.path().join("converted.safetensors");
    let o = loft(&["lora", "convert", file.to_str().unwrap(), "--to", "lora", "--rank", "2", "--base", fixtures.join("tiny-flux-dev.safetensors").to_str().unwrap(), "--out", converted.to_str().unwrap()]);
    assert!(o.status.success(), "{}", text(&o));
    for f in [&resized, &converted] {
        let o = loft(&["lora", "inspect", f.to_str().unwrap()]);
        assert!(o.status.success() && text(&o).contains("double_blocks_0") && text(&o).contains("networks.lora_flux"), "{}", text(&o));
    }

    // Merge into the BFL file (the transformer only: the run trained no text encoder); the
    // merged file needs the Flux folder beside it, as any BFL file.
    let merged = tmp.path().join("merged.safetensors");
    let o = loft(&["lora", "merge", "--base", fixtures.join("tiny-flux-dev.safetensors").to_str().unwrap(), "--lora", file.to_str().unwrap(), "--out", merged.to_str().unwrap()]);
    assert!(o.status.success(), "{}", text(&o));
    copy_dir(&dev, &tmp.path().join("merged"));
    std::fs::copy(fixtures.join("tiny-flux-dev.safetensors"), tmp.path().join("base.safetensors")).unwrap();
    copy_dir(&dev, &tmp.path().join("base"));
    let draw = |model: &Path, lora: Option<&Path>, out: &Path| {
        let mut args = vec!["sample".to_string(), "--model".into(), model.display().to_string(), "--prompt".into(), "blob".into(), "--steps".into(), "3".into(), "--seed".into(), "1".into(), "--width".into(), "32".into(), "--height".into(), "32".into(), "--out".into(), out.display().to_string()];
        if let Some(l) = lora {
            args.push("--lora".into());
            args.push(format!("{}:1.0", l.display()));
        }
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        let o = loft(&refs);
        assert!(o.status.success(), "{}", text(&o));
        image::open(out).unwrap().to_rgb8()
    };
    let plain = draw(&tmp.path().join("base.safetensors"), None, &tmp.path().join("plain.png"));
    let with = draw(&tmp.path().join("base.safetensors"), Some(&file), &tmp.path().join("with.png"));
    let via_merge = draw(&merged, None, &tmp.path().join("merged.png"));
    assert_eq!(plain.dimensions(), (32, 32));
    assert_ne!(plain.as_raw(), with.as_raw(), "the LoRA changes the picture");
    let max_diff = with.as_raw().iter().zip(via_merge.as_raw()).map(|(x, y)| (*x as i32 - *y as i32).abs()).max().unwrap();
    assert!(max_diff <= 2, "merged vs applied differ by {max_diff}/255");
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let dest = to.join(e.file_name());
        if e.path().is_dir() {
            copy_dir(&e.path(), &dest);
        } else {
            std::fs::copy(e.path(), dest).unwrap();
        }
    }
}
