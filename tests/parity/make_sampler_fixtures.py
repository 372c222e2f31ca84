#!/usr/bin/env python3
"""Reference images for Loft's samplers (run by hand, never by CI).

    .venv-parity/bin/python tests/parity/make_sampler_fixtures.py

Runs diffusers' StableDiffusionPipeline on the tiny SD1.5 fixture with its DDIM scheduler and with
EulerDiscreteScheduler (same config: scaled-linear betas, "leading" spacing, steps_offset 1), from
fixed initial noise, 5 steps, guidance 7, and saves the noise and the decoded images (before
8-bit rounding) to tests/fixtures/models/sampler-ref.safetensors:
  noise (1,4,16,16); ddim.image, euler.image (1,3,32,32) in [0, 1].
"""

from pathlib import Path

import torch
from diffusers import DDIMScheduler, EulerDiscreteScheduler, StableDiffusionPipeline
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parents[2]
MODEL = ROOT / "tests" / "fixtures" / "models" / "tiny-sd15"
OUT = ROOT / "tests" / "fixtures" / "models" / "sampler-ref.safetensors"


def main():
    torch.manual_seed(20261129)
    pipe = StableDiffusionPipeline.from_pretrained(MODEL, safety_checker=None, requires_safety_checker=False).to(torch.float32)
    noise = torch.randn(1, 4, 16, 16)
    out = {"noise": noise.clone()}
    for name, cls in [("ddim", DDIMScheduler), ("euler", EulerDiscreteScheduler)]:
        pipe.scheduler = cls.from_config(pipe.scheduler.config)
        image = pipe("a photo of a cat", negative_prompt="", num_inference_steps=5, guidance_scale=7.0,
                     height=32, width=32, latents=noise.clone(), output_type="pt").images
        out[f"{name}.image"] = image.float().contiguous()
    save_file(out, OUT)
    print("wrote", OUT, {k: tuple(v.shape) for k, v in out.items()})


if __name__ == "__main__":
    main()
