#!/usr/bin/env python3
"""The reference side of `loft bench train` (run by the benchmark, never by the tests).

Times LoRA training steps with PyTorch + LyCORIS on the same model folder and shapes as
Loft's run: LoRA (rank R, alpha R) on kohya's targets (the Transformer2DModel linears and
1x1 convs of the UNet; with --text-encoder also the CLIP attention/MLP linears), AdamW
lr 1e-4 (torch's default foreach implementation), SDPA attention (diffusers' default
AttnProcessor2_0), latents from the VAE once (as cached latents), MSE on epsilon, random
timesteps and noise each step, gradient clipping at 1.0.

    python tests/parity/bench_train.py --model DIR --steps N --latent H W --batch B --rank R
        [--text-encoder] [--threads T] [--device cpu|cuda] [--dtype float32|bfloat16|float16]

Prints one JSON line: {"steps", "seconds", "s_per_step", "peak_rss_mb", "peak_vram_mb", "torch", "lycoris"}.
"""

import argparse
import json
import os
import resource
import time

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPTextModel

import lycoris
from lycoris import create_lycoris, LycorisNetwork


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--latent", type=int, nargs=2, required=True)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--text-encoder", action="store_true")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    dev = torch.device(a.device)
    dtype = getattr(torch, a.dtype)
    unet = UNet2DConditionModel.from_pretrained(a.model, subfolder="unet", torch_dtype=dtype).to(dev)
    te = CLIPTextModel.from_pretrained(os.path.join(a.model, "text_encoder"), dtype=dtype).to(dev)
    vae = AutoencoderKL.from_pretrained(a.model, subfolder="vae", torch_dtype=dtype).to(dev)
    unet.requires_grad_(False)
    te.requires_grad_(False)
    vae.requires_grad_(False)
    is_xl = unet.config.addition_embed_type == "text_time"
    # Token ids of a short prompt (BOS, words, EOS, padding): the content does not matter.
    ids = torch.full((a.batch, 77), 49407, dtype=torch.long, device=dev)
    ids[:, 0] = 49406
    ids[:, 1:6] = torch.tensor([320, 1125, 539, 320, 4642])
    with torch.no_grad():
        px = torch.rand(a.batch, 3, a.latent[0] * 8, a.latent[1] * 8, device=dev, dtype=dtype) * 2 - 1
        latents = vae.encode(px).latent_dist.sample() * vae.config.scaling_factor
    LycorisNetwork.apply_preset({"target_module": ["Transformer2DModel", "CLIPAttention", "CLIPMLP"], "enable_conv": True})
    net = create_lycoris(unet, 1.0, linear_dim=a.rank, linear_alpha=float(a.rank), algo="lora")
    net.apply_to()
    params = list(net.parameters())
    if a.text_encoder:
        te_net = create_lycoris(te, 1.0, linear_dim=a.rank, linear_alpha=float(a.rank), algo="lora")
        te_net.apply_to()
        params += list(te_net.parameters())
    for p in params:
        p.data = p.data.float()
    opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.01)
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, device=dev) ** 2
    ac = torch.cumprod(1 - betas, 0)
    hidden_fixed = None
    if not a.text_encoder:
        with torch.no_grad():
            hidden_fixed = te(ids)[0]
    added = None
    if is_xl:
        # SDXL's second encoder is not loaded: its pooled output and the size conditions as noise.
        pooled = torch.randn(a.batch, 1280, device=dev, dtype=dtype)
        hidden_fixed = None if a.text_encoder else torch.randn(a.batch, 77, 2048, device=dev, dtype=dtype)
        added = {"text_embeds": pooled, "time_ids": torch.tensor([[1024, 1024, 0, 0, 1024, 1024]] * a.batch, device=dev, dtype=dtype)}
    autocast = torch.autocast(dev.type, dtype=dtype) if dtype != torch.float32 else torch.autocast(dev.type, enabled=False)

    def step():
        noise = torch.randn_like(latents)
        t = torch.randint(0, 1000, (a.batch,), device=dev)
        al = ac[t].view(-1, 1, 1, 1).to(dtype)
        noisy = al.sqrt() * latents + (1 - al).sqrt() * noise
        with autocast:
            hidden = hidden_fixed if hidden_fixed is not None else te(ids)[0]
            if is_xl and hidden.shape[-1] != 2048:
                hidden = torch.cat([hidden, torch.zeros(*hidden.shape[:-1], 2048 - hidden.shape[-1], device=dev, dtype=hidden.dtype)], -1)
            pred = unet(noisy, t, hidden, added_cond_kwargs=added).sample
        loss = torch.nn.functional.mse_loss(pred.float(), noise.float())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize()

    for _ in range(2):  # warm-up, as Loft's timing starts after its first steps
        step()
    sync()
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(a.steps):
        step()
    sync()
    seconds = time.perf_counter() - start
    vram = torch.cuda.max_memory_reserved() / 2**20 if dev.type == "cuda" else 0.0
    print(json.dumps({"steps": a.steps, "seconds": seconds, "s_per_step": seconds / a.steps,
                      "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "peak_vram_mb": vram,
                      "torch": torch.__version__, "lycoris": getattr(lycoris, "__version__", "?")}))


if __name__ == "__main__":
    main()
