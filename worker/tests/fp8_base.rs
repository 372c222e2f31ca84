//! `fp8_base`: the frozen U-Net and text encoders keep their Linear/Conv2d weights as float8
//! e4m3 and compute in fp16; runs of every adapter family train on them, close to fp16 runs.

mod common;

use candle_core::{DType, Device, Tensor};
use common::tiny_run::{config, fixture, refusal, train};
use loft_worker::models::pipeline::StableDiffusion;
use loft_worker::models::ModelLayers;
use loft_worker::networks::NetworkAlgo;
use loft_worker::train::TrainConfig;

#[test]
fn frozen_weights_are_fp8_and_the_model_still_predicts() {
    let model = StableDiffusion::load(&fixture("tiny-sd15"), DType::F16, &Device::Cpu).unwrap();
    let x = Tensor::randn(0f32, 1.0, (1, 4, 8, 8), &Device::Cpu).unwrap().to_dtype(DType::F16).unwrap();
    let hidden = model.encode_prompts(&["a photo".to_string()], 1, 75).unwrap().hidden;
    let ts = Tensor::new(&[500f32], &Device::Cpu).unwrap();
    let before = model.unet().forward(&x, &ts, &hidden, None).unwrap().to_dtype(DType::F32).unwrap();
    let n = model.store_frozen_weights_in(DType::F8E4M3).unwrap();
    let linear_or_conv = model.unet().layers().iter().chain(model.text_encoders[0].layers()).filter(|l| l.is_linear() || l.is_conv()).count();
    assert_eq!(n, linear_or_conv);
    for l in model.unet().layers() {
        let expected = if l.is_linear() || l.is_conv() { DType::F8E4M3 } else { DType::F16 };
        assert_eq!(l.base().weight.dtype(), expected, "{}", l.name());
    }
    let hidden = model.encode_prompts(&["a photo".to_string()], 1, 75).unwrap().hidden;
    let after = model.unet().forward(&x, &ts, &hidden, None).unwrap().to_dtype(DType::F32).unwrap();
    let rel = ((&after - &before).unwrap().sqr().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap()
        / before.sqr().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap())
    .sqrt();
    // e4m3 keeps 3 mantissa bits: a few per cent, not garbage.
    assert!(rel > 0.0 && rel < 0.15, "relative change {rel}");
}

#[test]
fn runs_train_on_an_fp8_base() {
    let tmp = tempfile::tempdir().unwrap();
    for algo in [NetworkAlgo::Lora, NetworkAlgo::Loha, NetworkAlgo::Lokr, NetworkAlgo::Full] {
        let fp16 = TrainConfig { mixed_precision: "fp16".into(), max_train_steps: 2, ..config(tmp.path(), algo) };
        let base = train(&fp16).1;
        let fp8 = train(&TrainConfig { fp8_base: true, ..fp16.clone() }).1;
        assert!(fp8.iter().all(|l| l.is_finite()), "{algo:?}: {fp8:?}");
        assert!((fp8[0] - base[0]).abs() < 0.1 * base[0], "{algo:?}: first loss {} vs fp16 {}", fp8[0], base[0]);
        assert_ne!(fp8, base, "{algo:?}: the weights really are fp8");
    }
    let err = refusal(&TrainConfig { fp8_base: true, mixed_precision: "no".into(), ..config(tmp.path(), NetworkAlgo::Lora) });
    assert!(err.contains("fp8_base") && err.contains("mixed_precision"), "{err}");
}
