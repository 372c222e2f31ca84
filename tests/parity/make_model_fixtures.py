#!/usr/bin/env python3
"""Parity fixtures for Loft's models (run by hand, never by CI).

    .venv-parity/bin/pip install -r tests/parity/requirements-models.txt
    .venv-parity/bin/python tests/parity/make_model_fixtures.py

Writes
  tests/fixtures/models/tiny-sd15/            a diffusers folder (model_index.json, unet/,
                                              text_encoder/, tokenizer/, vae/, scheduler/):
                                              a TINY random-weight SD1.5-architecture pipeline
  tests/fixtures/models/tiny-sd21-unet/       config.json + weights of a tiny SD2.x-style UNet
                                              (linear proj_in/out, per-block head counts,
                                              upcast_attention, 2 transformer layers per block)
  tests/fixtures/models/tiny-sdxl/            a tiny SDXL-architecture diffusers folder (two text
                                              encoders, text_time added conditions)
  tests/fixtures/models/tiny-sd15-ref.safetensors   inputs and reference outputs (f32)

Reference tensors (all f32; computed in float64 from the f32 weights, so the stored outputs
carry no reference-side rounding; the text encoder runs in f32 because transformers
cannot build CLIP's causal mask in float64):
  unet.sample (2,4,8,12), unet.timesteps (2,) per-sample, unet.encoder_hidden_states (2,9,32)
      -> unet.out
  unet21.sample / unet21.timesteps / unet21.encoder_hidden_states -> unet21.out
  te.input_ids (2,77) i64 (two prompts through the saved tokenizer, padded with <|endoftext|>)
      -> te.last_hidden_state, te.penultimate (hidden_states[-2], no final layer norm),
         te.pooled (pooler_output)
  unetxl.sample / timesteps / encoder_hidden_states (2,9,64) / text_embeds (2,32) / time_ids (2,6)
      -> unetxl.out
  te2.input_ids (2,77) (tokenizer_2, pads with "!") -> te2.last_hidden_state, te2.penultimate,
      te2.text_embeds (text_projection of the pooled output)
  vae.image (2,3,16,24) -> vae.encode_mean (latent_dist.mean)
  vae.latents (2,4,8,12) -> vae.decode

Versions are pinned in requirements-models.txt (transformers < 5: version 5 drops the
`text_model.` key prefix of CLIPTextModel).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

import diffusers
import transformers
from diffusers import (AutoencoderKL, DDIMScheduler, EulerDiscreteScheduler, StableDiffusionPipeline,
                       StableDiffusionXLPipeline, UNet2DConditionModel)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

ROOT = Path(__file__).resolve().parents[2]
OUT = ROOT / "tests" / "fixtures" / "models"
SEED = 20261101

PROMPTS = ["a photo of a cat", "the tiny dog at the sea, 4k"]


# ---------------------------------------------------------------------------------------------
# Tiny CLIP BPE tokenizer (same file format and algorithm as openai/clip-vit-large-patch14's)
# ---------------------------------------------------------------------------------------------

def bytes_to_unicode() -> dict[int, str]:
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(
        range(ord("®"), ord("ÿ") + 1)
    )
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs]))


# A few merges so that common words become one or two tokens (order matters: each merge's
# parts must exist when it applies).
MERGES = [
    ("t", "h"), ("th", "e</w>"), ("o", "f</w>"), ("a", "t</w>"), ("c", "at</w>"),
    ("p", "h"), ("ph", "o"), ("pho", "t"), ("phot", "o</w>"), ("d", "o"), ("do", "g</w>"),
    ("s", "e"), ("se", "a</w>"), ("t", "i"), ("ti", "n"), ("tin", "y</w>"), ("4", "k</w>"),
    ("i", "n</w>"), ("a", "n"), ("an", "d</w>"),
]


def write_tokenizer_files(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    b2u = list(bytes_to_unicode().values())
    vocab = b2u + [v + "</w>" for v in b2u]
    vocab += ["".join(m) for m in MERGES]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}, ensure_ascii=False))
    lines = ["#version: 0.2"] + [f"{a} {b}" for a, b in MERGES]
    (folder / "merges.txt").write_text("\n".join(lines) + "\n")


# ---------------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------------

def perturb_norms(model: torch.nn.Module, gen: torch.Generator) -> None:
    """Default init leaves norm weights at 1 and biases at 0; make them random so that a
    swapped weight/bias or a missing affine shows up in the outputs."""
    with torch.no_grad():
        for mod in model.modules():
            if isinstance(mod, (torch.nn.GroupNorm, torch.nn.LayerNorm)) and mod.weight is not None:
                mod.weight.copy_(1.0 + 0.1 * torch.randn(mod.weight.shape, generator=gen))
                mod.bias.copy_(0.1 * torch.randn(mod.bias.shape, generator=gen))


def tiny_unet(gen: torch.Generator) -> UNet2DConditionModel:
    unet = UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=(16, 32),
        layers_per_block=1,
        cross_attention_dim=32,
        attention_head_dim=4,  # diffusers reads this as the number of heads
        norm_num_groups=8,
    )
    perturb_norms(unet, gen)
    return unet


def tiny_unet_sd21(gen: torch.Generator) -> UNet2DConditionModel:
    unet = UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        mid_block_type="UNetMidBlock2DCrossAttn",
        block_out_channels=(8, 16),
        layers_per_block=1,
        transformer_layers_per_block=2,
        cross_attention_dim=24,
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        upcast_attention=True,
        norm_num_groups=4,
    )
    perturb_norms(unet, gen)
    return unet


def tiny_unet_sdxl(gen: torch.Generator) -> UNet2DConditionModel:
    # SDXL's structure in small: no attention in the first block, linear projections, a
    # transformer depth per block, cross-attention over both encoders' hidden states (32+32),
    # and the text_time added conditions (pooled te2 projection 32 + 6 time ids x 8).
    unet = UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(8, 16),
        layers_per_block=1,
        transformer_layers_per_block=(1, 2),
        cross_attention_dim=64,
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=32 + 6 * 8,
        norm_num_groups=4,
    )
    perturb_norms(unet, gen)
    return unet


def tiny_text_encoder(gen: torch.Generator, vocab_size: int, bos: int, eos: int, act: str = "quick_gelu",
                      with_projection: bool = False) -> CLIPTextModel:
    cfg = CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=77,
        hidden_act=act,
        layer_norm_eps=1e-5,
        projection_dim=32,
        bos_token_id=bos,
        eos_token_id=eos,
        pad_token_id=1,
    )
    te = CLIPTextModelWithProjection(cfg) if with_projection else CLIPTextModel(cfg)
    perturb_norms(te, gen)
    return te


def tiny_vae(gen: torch.Generator, scaling_factor: float = 0.18215) -> AutoencoderKL:
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(8, 16),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=4,
        sample_size=16,
        scaling_factor=scaling_factor,
    )
    perturb_norms(vae, gen)
    return vae


def f32(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to(torch.float32).contiguous()


def main() -> None:
    print(f"torch {torch.__version__}, diffusers {diffusers.__version__}, transformers {transformers.__version__}")
    if int(transformers.__version__.split(".")[0]) >= 5:
        sys.exit("transformers >= 5 renames the CLIP keys; install requirements-models.txt")
    torch.manual_seed(SEED)
    gen = torch.Generator().manual_seed(SEED)

    sd15 = OUT / "tiny-sd15"
    if sd15.exists():
        shutil.rmtree(sd15)
    tok_src = OUT / "_tokenizer_src"
    write_tokenizer_files(tok_src)
    tokenizer = CLIPTokenizer(
        str(tok_src / "vocab.json"), str(tok_src / "merges.txt"), model_max_length=77,
        pad_token="<|endoftext|>",
    )
    shutil.rmtree(tok_src)
    bos = tokenizer.convert_tokens_to_ids("<|startoftext|>")
    eos = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    assert eos == len(tokenizer) - 1, "eos must be the highest id (both CLIP pooling rules agree)"

    unet = tiny_unet(gen).eval()
    te = tiny_text_encoder(gen, len(tokenizer), bos, eos).eval()
    vae = tiny_vae(gen).eval()
    scheduler = DDIMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
        set_alpha_to_one=False, steps_offset=1, num_train_timesteps=1000,
    )
    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=te, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.save_pretrained(sd15, safe_serialization=True)

    unet21 = tiny_unet_sd21(gen).eval()
    u21 = OUT / "tiny-sd21-unet"
    if u21.exists():
        shutil.rmtree(u21)
    unet21.save_pretrained(u21, safe_serialization=True)

    # SDXL: CLIP-L-like te (quick_gelu) + OpenCLIP-bigG-like te2 (gelu, projection), the
    # second tokenizer pads with "!" as SDXL's does.
    sdxl = OUT / "tiny-sdxl"
    if sdxl.exists():
        shutil.rmtree(sdxl)
    tokenizer_2 = CLIPTokenizer.from_pretrained(sd15 / "tokenizer", pad_token="!")
    pipe_xl = StableDiffusionXLPipeline(
        vae=tiny_vae(gen, scaling_factor=0.13025).eval(),
        text_encoder=tiny_text_encoder(gen, len(tokenizer), bos, eos).eval(),
        text_encoder_2=tiny_text_encoder(gen, len(tokenizer), bos, eos, act="gelu", with_projection=True).eval(),
        tokenizer=tokenizer, tokenizer_2=tokenizer_2, unet=tiny_unet_sdxl(gen).eval(),
        scheduler=EulerDiscreteScheduler(
            beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1,
            num_train_timesteps=1000, timestep_spacing="leading",
        ),
    )
    pipe_xl.save_pretrained(sdxl, safe_serialization=True)

    # Reload from disk so the references come from exactly the stored f32 weights, then
    # compute in float64.
    unet = UNet2DConditionModel.from_pretrained(sd15 / "unet").double().eval()
    unet21 = UNet2DConditionModel.from_pretrained(u21).double().eval()
    # transformers' CLIP causal mask cannot be built in float64: the text encoder runs in f32.
    te = CLIPTextModel.from_pretrained(sd15 / "text_encoder").eval()
    vae = AutoencoderKL.from_pretrained(sd15 / "vae").double().eval()
    tokenizer = CLIPTokenizer.from_pretrained(sd15 / "tokenizer")

    ref: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        sample = torch.randn(2, 4, 8, 12, generator=gen)
        timesteps = torch.tensor([999.0, 10.0])
        enc = torch.randn(2, 9, 32, generator=gen)
        out = unet(sample.double(), timesteps.double(), encoder_hidden_states=enc.double()).sample
        ref.update({"unet.sample": sample, "unet.timesteps": timesteps, "unet.encoder_hidden_states": enc,
                    "unet.out": f32(out)})

        sample = torch.randn(2, 4, 8, 12, generator=gen)
        timesteps = torch.tensor([500.0, 1.0])
        enc = torch.randn(2, 5, 24, generator=gen)
        out = unet21(sample.double(), timesteps.double(), encoder_hidden_states=enc.double()).sample
        ref.update({"unet21.sample": sample, "unet21.timesteps": timesteps,
                    "unet21.encoder_hidden_states": enc, "unet21.out": f32(out)})

        ids = tokenizer(PROMPTS, padding="max_length", max_length=77, truncation=True,
                        return_tensors="pt").input_ids
        print("token ids:", [row[:12].tolist() for row in ids])
        o = te(ids, output_hidden_states=True)
        ref.update({"te.input_ids": ids.to(torch.int64), "te.last_hidden_state": f32(o.last_hidden_state),
                    "te.penultimate": f32(o.hidden_states[-2]), "te.pooled": f32(o.pooler_output)})

        unet_xl = UNet2DConditionModel.from_pretrained(sdxl / "unet").double().eval()
        sample = torch.randn(2, 4, 8, 12, generator=gen)
        timesteps = torch.tensor([750.0, 42.0])
        enc = torch.randn(2, 9, 64, generator=gen)
        text_embeds = torch.randn(2, 32, generator=gen)
        time_ids = torch.tensor([[64.0, 96.0, 0.0, 0.0, 64.0, 96.0], [1024.0, 1024.0, 16.0, 8.0, 1024.0, 1024.0]])
        out = unet_xl(sample.double(), timesteps.double(), encoder_hidden_states=enc.double(),
                      added_cond_kwargs={"text_embeds": text_embeds.double(), "time_ids": time_ids.double()}).sample
        ref.update({"unetxl.sample": sample, "unetxl.timesteps": timesteps, "unetxl.encoder_hidden_states": enc,
                    "unetxl.text_embeds": text_embeds, "unetxl.time_ids": time_ids, "unetxl.out": f32(out)})

        te2 = CLIPTextModelWithProjection.from_pretrained(sdxl / "text_encoder_2").eval()
        tok2 = CLIPTokenizer.from_pretrained(sdxl / "tokenizer_2")
        ids2 = tok2(PROMPTS, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
        o = te2(ids2, output_hidden_states=True)
        ref.update({"te2.input_ids": ids2.to(torch.int64), "te2.last_hidden_state": f32(o.last_hidden_state),
                    "te2.penultimate": f32(o.hidden_states[-2]), "te2.text_embeds": f32(o.text_embeds)})

        image = torch.rand(2, 3, 16, 24, generator=gen) * 2 - 1
        mean = vae.encode(image.double()).latent_dist.mean
        latents = torch.randn(2, 4, 8, 12, generator=gen)
        dec = vae.decode(latents.double()).sample
        ref.update({"vae.image": image, "vae.encode_mean": f32(mean), "vae.latents": latents,
                    "vae.decode": f32(dec)})

    ref = {k: v.contiguous() for k, v in ref.items()}
    save_file(ref, OUT / "tiny-sd15-ref.safetensors", metadata={
        "torch": torch.__version__, "diffusers": diffusers.__version__,
        "transformers": transformers.__version__, "prompts": json.dumps(PROMPTS),
    })
    for k, v in ref.items():
        print(f"  {k:32s} {tuple(v.shape)}  max|x|={v.abs().max().item():.4g}")
    total = sum(f.stat().st_size for f in OUT.rglob("*") if f.is_file())
    print(f"fixture folder: {total / 1e6:.2f} MB")


if __name__ == "__main__":
    main()
