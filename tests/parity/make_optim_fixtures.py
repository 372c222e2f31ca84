#!/usr/bin/env python3
"""Parity fixtures for Loft's optimizers and LR schedulers (run by hand, never by CI).

    .venv-parity/bin/pip install -r tests/parity/requirements-optim.txt
    .venv-parity/bin/python tests/parity/make_optim_fixtures.py

Writes
  tests/fixtures/optim/<case>.safetensors   one optimizer setting over 5 steps
  tests/fixtures/optim/schedulers.safetensors  LR values of every scheduler
  tests/fixtures/optim/clip_grad_norm.safetensors  torch.nn.utils.clip_grad_norm_

References (the real packages, used directly; nothing is ported):
  * AdamW      torch.optim.AdamW (torch 2.15, foreach=False: the single-tensor path)
  * AdamW8bit  bitsandbytes.optim.AdamW8bit (bitsandbytes 0.50.2, its CPU kernels; the
               fixture also stores bitsandbytes' two dynamic quantization maps)
  * Lion       lion_pytorch.Lion (lion-pytorch 0.2.5)
  * Prodigy    prodigyopt.Prodigy (prodigyopt 1.1.2)
  * Adafactor  transformers.optimization.Adafactor (transformers 4.57.6)
  * schedulers diffusers.optimization.get_scheduler (diffusers 0.37.1)

Every optimizer runs in float32 on the CPU, as users run it; the HALF cases run on float16 /
bfloat16 params and gradients (full_fp16 / full_bf16) and need only torch, lion-pytorch and
prodigyopt. Params: `w` 6x5, `b` 5 and
`conv` 3x2x3x3 (seeded; the Prodigy cases start `conv` at zero, as a LoRA up weight
does). Gradients: 5 fixed sets, each a shared direction plus fresh noise (so Prodigy's d
estimate moves). Each step k uses lr = group lr x lr_scale[k] (how Loft's trainer applies
a schedule).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

import lion_pytorch
import prodigyopt  # noqa: F401
from lion_pytorch import Lion
from prodigyopt import Prodigy

# diffusers, bitsandbytes and transformers are imported where they are used, so the half-precision
# cases (`python make_optim_fixtures.py adamw_fp16 ...`) need only torch, lion-pytorch and prodigyopt.

OUT = Path(__file__).resolve().parents[1] / "fixtures" / "optim"
STEPS = 5
SHAPES = {"w": (6, 5), "b": (5,), "conv": (3, 2, 3, 3)}

# name -> (optimizer, Loft options (field names of fields/optimizer.toml / optimizer_args),
#          groups [(group name, lr, [param names])], lr scale per step, zero-init params)
CASES = {
    "adamw_default": ("AdamW", {"betas": [0.9, 0.999], "eps": 1e-8, "weight_decay": 0.01},
                      [("all", 1e-2, ["w", "b", "conv"])], [1.0] * STEPS, []),
    "adamw_groups": ("AdamW", {"betas": [0.8, 0.99], "eps": 1e-6, "weight_decay": 0.1},
                     [("unet", 2e-2, ["w", "b"]), ("text_encoder", 5e-3, ["conv"])],
                     [0.2, 0.6, 1.0, 0.8, 0.3], []),
    "adamw_amsgrad": ("AdamW", {"betas": [0.9, 0.99], "eps": 1e-8, "weight_decay": 0.0, "amsgrad": True},
                      [("all", 1e-2, ["w", "b", "conv"])], [1.0] * STEPS, []),
    # min_8bit_size small enough that w and conv take the 8-bit path and b the 32-bit one.
    "adamw8bit_default": ("AdamW8bit", {"betas": [0.9, 0.999], "eps": 1e-8, "weight_decay": 0.01, "min_8bit_size": 16},
                          [("all", 1e-2, ["w", "b", "conv"])], [1.0] * STEPS, []),
    "adamw8bit_blocks": ("AdamW8bit", {"betas": [0.8, 0.99], "eps": 1e-6, "weight_decay": 0.1, "min_8bit_size": 100},
                         [("unet", 2e-2, ["w", "b"]), ("text_encoder", 5e-3, ["conv"])],
                         [0.2, 0.6, 1.0, 0.8, 0.3], ["conv"]),
    "lion_default": ("Lion", {"betas": [0.9, 0.99], "weight_decay": 0.0},
                     [("all", 1e-3, ["w", "b", "conv"])], [1.0] * STEPS, []),
    "lion_groups_wd": ("Lion", {"betas": [0.95, 0.98], "weight_decay": 0.5},
                       [("unet", 3e-3, ["w", "conv"]), ("text_encoder", 1e-3, ["b"])],
                       [0.5, 1.0, 1.0, 0.7, 0.2], []),
    "prodigy_default": ("Prodigy", {},
                        [("all", 1.0, ["w", "b", "conv"])], [1.0] * STEPS, ["conv"]),
    "prodigy_lora": ("Prodigy", {"weight_decay": 0.01, "decouple": True, "use_bias_correction": True,
                                 "safeguard_warmup": True, "d_coef": 20.0, "betas": [0.9, 0.99]},
                     [("unet", 1.0, ["w", "conv"]), ("text_encoder", 1.0, ["b"])],
                     [0.2, 0.4, 0.6, 0.8, 1.0], ["conv"]),
    "prodigy_coupled": ("Prodigy", {"weight_decay": 0.1, "decouple": False, "growth_rate": 1.5,
                                    "beta3": 0.9, "d0": 1e-4, "betas": [0.0, 0.999], "eps": 1e-6},
                        [("unet", 0.5, ["w", "b"]), ("frozen", 0.0, ["conv"])], [1.0] * STEPS, []),
    "adafactor_fixed": ("Adafactor", {"relative_step": False, "scale_parameter": False, "warmup_init": False},
                        [("all", 1e-2, ["w", "b", "conv"])], [1.0, 0.9, 0.8, 0.7, 0.6], []),
    "adafactor_relative": ("Adafactor", {"relative_step": True, "scale_parameter": True, "warmup_init": False},
                           [("all", 0.0, ["w", "b", "conv"])], [1.0] * STEPS, []),
    "adafactor_beta1": ("Adafactor", {"relative_step": False, "scale_parameter": True, "beta1": 0.9,
                                      "weight_decay": 0.05, "clip_threshold": 0.5, "decay_rate": -0.6,
                                      "eps": [1e-30, 1e-3]},
                        [("unet", 5.0, ["w", "conv"]), ("text_encoder", 2.0, ["b"])], [1.0] * STEPS, []),
    "adafactor_warmup": ("Adafactor", {"relative_step": True, "scale_parameter": False, "warmup_init": True},
                         [("all", 0.0, ["w", "b", "conv"])], [1.0] * STEPS, ["b"]),
}

# full_fp16 / full_bf16: the same steps on half-precision params and gradients, as sd-scripts runs
# them after `network.to(weight_dtype)` (torch keeps the states as zeros_like(param), half too,
# and rounds after every in-place op). Gradients ~1e-1..1, where fp16's second moment does not
# underflow (below ~1e-4 it squares to zero and AdamW's update becomes inf, in torch and in Loft).
HALF = {"adamw_fp16": torch.float16, "lion_fp16": torch.float16,
        "adamw_bf16": torch.bfloat16, "lion_bf16": torch.bfloat16, "prodigy_bf16": torch.bfloat16}
CASES["adamw_fp16"] = ("AdamW", {"betas": [0.9, 0.999], "eps": 1e-8, "weight_decay": 0.01},
                       [("all", 1e-2, ["w", "b", "conv"])], [1.0] * STEPS, [])
CASES["lion_fp16"] = ("Lion", {"betas": [0.9, 0.99], "weight_decay": 0.1},
                      [("all", 1e-2, ["w", "b", "conv"])], [1.0, 0.8, 0.6, 0.4, 0.2], [])
CASES["adamw_bf16"] = CASES["adamw_groups"]
CASES["lion_bf16"] = CASES["lion_fp16"]
# Prodigy's steps (~1e-6 at first) vanish in bf16 params of size 1, so this case starts at zero.
CASES["prodigy_bf16"] = ("Prodigy", {"d_coef": 20.0}, [("all", 1.0, ["w", "b", "conv"])], [1.0] * STEPS, ["w", "b", "conv"])

# Cases with their own shapes: several 256-value quantization blocks, the last one partial.
CASE_SHAPES = {"adamw8bit_blocks": {"w": (40, 30), "b": (5,), "conv": (16, 8, 3, 3)}}

# Prodigy's and warm-up Adafactor's steps are ~1e-6: small params keep those steps well above
# the params' f32 rounding, so the comparison sees them.
INIT_SCALE = {"prodigy_default": 1e-3, "prodigy_lora": 1e-4, "prodigy_coupled": 1e-3, "adafactor_warmup": 1e-5}


def make_optimizer(kind: str, opts: dict, groups: list[dict]):
    if kind == "AdamW":
        return torch.optim.AdamW(groups, lr=groups[0]["lr"], betas=tuple(opts["betas"]), eps=opts["eps"],
                                 weight_decay=opts["weight_decay"], amsgrad=opts.get("amsgrad", False),
                                 foreach=False)
    if kind == "AdamW8bit":
        import bitsandbytes
        return bitsandbytes.optim.AdamW8bit(groups, lr=groups[0]["lr"], betas=tuple(opts["betas"]), eps=opts["eps"],
                                            weight_decay=opts["weight_decay"], min_8bit_size=opts["min_8bit_size"])
    if kind == "Lion":
        return Lion(groups, lr=groups[0]["lr"], betas=tuple(opts["betas"]), weight_decay=opts["weight_decay"])
    if kind == "Prodigy":
        kw = {k: (tuple(v) if k == "betas" else v) for k, v in opts.items()}
        return Prodigy(groups, lr=max(g["lr"] for g in groups), **kw)
    if kind == "Adafactor":
        from transformers.optimization import Adafactor
        kw = {k: (tuple(v) if k == "eps" else v) for k, v in opts.items()}
        lr = None if opts.get("relative_step", True) else groups[0]["lr"]
        if lr is None:
            groups = [{k: v for k, v in g.items() if k != "lr"} for g in groups]
        return Adafactor(groups, lr=lr, **kw)
    raise ValueError(kind)


def run_case(name: str) -> None:
    kind, opts, groups, scales, zero_init = CASES[name]
    dtype = HALF.get(name, torch.float32)
    shapes = CASE_SHAPES.get(name, SHAPES)
    gen = torch.Generator().manual_seed(sum(map(ord, name)) * 7919)
    params = {}
    for pname, shape in shapes.items():
        t = torch.randn(shape, generator=gen) * INIT_SCALE.get(name, 0.5)
        if pname in zero_init:
            t = torch.zeros(shape)
        params[pname] = torch.nn.Parameter(t.to(dtype))
    direction = {p: torch.randn(s, generator=gen) for p, s in shapes.items()}
    grads = [{p: ((direction[p] + 0.7 * torch.randn(s, generator=gen)) * (0.5 + 0.25 * k)).to(dtype)
              for p, s in shapes.items()} for k in range(STEPS)]

    out = {f"param.{p}.init": params[p].detach().clone() for p in shapes}
    torch_groups = [{"params": [params[p] for p in names], "lr": lr} for (_, lr, names) in groups]
    opt = make_optimizer(kind, opts, torch_groups)
    base_lrs = [g.get("lr") for g in opt.param_groups]
    for k in range(STEPS):
        for g, base in zip(opt.param_groups, base_lrs):
            if base is not None:
                g["lr"] = base * scales[k]
        for p in shapes:
            params[p].grad = grads[k][p].clone()
            out[f"grad.{k}.{p}"] = grads[k][p].clone()
        if kind == "Prodigy":
            # prodigyopt 1.1.2 still updates the params of an lr=0 group (with denominator d·eps,
            # which blows them up); Loft freezes them. A param without a gradient is skipped by
            # both, so the frozen group's params carry no gradient here.
            for (_, lr, names) in groups:
                if lr == 0.0:
                    for p in names:
                        params[p].grad = None
        opt.step()
        for p in shapes:
            out[f"param.{p}.step{k + 1}"] = params[p].detach().clone()
        if kind == "Prodigy":
            out[f"prodigy.d.step{k + 1}"] = torch.tensor([opt.param_groups[0]["d"]], dtype=torch.float64)
    if kind == "AdamW8bit":
        out["qmap.signed"] = bitsandbytes.functional.create_dynamic_map(signed=True)
        out["qmap.unsigned"] = bitsandbytes.functional.create_dynamic_map(signed=False)
    out = {k: v.contiguous() for k, v in out.items()}
    meta = {
        "optimizer": kind,
        "options": json.dumps(opts),
        "groups": json.dumps([{"name": g, "lr": lr, "params": names} for (g, lr, names) in groups]),
        "lr_scale": json.dumps(scales),
        "steps": str(STEPS),
        "dtype": str(dtype).removeprefix("torch."),
        "reference": reference(kind),
    }
    save_file(out, str(OUT / f"{name}.safetensors"), metadata=meta)
    print(f"{name}: {kind}, max |Δparam| after {STEPS} steps = "
          f"{max((out[f'param.{p}.step{STEPS}'] - out[f'param.{p}.init']).abs().max().item() for p in shapes):.3e}")


def reference(kind: str) -> str:
    if kind == "AdamW":
        return f"torch.optim.AdamW (torch {torch.__version__}, foreach=False)"
    if kind == "AdamW8bit":
        import bitsandbytes
        return f"bitsandbytes.optim.AdamW8bit (bitsandbytes {bitsandbytes.__version__}, CPU)"
    if kind == "Lion":
        return f"lion_pytorch.Lion (lion-pytorch {getattr(lion_pytorch, '__version__', '0.2.5')})"
    if kind == "Prodigy":
        return "prodigyopt.Prodigy (prodigyopt 1.1.2)"
    import transformers
    return f"transformers.optimization.Adafactor (transformers {transformers.__version__})"


# name -> (diffusers scheduler name, warmup, training steps, num_cycles or None, power or None, base lr)
SCHEDULERS = {
    "constant": ("constant", 10, 100, None, None, 1e-4),
    "constant_with_warmup": ("constant_with_warmup", 10, 100, None, None, 1e-4),
    "linear": ("linear", 10, 100, None, None, 1e-4),
    "linear_nowarmup": ("linear", 0, 100, None, None, 1e-4),
    "cosine": ("cosine", 10, 100, None, None, 1e-4),
    "cosine_with_restarts": ("cosine_with_restarts", 10, 100, 3, None, 1e-4),
    "cosine_with_restarts_1": ("cosine_with_restarts", 10, 100, 1, None, 1e-4),
    "polynomial": ("polynomial", 10, 100, None, 1.0, 1e-4),
    "polynomial_pow2": ("polynomial", 10, 100, None, 2.0, 1e-3),
    "polynomial_pow05": ("polynomial", 0, 100, None, 0.5, 2e-6),
}
SCHED_STEPS = 111  # values at steps 0..=110: 10 past the end check the clamping


def run_schedulers() -> None:
    import diffusers
    from diffusers.optimization import get_scheduler
    out, meta = {}, {}
    for name, (sched, warmup, total, cycles, power, base_lr) in SCHEDULERS.items():
        p = torch.nn.Parameter(torch.zeros(1))
        opt = torch.optim.SGD([p], lr=base_lr)
        kw = {"num_warmup_steps": warmup, "num_training_steps": total}
        if cycles is not None:
            kw["num_cycles"] = cycles
        if power is not None:
            kw["power"] = power
        s = get_scheduler(sched, opt, **kw)
        vals = []
        for _ in range(SCHED_STEPS):
            vals.append(s.get_last_lr()[0])
            opt.step()
            s.step()
        out[f"lr.{name}"] = torch.tensor(vals, dtype=torch.float64)
        meta[name] = json.dumps({"lr_scheduler": sched, "lr_warmup_steps": warmup, "max_train_steps": total,
                                 "lr_scheduler_num_cycles": cycles, "lr_scheduler_power": power,
                                 "learning_rate": base_lr})
    meta["reference"] = f"diffusers.optimization.get_scheduler (diffusers {diffusers.__version__})"
    save_file(out, str(OUT / "schedulers.safetensors"), metadata=meta)
    print(f"schedulers: {len(SCHEDULERS)} cases x {SCHED_STEPS} steps")


def run_clip() -> None:
    """torch.nn.utils.clip_grad_norm_ on the three shapes: one case that clips, one that does not."""
    gen = torch.Generator().manual_seed(4242)
    out = {}
    for case, scale, max_norm in (("clip", 2.0, 1.0), ("noclip", 0.01, 1.0)):
        params = {p: torch.nn.Parameter(torch.zeros(s)) for p, s in SHAPES.items()}
        for p, s in SHAPES.items():
            params[p].grad = torch.randn(s, generator=gen) * scale
            out[f"{case}.grad.{p}"] = params[p].grad.clone()
        total = torch.nn.utils.clip_grad_norm_(list(params.values()), max_norm)
        out[f"{case}.total_norm"] = total.reshape(1).to(torch.float64)
        out[f"{case}.max_norm"] = torch.tensor([max_norm], dtype=torch.float64)
        for p in SHAPES:
            out[f"{case}.clipped.{p}"] = params[p].grad.clone()
    save_file(out, str(OUT / "clip_grad_norm.safetensors"),
              metadata={"reference": f"torch.nn.utils.clip_grad_norm_ (torch {torch.__version__})"})
    print("clip_grad_norm: 2 cases")


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    names = sys.argv[1:] or list(CASES) + ["schedulers", "clip"]
    for n in names:
        if n == "schedulers":
            run_schedulers()
        elif n == "clip":
            run_clip()
        else:
            run_case(n)


if __name__ == "__main__":
    main()
