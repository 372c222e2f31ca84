//! WD14 tagging: Loft's preprocessing and tract against onnxruntime on the reference
//! preprocessing (`tests/parity/make_tagger_fixtures.py`, committed outputs), the reference
//! thresholds and tag order, and a tagging run over a folder that writes, merges, is
//! cancelled and resumes.

use std::path::{Path, PathBuf};

use loft_worker::tagger::{tag_folder, TagOptions, Tagger};
use loft_worker::train::{CancelToken, EventLog, EventSink, TrainEvent};
use serde_json::Value;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/tagger")
}

fn expected() -> Value {
    serde_json::from_str(&std::fs::read_to_string(fixtures().join("expected.json")).unwrap()).unwrap()
}

/// Probabilities must equal onnxruntime's on the reference preprocessing to float precision.
/// (The resized images — the tall one, the gradient for the 64×64 model — go through PIL's
/// bicubic there and the image crate's Catmull-Rom here; the tiny tagger averages over the image,
/// so the two kernels' differences on edge pixels stay far below this.)
const TOLERANCE: f32 = 1e-5;

#[test]
fn probabilities_and_tags_match_the_reference() {
    let want = expected();
    for (model, size) in [("tiny-wd14", 448), ("tiny-wd14-64", 64)] {
        let tagger = Tagger::load(&fixtures().join(model)).unwrap();
        assert_eq!(tagger.size, size, "the input size is read from the model");
        for (file, case) in want["images"][model].as_object().unwrap() {
            let image = image::open(fixtures().join("images").join(file)).unwrap();
            let probs = tagger.probabilities(tagger.preprocess(&image)).unwrap();
            let reference: Vec<f32> = case["probs"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap() as f32).collect();
            let err = probs.iter().zip(&reference).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
            println!("{model:13} {file:16} max |tract − onnxruntime| = {err:.2e}");
            assert!(err <= TOLERANCE, "{model} {file}: {err} ({probs:?} vs {reference:?})");
            let tags = tagger.tags(&probs, &TagOptions::default());
            let ref_tags: Vec<String> = case["tags"].as_array().unwrap().iter().map(|t| t.as_str().unwrap().to_string()).collect();
            assert_eq!(tags, ref_tags, "{model} {file}");
            let lower = TagOptions { character_threshold: 0.75, ..TagOptions::default() };
            let ref_tags: Vec<String> = case["tags_character_0.75"].as_array().unwrap().iter().map(|t| t.as_str().unwrap().to_string()).collect();
            assert_eq!(tagger.tags(&probs, &lower), ref_tags, "{model} {file} at character 0.75");
        }
    }
}

#[test]
fn what_the_preprocessing_must_get_right() {
    // The flat-colour cases of the reference, as assertions: channel order, white padding, the
    // alpha channel composited on white, kaomoji and parentheses.
    let tagger = Tagger::load(&fixtures().join("tiny-wd14")).unwrap();
    let tags = |file: &str| tagger.tag_file(&fixtures().join("images").join(file), &TagOptions::default()).unwrap();
    assert_eq!(tags("red.png"), ["^_^", "red theme", "solo"], "red, read as BGR");
    assert_eq!(tags("blue.png"), ["blue theme", "star (sky)", "solo"]);
    assert_eq!(tags("green.png"), ["hatsune miku", "green theme", "solo"], "characters first");
    assert!(tags("tall-blue.png").contains(&"white background".to_string()), "padded with white");
    assert!(tags("transparent.png").contains(&"white background".to_string()), "transparent pixels are white");
    let opts = TagOptions { exclude: vec!["Star_(sky)".into(), "SOLO".into()], ..TagOptions::default() };
    assert_eq!(tagger.tag_file(&fixtures().join("images/blue.png"), &opts).unwrap(), ["blue theme"]);
    let e = Tagger::load(&fixtures().join("images")).err().unwrap().to_string();
    assert!(e.contains("model.onnx") && e.contains("selected_tags.csv"), "{e}");
}

/// Cancels after `n` images.
struct StopAfter<'a> {
    inner: EventLog,
    n: u64,
    cancel: &'a CancelToken,
}

impl EventSink for StopAfter<'_> {
    fn emit(&mut self, event: TrainEvent) {
        if let TrainEvent::Step { step, .. } = &event {
            if *step >= self.n {
                self.cancel.cancel();
            }
        }
        self.inner.emit(event);
    }
}

#[test]
fn a_folder_is_tagged_written_merged_cancelled_and_resumed() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("set");
    let sub = dir.join("10_ohwx");
    std::fs::create_dir_all(&sub).unwrap();
    for f in ["blue.png", "red.png", "green.png", "transparent.png"] {
        std::fs::copy(fixtures().join("images").join(f), sub.join(f)).unwrap();
    }
    std::fs::write(sub.join("red.txt"), "my own tag, red theme\n").unwrap();
    let model = fixtures().join("tiny-wd14");
    let opts = TagOptions { trigger: "ohwx".into(), merge: true, ..TagOptions::default() };

    let cancel = CancelToken::new();
    let mut sink = StopAfter { inner: EventLog::default(), n: 2, cancel: &cancel };
    let outcome = tag_folder(&dir, &model, &opts, false, &mut sink, &cancel).unwrap();
    assert!(outcome.cancelled && outcome.final_step == 2, "{outcome:?}");
    assert!(dir.join(".loft-tagging.json").is_file(), "the progress is recorded");
    // The same settings again: the first two are skipped, the rest tagged.
    let mut log = EventLog::default();
    let outcome = tag_folder(&dir, &model, &opts, true, &mut log, &CancelToken::new()).unwrap();
    assert_eq!(outcome.final_step, 4);
    assert!(matches!(log.0.iter().find(|e| matches!(e, TrainEvent::Started { .. })), Some(TrainEvent::Started { start_step: 2, total_steps: 4, .. })));
    assert_eq!(log.0.iter().filter(|e| matches!(e, TrainEvent::Step { .. })).count(), 2);
    assert!(!dir.join(".loft-tagging.json").exists());
    let read = |f: &str| std::fs::read_to_string(sub.join(f)).unwrap();
    assert_eq!(read("blue.txt"), "ohwx, blue theme, star (sky), solo\n");
    assert_eq!(read("red.txt"), "ohwx, my own tag, red theme, ^_^, solo\n", "merged: the old tags first, none twice");
    assert_eq!(read("green.txt"), "ohwx, hatsune miku, green theme, solo\n");
    // Write mode replaces.
    let write = TagOptions { trigger: String::new(), merge: false, ..TagOptions::default() };
    tag_folder(&dir, &model, &write, false, &mut EventLog::default(), &CancelToken::new()).unwrap();
    assert_eq!(read("red.txt"), "^_^, red theme, solo\n");
    // A new run (not a resume) tags everything again, whatever an interrupted one left.
    let stop = CancelToken::new();
    let mut sink = StopAfter { inner: EventLog::default(), n: 1, cancel: &stop };
    tag_folder(&dir, &model, &write, false, &mut sink, &stop).unwrap();
    let mut log = EventLog::default();
    tag_folder(&dir, &model, &write, false, &mut log, &CancelToken::new()).unwrap();
    assert_eq!(log.0.iter().filter(|e| matches!(e, TrainEvent::Step { .. })).count(), 4);
    let e = tag_folder(&tmp.path().join("nothing-here"), &model, &write, false, &mut EventLog::default(), &CancelToken::new()).unwrap_err();
    assert!(format!("{e:#}").contains("nothing-here"), "{e:#}");
}
