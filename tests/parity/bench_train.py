#!/usr/bin/env python3
"""The reference side of `loft bench train` (run by the benchmark, never by the tests).

Times LoRA training steps on the tiny SD1.5 fixture with PyTorch + LyCORIS, shaped like
Loft's benchmark run: UNet-only LoRA (rank 4, alpha 4) on the Transformer2DModel linears and
1x1 convs (kohya's LoRA targets), AdamW lr 1e-4, batch 1, 64x64 images (8x8.. latents as the
fixture VAE gives), a frozen text encoder whose states are computed once, MSE on epsilon,
random timesteps and noise each step.

    python tests/parity/bench_train.py MODEL_DIR STEPS LATENT_H LATENT_W THREADS

Prints one JSON line: {"steps": N, "seconds": S, "it_per_sec": R, "torch": "...", "lycoris": "..."}.
"""

import json
import sys
import time

import torch
from diffusers import UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTokenizer

import lycoris
from lycoris import create_lycoris, LycorisNetwork


def main():
    model_dir, steps, lh, lw, threads = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    unet = UNet2DConditionModel.from_pretrained(model_dir, subfolder="unet").float()
    te = CLIPTextModel.from_pretrained(model_dir, subfolder="text_encoder").float()
    tok = CLIPTokenizer.from_pretrained(model_dir, subfolder="tokenizer")
    unet.requires_grad_(False)
    te.requires_grad_(False)
    ids = tok(["a photo of a shape"], padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    with torch.no_grad():
        hidden = te(ids)[0]
    # kohya LoRA targets: Linear and 1x1 Conv2d layers inside Transformer2DModel blocks.
    LycorisNetwork.apply_preset({"target_module": ["Transformer2DModel"], "enable_conv": True})
    net = create_lycoris(unet, 1.0, linear_dim=4, linear_alpha=4.0, algo="lora")
    net.apply_to()
    opt = torch.optim.AdamW(net.parameters(), lr=1e-4, weight_decay=0.01)
    latents = torch.randn(1, unet.config.in_channels, lh, lw)
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000) ** 2
    ac = torch.cumprod(1 - betas, 0)

    def step():
        noise = torch.randn_like(latents)
        t = torch.randint(0, 1000, (1,))
        a = ac[t].view(-1, 1, 1, 1)
        noisy = a.sqrt() * latents + (1 - a).sqrt() * noise
        pred = unet(noisy, t, hidden).sample
        loss = torch.nn.functional.mse_loss(pred, noise)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        opt.step()

    for _ in range(3):  # warm-up, as Loft's timing starts after its first steps
        step()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    seconds = time.perf_counter() - start
    print(json.dumps({"steps": steps, "seconds": seconds, "it_per_sec": steps / seconds,
                      "torch": torch.__version__, "lycoris": getattr(lycoris, "__version__", "?")}))


if __name__ == "__main__":
    main()
