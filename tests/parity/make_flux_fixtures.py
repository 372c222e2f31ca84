#!/usr/bin/env python3
"""Flux.1 parity fixtures (run by hand, never by CI).

    .venv-parity/bin/pip install -r tests/parity/requirements.txt -r tests/parity/requirements-models.txt
    .venv-parity/bin/pip install sentencepiece
    .venv-parity/bin/python tests/parity/make_flux_fixtures.py PATH/TO/sd-scripts

The objective's and the sampler's functions are taken from sd-scripts itself
(`library/flux_train_utils.py`, read from the checkout given as the argument: a working tree, or
a bare git mirror read with `git show`): their source is extracted with `ast` and executed here
with the random draws replaced by fixed inputs, so the fixture holds sd-scripts' numbers, not a
copy.

Writes
  tests/fixtures/models/tiny-flux-dev/         a diffusers FluxPipeline folder (transformer with
                                               guidance embedding, CLIP-L-style text_encoder,
                                               T5 text_encoder_2 with its tokenizer.json, 16-channel
                                               VAE without quant convs, flow-matching scheduler)
  tests/fixtures/models/tiny-flux-schnell/     the same without guidance embedding
  tests/fixtures/models/tiny-flux-dev.safetensors      the dev transformer in BFL's single-file
                                               keys (double_blocks.N.img_attn.qkv, …); the folder
                                               tiny-flux-dev/ beside it gives the other parts
  tests/fixtures/models/tiny-flux-ref.safetensors      inputs and outputs (f32, computed in f64):
      flux.latents (2,16,4,6) -> flux.packed (2,6,64) (FluxPipeline._pack_latents), flux.img_ids (6,3)
      flux.txt (2,7,32), flux.pooled (2,32), flux.timestep (2,), flux.guidance (2,)
      dev.out / schnell.out (2,6,64); dev.loss_weights (2,6,64): loss = sum(out * weights)
      flux.txt_masked / flux.txt_masked_gap (2,7) -> dev.out_masked / dev.out_masked_gap
      dev.grad.<BFL name>: d loss / d every transformer weight (BFL names, qkv concatenated)
      t5.input_ids (2,16) i64, t5.mask (2,16) -> t5.out (no mask), t5.out_masked (mask passed)
      vae.image (1,3,16,24) -> vae.mean ; vae.latents (1,16,2,3) -> vae.decode
      obj.* timestep sampling and loss targets from sd-scripts' functions (see objective()).
      sample.* sd-scripts' `denoise` on the dev transformer, plain and with true CFG (sampling()).
"""

from __future__ import annotations

import ast
import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer, T5Config, T5EncoderModel, T5TokenizerFast

ROOT = Path(__file__).resolve().parents[2]
OUT = ROOT / "tests" / "fixtures" / "models"
SEED = 20261206
PROMPTS = ["a photo of a cat", "the tiny dog at the sea, 4k"]


def perturb_norms(model: torch.nn.Module, gen: torch.Generator) -> None:
    """Random norm weights, so a swapped or missing scale shows in the outputs."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name and p.ndim == 1:
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=gen))


def randomize(model: torch.nn.Module, gen: torch.Generator, scale: float = 0.2) -> None:
    """diffusers zero-initialises nothing in Flux, but its default init makes every block's
    output tiny; larger random weights make every term visible."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim >= 2:
                p.copy_(scale * torch.randn(p.shape, generator=gen) / math.sqrt(p.shape[1]))
            elif "norm" not in name:
                p.copy_(0.05 * torch.randn(p.shape, generator=gen))


def tiny_flux(guidance: bool, gen: torch.Generator) -> FluxTransformer2DModel:
    model = FluxTransformer2DModel(
        patch_size=1,
        in_channels=64,
        num_layers=2,
        num_single_layers=2,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=32,
        pooled_projection_dim=32,
        guidance_embeds=guidance,
        axes_dims_rope=(4, 6, 6),
    )
    randomize(model, gen, 0.6)
    perturb_norms(model, gen)
    return model


# ---------------------------------------------------------------------------------------------
# diffusers -> BFL keys (the inverse of diffusers' convert_flux_transformer_checkpoint_to_diffusers)
# ---------------------------------------------------------------------------------------------

def to_bfl(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    sd = dict(sd)

    def take(src: str, dst: str) -> None:
        for suffix in ("weight", "bias"):
            if f"{src}.{suffix}" in sd:
                out[f"{dst}.{suffix}"] = sd.pop(f"{src}.{suffix}")

    def cat(srcs: list[str], dst: str) -> None:
        for suffix in ("weight", "bias"):
            out[f"{dst}.{suffix}"] = torch.cat([sd.pop(f"{s}.{suffix}") for s in srcs], dim=0)

    take("x_embedder", "img_in")
    take("context_embedder", "txt_in")
    take("time_text_embed.timestep_embedder.linear_1", "time_in.in_layer")
    take("time_text_embed.timestep_embedder.linear_2", "time_in.out_layer")
    take("time_text_embed.guidance_embedder.linear_1", "guidance_in.in_layer")
    take("time_text_embed.guidance_embedder.linear_2", "guidance_in.out_layer")
    take("time_text_embed.text_embedder.linear_1", "vector_in.in_layer")
    take("time_text_embed.text_embedder.linear_2", "vector_in.out_layer")
    i = 0
    while f"transformer_blocks.{i}.norm1.linear.weight" in sd:
        s, d = f"transformer_blocks.{i}", f"double_blocks.{i}"
        take(f"{s}.norm1.linear", f"{d}.img_mod.lin")
        take(f"{s}.norm1_context.linear", f"{d}.txt_mod.lin")
        cat([f"{s}.attn.to_q", f"{s}.attn.to_k", f"{s}.attn.to_v"], f"{d}.img_attn.qkv")
        cat([f"{s}.attn.add_q_proj", f"{s}.attn.add_k_proj", f"{s}.attn.add_v_proj"], f"{d}.txt_attn.qkv")
        out[f"{d}.img_attn.norm.query_norm.scale"] = sd.pop(f"{s}.attn.norm_q.weight")
        out[f"{d}.img_attn.norm.key_norm.scale"] = sd.pop(f"{s}.attn.norm_k.weight")
        out[f"{d}.txt_attn.norm.query_norm.scale"] = sd.pop(f"{s}.attn.norm_added_q.weight")
        out[f"{d}.txt_attn.norm.key_norm.scale"] = sd.pop(f"{s}.attn.norm_added_k.weight")
        take(f"{s}.attn.to_out.0", f"{d}.img_attn.proj")
        take(f"{s}.attn.to_add_out", f"{d}.txt_attn.proj")
        take(f"{s}.ff.net.0.proj", f"{d}.img_mlp.0")
        take(f"{s}.ff.net.2", f"{d}.img_mlp.2")
        take(f"{s}.ff_context.net.0.proj", f"{d}.txt_mlp.0")
        take(f"{s}.ff_context.net.2", f"{d}.txt_mlp.2")
        i += 1
    i = 0
    while f"single_transformer_blocks.{i}.norm.linear.weight" in sd:
        s, d = f"single_transformer_blocks.{i}", f"single_blocks.{i}"
        cat([f"{s}.attn.to_q", f"{s}.attn.to_k", f"{s}.attn.to_v", f"{s}.proj_mlp"], f"{d}.linear1")
        take(f"{s}.proj_out", f"{d}.linear2")
        out[f"{d}.norm.query_norm.scale"] = sd.pop(f"{s}.attn.norm_q.weight")
        out[f"{d}.norm.key_norm.scale"] = sd.pop(f"{s}.attn.norm_k.weight")
        take(f"{s}.norm.linear", f"{d}.modulation.lin")
        i += 1
    # diffusers' norm_out.linear yields (scale, shift); BFL's final adaLN yields (shift, scale).
    for suffix in ("weight", "bias"):
        scale, shift = sd.pop(f"norm_out.linear.{suffix}").chunk(2, dim=0)
        out[f"final_layer.adaLN_modulation.1.{suffix}"] = torch.cat([shift, scale], dim=0)
    take("proj_out", "final_layer.linear")
    assert not sd, f"unconverted keys: {sorted(sd)}"
    return out


# ---------------------------------------------------------------------------------------------
# Text encoders, tokenizers, VAE
# ---------------------------------------------------------------------------------------------

def t5_tokenizer(folder: Path) -> T5TokenizerFast:
    """A tiny SentencePiece-Unigram tokenizer with T5's pipeline (Metaspace, `</s>` appended,
    `<pad>` = 0, `</s>` = 1, `<unk>` = 2), saved as the tokenizer.json real T5 folders hold.
    (The trainer's vocabulary can differ between runs; the reference ids are taken from the
    tokenizer saved in the same run.)"""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.Unigram())
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Replace(" {2,}", " ")])
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    corpus = PROMPTS + ["a photo of a dog", "a cat at the sea", "tiny photo, 4k, the dog and the cat"] * 20
    trainer = trainers.UnigramTrainer(vocab_size=60, special_tokens=["<pad>", "</s>", "<unk>"], unk_token="<unk>")
    tok.train_from_iterator(corpus, trainer)
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", 1)])
    fast = T5TokenizerFast(tokenizer_object=tok, eos_token="</s>", pad_token="<pad>", unk_token="<unk>", extra_ids=0)
    folder.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(folder)
    return fast


def tiny_t5(vocab: int, gen: torch.Generator) -> T5EncoderModel:
    cfg = T5Config(
        vocab_size=vocab, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_heads=4,
        relative_attention_num_buckets=8, relative_attention_max_distance=16,
        feed_forward_proj="gated-gelu", layer_norm_epsilon=1e-6, is_encoder_decoder=False, use_cache=False,
    )
    model = T5EncoderModel(cfg).eval()
    randomize(model, gen, 1.0)
    perturb_norms(model, gen)
    return model


def tiny_clip(gen: torch.Generator) -> CLIPTextModel:
    cfg = CLIPTextConfig(
        vocab_size=1000, hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=77, hidden_act="quick_gelu", eos_token_id=2,
    )
    return CLIPTextModel(cfg)


def tiny_vae(gen: torch.Generator) -> AutoencoderKL:
    vae = AutoencoderKL(
        in_channels=3, out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 8, 16, 16), layers_per_block=1, latent_channels=16, norm_num_groups=4,
        scaling_factor=0.3611, shift_factor=0.1159, use_quant_conv=False, use_post_quant_conv=False,
    )
    perturb_norms(vae, gen)
    return vae


# ---------------------------------------------------------------------------------------------
# sd-scripts' objective functions, run as written
# ---------------------------------------------------------------------------------------------

SD_SCRIPTS_FUNCS = [
    "time_shift", "get_lin_function", "get_schedule", "get_sigmas", "compute_density_for_timestep_sampling",
    "compute_loss_weighting_for_sd3", "get_noisy_model_input_and_timesteps", "apply_model_prediction_type",
    "denoise",
]


def load_sd_scripts(repo: Path) -> dict:
    if (repo / "library").is_dir():
        text = (repo / "library" / "flux_train_utils.py").read_text()
    else:
        text = subprocess.run(["git", "--git-dir", str(repo), "show", "HEAD:library/flux_train_utils.py"],
                              check=True, capture_output=True, text=True).stdout
    tree = ast.parse(text)
    keep = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name in SD_SCRIPTS_FUNCS]
    assert len(keep) == len(SD_SCRIPTS_FUNCS), [n.name for n in keep]
    from types import SimpleNamespace
    from typing import Callable, Optional, Tuple
    # denoise's annotations name sd-scripts' model classes; its progress bar is tqdm.
    flux_models = SimpleNamespace(Flux=object, ControlNetFlux=object)
    ns = {"torch": torch, "math": math, "Callable": Callable, "Tuple": Tuple, "Optional": Optional,
          "flux_models": flux_models, "tqdm": lambda it: it}
    exec(compile(ast.Module(body=keep, type_ignores=[]), "flux_train_utils.py", "exec"), ns)
    return ns


class Args:
    def __init__(self, **kw):
        self.__dict__.update(dict(
            timestep_sampling="sigma", sigmoid_scale=1.0, discrete_flow_shift=3.0, weighting_scheme="uniform",
            logit_mean=0.0, logit_std=1.0, mode_scale=1.29, ip_noise_gamma=None, ip_noise_gamma_random_strength=False,
            model_prediction_type="sigma_scaled"))
        self.__dict__.update(kw)


def objective(ref: dict, repo: Path) -> None:
    """For each timestep sampling, the draws sd-scripts would make are fixed (obj.rand,
    obj.randn, obj.normal) and its sigmas, timesteps, noisy inputs, targets and weightings kept."""
    ns = load_sd_scripts(repo)
    gen = torch.Generator().manual_seed(SEED + 7)
    bsz = 4
    latents = torch.randn((bsz, 16, 6, 8), generator=gen)
    noise = torch.randn((bsz, 16, 6, 8), generator=gen)
    pred = torch.randn((bsz, 16, 6, 8), generator=gen)
    rand = torch.rand((bsz,), generator=gen)
    randn = torch.randn((bsz,), generator=gen)
    ref.update({"obj.latents": latents, "obj.noise": noise, "obj.pred": pred, "obj.rand": rand, "obj.randn": randn})
    fixed = {"rand": rand, "randn": randn}
    real = {k: getattr(torch, k) for k in ("rand", "randn", "normal")}

    def fake_rand(*a, **k):
        return fixed["rand"].clone()

    def fake_randn(*a, **k):
        return fixed["randn"].clone()

    def fake_normal(mean, std, size, device=None):
        return mean + std * fixed["randn"].clone()

    cases = [
        ("sigma", dict(timestep_sampling="sigma")),
        ("sigma_logit", dict(timestep_sampling="sigma", weighting_scheme="logit_normal", logit_mean=0.2, logit_std=1.3)),
        ("sigma_mode", dict(timestep_sampling="sigma", weighting_scheme="mode")),
        ("uniform", dict(timestep_sampling="uniform", model_prediction_type="raw")),
        ("sigmoid", dict(timestep_sampling="sigmoid", sigmoid_scale=1.7, model_prediction_type="additive")),
        ("shift", dict(timestep_sampling="shift", discrete_flow_shift=3.1582, sigmoid_scale=1.2)),
        ("flux_shift", dict(timestep_sampling="flux_shift", weighting_scheme="cosmap")),
        ("sigma_sqrt", dict(timestep_sampling="uniform", weighting_scheme="sigma_sqrt")),
    ]
    try:
        torch.rand, torch.randn, torch.normal = fake_rand, fake_randn, fake_normal
        for name, kw in cases:
            args = Args(**kw)
            sched = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=args.discrete_flow_shift)
            noisy, timesteps, sigmas = ns["get_noisy_model_input_and_timesteps"](args, sched, latents, noise, "cpu", torch.float32)
            model_pred, weighting = ns["apply_model_prediction_type"](args, pred, noisy, sigmas)
            ref[f"obj.{name}.sigmas"] = sigmas.flatten().float()
            ref[f"obj.{name}.timesteps"] = timesteps.float()
            ref[f"obj.{name}.noisy"] = noisy.float()
            ref[f"obj.{name}.model_pred"] = model_pred.float()
            ref[f"obj.{name}.weighting"] = (weighting if weighting is not None else torch.ones_like(sigmas)).flatten().float()
    finally:
        torch.rand, torch.randn, torch.normal = real["rand"], real["randn"], real["normal"]
    ref["obj.target"] = noise - latents
    # The sampling schedule (shifted for dev-style sampling at 6 packed tokens, and unshifted).
    ref["obj.schedule_shift"] = torch.tensor(ns["get_schedule"](5, 6, shift=True))
    ref["obj.schedule_plain"] = torch.tensor(ns["get_schedule"](5, 6, shift=False))
    ref["obj.schedule_1024"] = torch.tensor(ns["get_schedule"](28, 4096, shift=True))


class BflShim:
    """diffusers' FluxTransformer2DModel behind sd-scripts' `Flux.forward` signature, so that
    sd-scripts' `denoise` runs on the tiny model."""

    def __init__(self, model):
        self.model = model

    def prepare_block_swap_before_forward(self):
        pass

    def __call__(self, img, img_ids, txt, txt_ids, y, timesteps, guidance, txt_attention_mask=None, **_):
        return self.model(hidden_states=img, encoder_hidden_states=txt, pooled_projections=y, timestep=timesteps,
                          img_ids=img_ids[0], txt_ids=txt_ids[0], guidance=guidance, return_dict=False)[0]


def sampling(ref: dict, repo: Path, transformer) -> None:
    """sd-scripts' `denoise` (4 steps, shifted schedule, guidance 3.5), without and with true
    CFG (scale 2.5, negative conditions first), from fixed packed noise."""
    ns = load_sd_scripts(repo)
    gen = torch.Generator().manual_seed(SEED + 11)
    noise = torch.randn((1, 6, 64), generator=gen, dtype=torch.float64)
    txt = torch.randn((2, 7, 32), generator=gen, dtype=torch.float64)
    pooled = torch.randn((2, 32), generator=gen, dtype=torch.float64)
    img_ids = FluxPipeline._prepare_latent_image_ids(1, 2, 3, "cpu", torch.float64)[None]
    txt_ids = torch.zeros((1, 7, 3), dtype=torch.float64)
    timesteps = ns["get_schedule"](4, noise.shape[1], shift=True)
    model = BflShim(transformer)
    with torch.no_grad():
        plain = ns["denoise"](model, noise, img_ids, txt[1:], txt_ids, pooled[1:], timesteps=timesteps, guidance=3.5)
        neg = (2.5, pooled[:1], txt[:1], None)
        cfg = ns["denoise"](model, noise, img_ids, txt[1:], txt_ids, pooled[1:], timesteps=timesteps, guidance=3.5, neg_cond=neg)
    ref.update({"sample.noise": noise, "sample.txt": txt, "sample.pooled": pooled, "sample.plain": plain, "sample.cfg": cfg})


# ---------------------------------------------------------------------------------------------

def main() -> None:
    if len(sys.argv) < 2:
        raise SystemExit("usage: make_flux_fixtures.py PATH/TO/sd-scripts (a checkout or a bare git mirror of kohya-ss/sd-scripts)")
    repo = Path(sys.argv[1])
    torch.manual_seed(SEED)
    gen = torch.Generator().manual_seed(SEED)
    ref: dict[str, torch.Tensor] = {}

    # Shared parts.
    clip = tiny_clip(gen)
    clip_tok = CLIPTokenizer.from_pretrained(OUT / "tiny-sd15" / "tokenizer")
    scratch = OUT / ".flux-t5-tokenizer"
    t5_tok = t5_tokenizer(scratch)
    t5 = tiny_t5(len(t5_tok), gen)
    vae = tiny_vae(gen)

    for variant, guidance in (("dev", True), ("schnell", False)):
        transformer = tiny_flux(guidance, gen)
        sched = FlowMatchEulerDiscreteScheduler(
            num_train_timesteps=1000, shift=3.0 if guidance else 1.0, use_dynamic_shifting=guidance,
            base_shift=0.5, max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096)
        pipe = FluxPipeline(scheduler=sched, vae=vae, text_encoder=clip, tokenizer=clip_tok, text_encoder_2=t5,
                            tokenizer_2=t5_tok, transformer=transformer)
        folder = OUT / f"tiny-flux-{variant}"
        shutil.rmtree(folder, ignore_errors=True)
        pipe.save_pretrained(folder, safe_serialization=True)

        # Forward (and for dev every weight's gradient) in f64.
        m = transformer.double().eval()
        gen_in = torch.Generator().manual_seed(SEED + 1)
        latents = torch.randn((2, 16, 4, 6), generator=gen_in, dtype=torch.float64)
        packed = FluxPipeline._pack_latents(latents, 2, 16, 4, 6)
        img_ids = FluxPipeline._prepare_latent_image_ids(2, 2, 3, "cpu", torch.float64)
        txt = torch.randn((2, 7, 32), generator=gen_in, dtype=torch.float64)
        pooled = torch.randn((2, 32), generator=gen_in, dtype=torch.float64)
        timestep = torch.tensor([0.25, 0.8], dtype=torch.float64)
        guidance_t = torch.tensor([3.5, 1.5], dtype=torch.float64)
        txt_ids = torch.zeros((7, 3), dtype=torch.float64)
        weights = torch.randn(packed.shape, generator=gen_in, dtype=torch.float64)
        out = m(hidden_states=packed, encoder_hidden_states=txt, pooled_projections=pooled, timestep=timestep,
                img_ids=img_ids, txt_ids=txt_ids, guidance=guidance_t if guidance else None, return_dict=False)[0]
        ref.update({"flux.latents": latents, "flux.packed": packed, "flux.img_ids": img_ids, "flux.txt": txt,
                    "flux.pooled": pooled, "flux.timestep": timestep, "flux.guidance": guidance_t})
        ref[f"{variant}.out"] = out.detach()
        if guidance:
            # apply_t5_attn_mask: padded text keys hidden from every attention (sd-scripts passes
            # the bool key mask to SDPA); a prefix mask (T5's padding) and one with a gap.
            for name, keep in (("masked", [[1, 1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 1, 0]]), ("masked_gap", [[1, 0, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1, 1]])):
                txt_mask = torch.tensor(keep, dtype=torch.float64)
                full = torch.cat([txt_mask, torch.ones((2, 6), dtype=torch.float64)], dim=1).bool()[:, None, None, :]
                with torch.no_grad():
                    o = m(hidden_states=packed, encoder_hidden_states=txt, pooled_projections=pooled, timestep=timestep, img_ids=img_ids,
                          txt_ids=txt_ids, guidance=guidance_t, joint_attention_kwargs={"attention_mask": full}, return_dict=False)[0]
                ref[f"flux.txt_{name}"] = txt_mask
                ref[f"dev.out_{name}"] = o
            ref["dev.loss_weights"] = weights
            sampling(ref, repo, m)
            (out * weights).sum().backward()
            grads = {n: p.grad.detach().clone() for n, p in m.named_parameters()}
            for n, g in to_bfl(grads).items():
                ref[f"dev.grad.{n}"] = g
            bfl = {k: v.float().contiguous() for k, v in to_bfl({n: p.detach() for n, p in m.named_parameters()}).items()}
            save_file(bfl, OUT / "tiny-flux-dev.safetensors", metadata={"format": "pt"})
            # (diffusers' own single-file converter assumes the full-size widths, so the round trip
            # is checked in Rust: both layouts must give dev.out.)

    # T5 encoder, with and without the attention mask.
    enc = t5_tok(PROMPTS, max_length=16, padding="max_length", truncation=True, return_tensors="pt")
    t5d = t5.double().eval()
    with torch.no_grad():
        ref["t5.input_ids"] = enc.input_ids
        ref["t5.mask"] = enc.attention_mask
        ref["t5.out"] = t5d(enc.input_ids).last_hidden_state
        ref["t5.out_masked"] = t5d(enc.input_ids, attention_mask=enc.attention_mask).last_hidden_state
    print("t5 ids", enc.input_ids.tolist())

    # VAE.
    gen_v = torch.Generator().manual_seed(SEED + 3)
    vd = vae.double().eval()
    with torch.no_grad():
        image = torch.rand((1, 3, 16, 24), generator=gen_v, dtype=torch.float64) * 2 - 1
        z = torch.randn((1, 16, 2, 3), generator=gen_v, dtype=torch.float64)
        ref["vae.image"] = image
        ref["vae.mean"] = vd.encode(image).latent_dist.mean
        ref["vae.latents"] = z
        ref["vae.decode"] = vd.decode(z).sample

    objective(ref, repo)
    shutil.rmtree(scratch, ignore_errors=True)
    tensors = {k: (v.float() if v.is_floating_point() else v).contiguous().clone() for k, v in ref.items()}
    save_file(tensors, OUT / "tiny-flux-ref.safetensors")
    total = sum(p.stat().st_size for p in OUT.glob("tiny-flux*") for p in ([p] if p.is_file() else p.rglob("*")) if p.is_file())
    print(f"wrote tiny-flux-dev/, tiny-flux-schnell/, tiny-flux-dev.safetensors, tiny-flux-ref.safetensors ({total / 1e6:.1f} MB)")


if __name__ == "__main__":
    main()
