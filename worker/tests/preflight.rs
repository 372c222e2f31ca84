//! The pre-flight names every image a run would drop or change, and its buckets and steps per
//! epoch are the ones the real run then uses.

mod common;

use common::tiny_run::base;
use loft_worker::networks::NetworkAlgo;
use loft_worker::train::preflight::preflight;
use loft_worker::train::{run, CancelToken, EventLog, RunOptions, TrainConfig, TrainEvent};

fn png(path: &std::path::Path, w: u32, h: u32) {
    image::RgbImage::from_fn(w, h, |x, y| image::Rgb([(x * 5) as u8, (y * 3) as u8, 77])).save(path).unwrap();
}

#[test]
fn names_what_is_dropped_and_agrees_with_the_run() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let a = data.join("3_shapes");
    let b = data.join("2_wide");
    std::fs::create_dir_all(&a).unwrap();
    std::fs::create_dir_all(&b).unwrap();
    std::fs::create_dir_all(data.join("notes")).unwrap();
    for (i, (w, h)) in [(32, 32), (40, 32), (32, 32)].into_iter().enumerate() {
        png(&a.join(format!("img{i}.png")), w, h);
        std::fs::write(a.join(format!("img{i}.txt")), "a shape").unwrap();
    }
    png(&b.join("wide.png"), 64, 24);
    png(&b.join("small.png"), 12, 12);
    std::fs::write(b.join("notes.png"), b"not an image").unwrap();
    // A PNG cut short: its header reads, the decode would fail or guess.
    let mut bytes = vec![];
    image::RgbImage::from_pixel(32, 32, image::Rgb([1, 2, 3])).write_to(&mut std::io::Cursor::new(&mut bytes), image::ImageFormat::Png).unwrap();
    std::fs::write(b.join("cut.png"), &bytes[..bytes.len() - 16]).unwrap();

    let cfg = TrainConfig { device: "cpu".into(), train_batch_size: 2, enable_bucket: true, max_train_epochs: 1, ..base(tmp.path(), tmp.path().join("data"), NetworkAlgo::Lora) };
    let p = preflight(&cfg).unwrap();
    println!("{}", p.summary());
    let reason = |f: &str| p.dropped.iter().chain(&p.adjusted).filter(|n| n.file.ends_with(f)).map(|n| n.reason.clone()).collect::<Vec<_>>().join("; ");
    assert!(reason("notes").contains("repeat count"), "{p:?}");
    assert!(reason("notes.png").contains("not a readable image"), "{p:?}");
    assert!(reason("cut.png").contains("truncated"), "{p:?}");
    assert!(reason("small.png").contains("upscaled"), "{}", reason("small.png"));
    assert!(reason("wide.png").contains("no caption file") && reason("wide.png").contains("cropped"), "{}", reason("wide.png"));
    assert_eq!(p.dropped.len(), 3);
    assert_eq!((p.images, p.samples_per_epoch), (5, 3 * 3 + 2 * 2));
    assert!(p.buckets.iter().any(|b| b.remainder == 1), "an odd bucket leaves a smaller last batch: {:?}", p.buckets);

    // The real run (skipping the unreadable images) builds the same epoch.
    let run_cfg = TrainConfig { skip_bad_images: true, max_train_epochs: 1, ..cfg.clone() };
    // The truncated PNG is a decode error in the run, not a header error: leave it out here.
    std::fs::remove_file(b.join("cut.png")).unwrap();
    let mut events = EventLog::default();
    run(&run_cfg, &RunOptions::default(), &mut events, &CancelToken::new()).unwrap();
    let (steps_per_epoch, images) = events.0.iter().find_map(|e| if let TrainEvent::Started { steps_per_epoch, images, .. } = e { Some((*steps_per_epoch, *images)) } else { None }).unwrap();
    assert_eq!((steps_per_epoch, images), (p.steps_per_epoch, p.images));
}

#[test]
fn an_empty_dataset_is_not_usable() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data/5_empty");
    std::fs::create_dir_all(&data).unwrap();
    std::fs::write(data.join("broken.jpg"), b"nope").unwrap();
    let cfg = TrainConfig { ..base(tmp.path(), tmp.path().join("data"), NetworkAlgo::Lora) };
    let p = preflight(&cfg).unwrap();
    assert!(!p.usable());
    assert_eq!((p.images, p.steps_per_epoch, p.total_steps), (0, 0, 0));
    assert_eq!(p.dropped.len(), 1);
}
