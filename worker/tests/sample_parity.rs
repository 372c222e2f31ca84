//! Loft's samplers against diffusers' StableDiffusionPipeline (DDIM and EulerDiscrete, 5 steps,
//! guidance 7) on the tiny SD1.5 fixture from the same initial noise
//! (`tests/parity/make_sampler_fixtures.py`).

use std::path::Path;

use candle_core::{DType, Device};
use loft_worker::models::pipeline::StableDiffusion;
use loft_worker::noise::NoiseSchedule;
use loft_worker::sample::{sample_image_from_noise, SampleRequest, Sampler};

#[test]
fn ddim_and_euler_match_diffusers() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/models");
    let refs = candle_core::safetensors::load(root.join("sampler-ref.safetensors"), &Device::Cpu).unwrap();
    let model = StableDiffusion::load(&root.join("tiny-sd15"), DType::F32, &Device::Cpu).unwrap();
    let schedule = NoiseSchedule::new(&model.scheduler, false, false).unwrap();
    let req = SampleRequest { prompt: "a photo of a cat".into(), negative: String::new(), width: 32, height: 32, steps: 5, cfg: 7.0, seed: 0, guidance: 3.5 };
    for (name, sampler) in [("ddim", Sampler::Ddim), ("euler", Sampler::Euler)] {
        let image = sample_image_from_noise(&model, &schedule, sampler, &req, 1, refs["noise"].clone()).unwrap();
        let want = refs[&format!("{name}.image")].squeeze(0).unwrap();
        let err: f32 = (image - &want).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar().unwrap();
        assert!(err < 1e-4, "{name}: max abs difference {err}");
    }
}

/// f16 weights computed in f32 (half the memory): the same pictures within f16 rounding.
#[test]
fn half_weights_computed_in_f32_match() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/models");
    let refs = candle_core::safetensors::load(root.join("sampler-ref.safetensors"), &Device::Cpu).unwrap();
    let mut model = StableDiffusion::load(&root.join("tiny-sd15"), DType::F16, &Device::Cpu).unwrap();
    model.set_compute_dtype(DType::F32);
    assert_eq!(model.unet().dtype(), DType::F16, "weights stay f16");
    let schedule = NoiseSchedule::new(&model.scheduler, false, false).unwrap();
    let req = SampleRequest { prompt: "a photo of a cat".into(), negative: String::new(), width: 32, height: 32, steps: 5, cfg: 7.0, seed: 0, guidance: 3.5 };
    let image = sample_image_from_noise(&model, &schedule, Sampler::Euler, &req, 1, refs["noise"].clone()).unwrap();
    assert_eq!(image.dtype(), DType::F32);
    let want = refs["euler.image"].squeeze(0).unwrap();
    let err: f32 = (image - &want).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar().unwrap();
    assert!(err < 2e-2, "max abs difference {err}");
}
