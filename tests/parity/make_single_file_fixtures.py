#!/usr/bin/env python3
"""Single-file (original LDM / SGM key names) fixtures and `loft lora merge` references
(run by hand, never by CI).

    .venv-parity/bin/python tests/parity/make_single_file_fixtures.py

Needs the diffusers folders written by make_model_fixtures.py (they are read, never changed)
and lycoris-lora 4.1.3 (requirements.txt). Writes

  tests/fixtures/models/tiny-sd15.safetensors   tiny-sd15/ as one LDM checkpoint (SD1.x keys:
                                                model.diffusion_model.*, cond_stage_model.
                                                transformer.text_model.*, first_stage_model.*)
  tests/fixtures/models/tiny-sdxl.safetensors   tiny-sdxl/ as one SGM checkpoint (conditioner.
                                                embedders.0.transformer.*, conditioner.embedders.
                                                1.model.* OpenCLIP with fused in_proj and the
                                                transposed text_projection)
  tests/fixtures/models/tiny-sd2.safetensors    an SD2.x-style checkpoint: the tiny-sd21-unet
                                                UNet, a new OpenCLIP-style text encoder
                                                (cond_stage_model.model.*, 3 resblocks of which
                                                diffusers keeps 2, as SD2's 24 → 23) and
                                                tiny-sd15's VAE
  tests/fixtures/models/tiny-sd2-config/        that pipeline's diffusers configs (no weights):
                                                what `from_single_file(config=...)` reads
  tests/fixtures/models/tiny-single-file-ref.safetensors
        sd2te.input_ids -> sd2te.last_hidden_state, sd2te.penultimate, sd2te.pooled
        (the SD2 text encoder as diffusers loads it from tiny-sd2.safetensors, f32)
  tests/fixtures/models/merge/tiny-sd15-locon.safetensors   LyCORIS LoCon (lycoris.kohya,
                                                as sd-scripts writes it), UNet + text encoder,
                                                3x3 convs included
  tests/fixtures/models/merge/tiny-sd15-lokr.safetensors    LyCORIS LoKr, same modules
  tests/fixtures/models/merge/tiny-sd15-merge-ref.safetensors
        the merged weights W + 1.0*dW(locon) + 0.5*dW(lokr) of a few layers, keys
        `unet.<diffusers name>` / `te.<transformers name>`; dW read off the LyCORIS modules'
        own forward (float64) by feeding basis inputs, so no LyCORIS merge helper is trusted.

The LDM conversion is diffusers' scripts/convert_diffusers_to_original_stable_diffusion.py
and convert_diffusers_to_original_sdxl.py written out for any block count (those scripts
hard-code SD1.5's 4 blocks / SDXL's 3). Each written file is read back with diffusers'
`from_single_file(..., config=<diffusers folder>, local_files_only=True)` and must give the
diffusers weights exactly, so the files are real LDM checkpoints, not our own invention.
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

import diffusers
import transformers
from diffusers import (AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline,
                       UNet2DConditionModel)
from diffusers.loaders.single_file_utils import convert_open_clip_checkpoint
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

sys.path.insert(0, str(Path(__file__).resolve().parent))
import make_model_fixtures as mmf  # noqa: E402

OUT = mmf.OUT
SEED = 20261130


# ---------------------------------------------------------------------------------------------
# diffusers -> LDM key conversion
# ---------------------------------------------------------------------------------------------

UNET_FIXED = [  # (LDM, diffusers)
    ("time_embed.0.", "time_embedding.linear_1."),
    ("time_embed.2.", "time_embedding.linear_2."),
    ("label_emb.0.0.", "add_embedding.linear_1."),
    ("label_emb.0.2.", "add_embedding.linear_2."),
    ("input_blocks.0.0.", "conv_in."),
    ("out.0.", "conv_norm_out."),
    ("out.2.", "conv_out."),
]
UNET_RESNET = [  # (LDM, diffusers), inside a resnet
    ("in_layers.0", "norm1"),
    ("in_layers.2", "conv1"),
    ("out_layers.0", "norm2"),
    ("out_layers.3", "conv2"),
    ("emb_layers.1", "time_emb_proj"),
    ("skip_connection", "conv_shortcut"),
]


def unet_prefix_map(config: dict) -> list[tuple[str, str]]:
    """(LDM prefix, diffusers prefix) for every block, the scripts' loops for any size:
    `per` = layers_per_block + 1 LDM slots per level; an up block's upsampler sits after its
    attention (slot 2) when it has one, else in slot 1."""
    n = len(config["block_out_channels"])
    lpb = config["layers_per_block"]
    per = lpb + 1
    m: list[tuple[str, str]] = []
    for i in range(n):
        down_attn = config["down_block_types"][i].startswith("CrossAttn")
        up_attn = config["up_block_types"][i].startswith("CrossAttn")
        for j in range(lpb):
            m.append((f"input_blocks.{per * i + j + 1}.0.", f"down_blocks.{i}.resnets.{j}."))
            if down_attn:
                m.append((f"input_blocks.{per * i + j + 1}.1.", f"down_blocks.{i}.attentions.{j}."))
        for j in range(per):
            m.append((f"output_blocks.{per * i + j}.0.", f"up_blocks.{i}.resnets.{j}."))
            if up_attn:
                m.append((f"output_blocks.{per * i + j}.1.", f"up_blocks.{i}.attentions.{j}."))
        if i < n - 1:
            m.append((f"input_blocks.{per * (i + 1)}.0.op.", f"down_blocks.{i}.downsamplers.0.conv."))
            m.append((f"output_blocks.{per * i + per - 1}.{2 if up_attn else 1}.", f"up_blocks.{i}.upsamplers.0."))
    m.append(("middle_block.1.", "mid_block.attentions.0."))
    for j in range(2):
        m.append((f"middle_block.{2 * j}.", f"mid_block.resnets.{j}."))
    return m


def convert_unet(sd: dict[str, torch.Tensor], config: dict) -> dict[str, torch.Tensor]:
    prefixes = unet_prefix_map(config)
    out = {}
    for k, v in sd.items():
        new = None
        for ldm, hf in UNET_FIXED:
            if k.startswith(hf):
                new = ldm + k[len(hf):]
        if new is None:
            for ldm, hf in prefixes:
                if k.startswith(hf):
                    rest = k[len(hf):]
                    if ".resnets." in hf:
                        for ldm_r, hf_r in UNET_RESNET:
                            if rest.startswith(hf_r + "."):
                                rest = ldm_r + rest[len(hf_r):]
                    new = ldm + rest
                    break
        assert new is not None, f"unet key {k} has no LDM name"
        out["model.diffusion_model." + new] = v
    return out


def convert_vae(sd: dict[str, torch.Tensor], config: dict) -> dict[str, torch.Tensor]:
    n = len(config["block_out_channels"])
    lpb = config["layers_per_block"]
    m = [("nin_shortcut", "conv_shortcut"), ("norm_out", "conv_norm_out"), ("mid.attn_1.", "mid_block.attentions.0.")]
    for i in range(n):
        for j in range(lpb):
            m.append((f"encoder.down.{i}.block.{j}.", f"encoder.down_blocks.{i}.resnets.{j}."))
        for j in range(lpb + 1):
            m.append((f"decoder.up.{n - 1 - i}.block.{j}.", f"decoder.up_blocks.{i}.resnets.{j}."))
        if i < n - 1:
            m.append((f"down.{i}.downsample.", f"down_blocks.{i}.downsamplers.0."))
            m.append((f"up.{n - 1 - i}.upsample.", f"up_blocks.{i}.upsamplers.0."))
    for j in range(2):
        m.append((f"mid.block_{j + 1}.", f"mid_block.resnets.{j}."))
    attn = [("norm.", "group_norm."), ("q.", "to_q."), ("k.", "to_k."), ("v.", "to_v."), ("proj_out.", "to_out.0.")]
    out = {}
    for k, v in sd.items():
        new = k
        for ldm, hf in m:
            new = new.replace(hf, ldm)
        if "attentions" in k:
            for ldm, hf in attn:
                new = new.replace(hf, ldm)
            if new.endswith(("q.weight", "k.weight", "v.weight", "proj_out.weight")):
                v = v.reshape(*v.shape, 1, 1)  # LDM's VAE attention uses 1x1 convs
        out["first_stage_model." + new] = v
    return out


def convert_clip(sd: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    # transformers' CLIPTextModel keys are kept (text_model.*) under the LDM prefix.
    return {prefix + k: v for k, v in sd.items()}


OPENCLIP = [  # (OpenCLIP, transformers), applied in order
    ("resblocks.", "text_model.encoder.layers."),
    ("ln_1", "layer_norm1"),
    ("ln_2", "layer_norm2"),
    (".c_fc.", ".fc1."),
    (".c_proj.", ".fc2."),
    (".attn", ".self_attn"),
]


def convert_open_clip(sd: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """convert_text_enc_state_dict_v20 / convert_openclip_text_enc_state_dict: q/k/v fused into
    in_proj_weight/bias, text_projection stored transposed (OpenCLIP multiplies x @ proj)."""
    out: dict[str, torch.Tensor] = {}
    qkv: dict[str, dict[str, torch.Tensor]] = {}
    for k, v in sd.items():
        if k == "text_model.embeddings.token_embedding.weight":
            out["token_embedding.weight"] = v
        elif k == "text_model.embeddings.position_embedding.weight":
            out["positional_embedding"] = v
        elif k.startswith("text_model.final_layer_norm."):
            out["ln_final." + k.rsplit(".", 1)[1]] = v
        elif k == "text_projection.weight":
            out["text_projection"] = v.T.contiguous()
        elif any(p in k for p in (".q_proj.", ".k_proj.", ".v_proj.")):
            layer, proj, param = k.rsplit(".", 2)
            qkv.setdefault(f"{layer}.{param}", {})[proj[0]] = v
        else:
            new = k
            for oc, hf in OPENCLIP:
                new = new.replace(hf, oc)
            out["transformer." + new] = v
    for lp, parts in qkv.items():
        layer, param = lp.rsplit(".", 1)
        new = layer
        for oc, hf in OPENCLIP:
            new = new.replace(hf, oc)
        out[f"transformer.{new}.in_proj_{param}"] = torch.cat([parts["q"], parts["k"], parts["v"]], 0)
    return {prefix + k: v for k, v in out.items()}


def folder_sd(folder: Path, stem: str) -> dict[str, torch.Tensor]:
    return load_file(folder / f"{stem}.safetensors")


def config(folder: Path) -> dict:
    return json.loads((folder / "config.json").read_text())


# ---------------------------------------------------------------------------------------------
# Checks: diffusers' own single-file loader gives the folder's weights back
# ---------------------------------------------------------------------------------------------

def assert_same(name: str, got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    got = {k: v for k, v in got.items() if not k.endswith("position_ids")}
    want = {k: v for k, v in want.items() if not k.endswith("position_ids")}
    missing = sorted(set(want) - set(got))
    extra = sorted(set(got) - set(want))
    assert not missing and not extra, f"{name}: missing {missing[:5]}, extra {extra[:5]}"
    for k, v in want.items():
        assert torch.equal(got[k].float(), v.float()), f"{name}: {k} differs"
    print(f"  {name}: {len(want)} tensors identical")


def check_pipeline(cls, path: Path, folder: Path, parts: dict[str, Path]) -> None:
    pipe = cls.from_single_file(str(path), config=str(folder), local_files_only=True,
                                torch_dtype=torch.float32)
    for attr, sub in parts.items():
        stem = "model" if attr.startswith("text_encoder") else "diffusion_pytorch_model"
        assert_same(f"{path.name} {attr}", getattr(pipe, attr).state_dict(), folder_sd(sub, stem))


# ---------------------------------------------------------------------------------------------
# Merge references
# ---------------------------------------------------------------------------------------------

def randomize(network: torch.nn.Module, gen: torch.Generator) -> None:
    """LyCORIS zero-inits one factor of every module (ΔW = 0): fill every parameter with
    random f32-representable values, large enough that ΔW matters."""
    with torch.no_grad():
        for name, p in network.named_parameters():
            p.copy_((0.3 * torch.randn(p.shape, generator=gen)).float())


def merged_weight(layer: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """W' and b' of a layer whose forward LyCORIS replaced, read off that forward in float64:
    Linear: rows of the identity; Conv2d (stride 1, padding (k-1)/2): one-hot k x k inputs,
    whose centre output pixel sees the whole kernel."""
    w = layer.weight
    with torch.no_grad():
        if w.dim() == 2:
            n_in = w.shape[1]
            b = layer(torch.zeros(1, n_in, dtype=torch.float64))[0]
            y = layer(torch.eye(n_in, dtype=torch.float64))
            return (y - b).T.contiguous(), (b if layer.bias is not None else None)
        o, c, kh, kw = w.shape
        assert layer.stride == (1, 1) and layer.padding == ((kh - 1) // 2, (kw - 1) // 2)
        x = torch.zeros(c * kh * kw, c, kh, kw, dtype=torch.float64)
        for idx in range(c * kh * kw):
            ci, rem = divmod(idx, kh * kw)
            x[idx, ci, rem // kw, rem % kw] = 1.0
        b = layer(torch.zeros(1, c, kh, kw, dtype=torch.float64))[0, :, kh // 2, kw // 2]
        y = layer(x)[:, :, kh // 2, kw // 2] - b
        return y.T.reshape(o, c, kh, kw).contiguous(), (b if layer.bias is not None else None)


MERGE_LAYERS = {
    "unet": [
        "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q",
        "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k",
        "down_blocks.0.attentions.0.transformer_blocks.0.ff.net.2",
        "down_blocks.0.attentions.0.proj_in",
        "down_blocks.0.resnets.0.conv1",
        "up_blocks.1.resnets.1.conv_shortcut",
        "mid_block.resnets.0.time_emb_proj",
        "up_blocks.1.attentions.0.transformer_blocks.0.attn2.to_out.0",
    ],
    "te": [
        "text_model.encoder.layers.0.self_attn.q_proj",
        "text_model.encoder.layers.1.mlp.fc1",
    ],
}
MERGE_NETWORKS = [  # (file stem, multiplier in the reference, network args)
    ("tiny-sd15-locon", 1.0, dict(algo="locon", conv_dim=2, conv_alpha=1)),
    ("tiny-sd15-lokr", 0.5, dict(algo="lokr", factor=4, conv_dim=4, conv_alpha=2)),
]


def module_at(root: torch.nn.Module, path: str) -> torch.nn.Module:
    m = root
    for p in path.split("."):
        m = m[int(p)] if p.isdigit() else getattr(m, p)
    return m


# LyCORIS 4.1.3's "full" preset also targets the class TimestepEmbedding (for Anima), so on a
# diffusers UNet time_embedding.linear_1 is found twice (by class and by name) and
# create_network asserts. This is the SD part of that preset, which is what sd-scripts users
# get on SD1.x.
SD_FULL_PRESET = """
enable_conv = true
unet_target_module = ["Transformer2DModel", "ResnetBlock2D", "Downsample2D", "Upsample2D"]
unet_target_name = ["conv_in", "conv_out", "time_embedding.linear_1", "time_embedding.linear_2"]
text_encoder_target_module = ["CLIPAttention", "CLIPMLP"]
text_encoder_target_name = []
"""


def make_merge_fixtures(gen: torch.Generator) -> None:
    from lycoris.kohya import create_network

    preset = Path(tempfile.mkdtemp()) / "sd-full.toml"
    preset.write_text(SD_FULL_PRESET)
    out_dir = OUT / "merge"
    out_dir.mkdir(exist_ok=True)
    sd15 = OUT / "tiny-sd15"
    base_unet = UNet2DConditionModel.from_pretrained(sd15 / "unet").double().eval()
    base_te = CLIPTextModel.from_pretrained(sd15 / "text_encoder").double().eval()
    deltas: dict[str, torch.Tensor] = {}
    for stem, mult, args in MERGE_NETWORKS:
        unet = UNet2DConditionModel.from_pretrained(sd15 / "unet").eval()
        te = CLIPTextModel.from_pretrained(sd15 / "text_encoder").eval()
        net = create_network(1.0, 4, 2, None, te, unet, preset=str(preset),
                             **{k: str(v) for k, v in args.items()})
        net.apply_to(te, unet, apply_text_encoder=True, apply_unet=True)
        randomize(net, gen)
        meta = {"ss_network_module": "lycoris.kohya", "ss_network_dim": "4", "ss_network_alpha": "2",
                "ss_network_args": json.dumps({k: str(v) for k, v in args.items()}),
                "ss_base_model_version": "sd_v1"}
        net.save_weights(str(out_dir / f"{stem}.safetensors"), torch.float32, meta)
        print(f"  {stem}: {len(net.unet_loras)} unet + {len(net.text_encoder_loras)} te modules")
        net.double().eval()
        unet.double()
        te.double()
        for part, model, base in (("unet", unet, base_unet), ("te", te, base_te)):
            for path in MERGE_LAYERS[part]:
                layer = module_at(model, path)
                w1, b1 = merged_weight(layer)
                w0 = module_at(base, path).weight
                key = f"{part}.{path}.weight"
                deltas[key] = deltas.get(key, torch.zeros_like(w0)) + mult * (w1 - w0)
                if b1 is not None:
                    b0 = module_at(base, path).bias
                    bkey = f"{part}.{path}.bias"
                    deltas[bkey] = deltas.get(bkey, torch.zeros_like(b0)) + mult * (b1 - b0)
    ref = {}
    for key, d in deltas.items():
        part, name = key.split(".", 1)
        base = base_unet if part == "unet" else base_te
        w0 = base.state_dict()[name]
        assert d.abs().max() > 1e-3 or key.endswith(".bias"), f"{key}: the networks do not change it"
        ref[key] = mmf.f32(w0 + d)
    save_file(ref, out_dir / "tiny-sd15-merge-ref.safetensors", metadata={
        "networks": json.dumps([[s, m] for s, m, _ in MERGE_NETWORKS]),
    })


# ---------------------------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------------------------

def main() -> None:
    print(f"torch {torch.__version__}, diffusers {diffusers.__version__}, transformers {transformers.__version__}")
    gen = torch.Generator().manual_seed(SEED)

    # SD1.5
    sd15 = OUT / "tiny-sd15"
    ckpt = {}
    ckpt.update(convert_unet(folder_sd(sd15 / "unet", "diffusion_pytorch_model"), config(sd15 / "unet")))
    ckpt.update(convert_clip(folder_sd(sd15 / "text_encoder", "model"), "cond_stage_model.transformer."))
    ckpt.update(convert_vae(folder_sd(sd15 / "vae", "diffusion_pytorch_model"), config(sd15 / "vae")))
    save_file({k: v.contiguous() for k, v in ckpt.items()}, OUT / "tiny-sd15.safetensors")
    check_pipeline(StableDiffusionPipeline, OUT / "tiny-sd15.safetensors", sd15,
                   {"unet": sd15 / "unet", "text_encoder": sd15 / "text_encoder", "vae": sd15 / "vae"})

    # SDXL
    sdxl = OUT / "tiny-sdxl"
    ckpt = {}
    ckpt.update(convert_unet(folder_sd(sdxl / "unet", "diffusion_pytorch_model"), config(sdxl / "unet")))
    ckpt.update(convert_clip(folder_sd(sdxl / "text_encoder", "model"), "conditioner.embedders.0.transformer."))
    ckpt.update(convert_open_clip(folder_sd(sdxl / "text_encoder_2", "model"), "conditioner.embedders.1.model."))
    ckpt.update(convert_vae(folder_sd(sdxl / "vae", "diffusion_pytorch_model"), config(sdxl / "vae")))
    save_file({k: v.contiguous() for k, v in ckpt.items()}, OUT / "tiny-sdxl.safetensors")
    check_pipeline(StableDiffusionXLPipeline, OUT / "tiny-sdxl.safetensors", sdxl,
                   {"unet": sdxl / "unet", "text_encoder": sdxl / "text_encoder", "vae": sdxl / "vae"})
    # The pipeline loader picks te2's converter by comparing the CLIP-L position embedding's
    # width with te2's (768 vs 1280 in real SDXL); the tiny encoders are both 32 wide, so it
    # would load te1's weights into te2. Call diffusers' OpenCLIP converter directly instead.
    te2 = CLIPTextModelWithProjection.from_pretrained(sdxl / "text_encoder_2")
    assert_same("tiny-sdxl.safetensors text_encoder_2",
                convert_open_clip_checkpoint(te2, load_file(OUT / "tiny-sdxl.safetensors"),
                                             prefix="conditioner.embedders.1.model."),
                folder_sd(sdxl / "text_encoder_2", "model"))

    # SD2: a new OpenCLIP-style text encoder (gelu, 24 wide for tiny-sd21-unet's cross
    # attention). The file holds 3 resblocks; the diffusers config keeps 2, as SD2's
    # text_encoder keeps 23 of OpenCLIP-H's 24 (SD2 conditions on the penultimate layer).
    u21 = OUT / "tiny-sd21-unet"
    tokenizer = CLIPTokenizer.from_pretrained(sd15 / "tokenizer")
    eos = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    bos = tokenizer.convert_tokens_to_ids("<|startoftext|>")

    def te_cfg(layers: int) -> CLIPTextConfig:
        return CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=24, intermediate_size=48,
                              num_hidden_layers=layers, num_attention_heads=3, max_position_embeddings=77,
                              hidden_act="gelu", layer_norm_eps=1e-5, projection_dim=24,
                              bos_token_id=bos, eos_token_id=eos, pad_token_id=1)

    torch.manual_seed(SEED)
    te3 = CLIPTextModel(te_cfg(3)).eval()
    mmf.perturb_norms(te3, gen)
    te3_sd = dict(te3.state_dict())
    te3_sd["text_projection.weight"] = torch.randn(24, 24, generator=gen)  # OpenCLIP has one; SD2 ignores it
    ckpt = {}
    ckpt.update(convert_unet(folder_sd(u21, "diffusion_pytorch_model"), config(u21)))
    ckpt.update(convert_open_clip(te3_sd, "cond_stage_model.model."))
    ckpt.update(convert_vae(folder_sd(sd15 / "vae", "diffusion_pytorch_model"), config(sd15 / "vae")))
    save_file({k: v.contiguous() for k, v in ckpt.items()}, OUT / "tiny-sd2.safetensors")

    cfg_dir = OUT / "tiny-sd2-config"
    if cfg_dir.exists():
        shutil.rmtree(cfg_dir)
    with tempfile.TemporaryDirectory() as tmp:
        te2 = CLIPTextModel(te_cfg(2)).eval()
        te2.load_state_dict({k: v for k, v in te3.state_dict().items() if "layers.2." not in k})
        pipe = StableDiffusionPipeline(
            vae=AutoencoderKL.from_pretrained(sd15 / "vae"), text_encoder=te2, tokenizer=tokenizer,
            unet=UNet2DConditionModel.from_pretrained(u21),
            scheduler=DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                    clip_sample=False, set_alpha_to_one=False, steps_offset=1,
                                    prediction_type="v_prediction"),
            safety_checker=None, feature_extractor=None, requires_safety_checker=False)
        pipe.save_pretrained(tmp, safe_serialization=True)
        for f in Path(tmp).rglob("*"):
            if f.is_file() and f.suffix != ".safetensors":
                dest = cfg_dir / f.relative_to(tmp)
                dest.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy(f, dest)
        te2_sd = dict(te2.state_dict())
    pipe = StableDiffusionPipeline.from_single_file(str(OUT / "tiny-sd2.safetensors"), config=str(cfg_dir),
                                                    local_files_only=True, torch_dtype=torch.float32)
    assert_same("tiny-sd2.safetensors unet", pipe.unet.state_dict(), folder_sd(u21, "diffusion_pytorch_model"))
    assert_same("tiny-sd2.safetensors text_encoder", pipe.text_encoder.state_dict(), te2_sd)
    assert_same("tiny-sd2.safetensors vae", pipe.vae.state_dict(), folder_sd(sd15 / "vae", "diffusion_pytorch_model"))

    ref = {}
    with torch.no_grad():
        ids = tokenizer(mmf.PROMPTS, padding="max_length", max_length=77, truncation=True,
                        return_tensors="pt").input_ids
        o = pipe.text_encoder(ids, output_hidden_states=True)
        ref.update({"sd2te.input_ids": ids.to(torch.int64), "sd2te.last_hidden_state": mmf.f32(o.last_hidden_state),
                    "sd2te.penultimate": mmf.f32(o.hidden_states[-2]), "sd2te.pooled": mmf.f32(o.pooler_output)})
    save_file({k: v.contiguous() for k, v in ref.items()}, OUT / "tiny-single-file-ref.safetensors", metadata={
        "torch": torch.__version__, "diffusers": diffusers.__version__, "transformers": transformers.__version__,
    })

    make_merge_fixtures(gen)
    for f in sorted(OUT.glob("tiny-*.safetensors")) + sorted((OUT / "merge").glob("*")):
        print(f"  {f.relative_to(OUT)}: {f.stat().st_size / 1e3:.0f} kB")


if __name__ == "__main__":
    main()
