#!/usr/bin/env python3
"""Parity fixtures for Loft's 13 network algorithms (run by hand, never by CI).

    .venv-parity/bin/python tests/parity/make_network_fixtures.py

Writes
  tests/fixtures/networks/<case>.safetensors        one adapter on one layer
  tests/fixtures/networks/files/<algo>.safetensors  a kohya/LyCORIS-format file
  tests/fixtures/networks/files/<algo>.expected.safetensors

References (see tests/parity/README.md for the full contract):
  * LyCORIS algorithms: the module classes of lycoris-lora 4.1.3
    (lycoris.modules.*), used directly, in eval mode, rebuild and bypass mode.
    ΔW comes from the correct math: lycoris.functional.*.diff_weight where
    reference/algorithms.md §5 says it is right (LoCon, LoHa, DIAG-OFT,
    BOFT), our own few lines elsewhere (LoKr: functional.lokr mis-scales
    Tucker with a full w1; LoHa/LoKr get_diff_weight double-scale).  Every
    ΔW / W′ is checked in this script against the module's own forward.
  * kohya LoRA / LoCon: networks/lora.py's math written out here
    (y = org(x) + up(down(x))·m·alpha/r); sd-scripts is not needed.
  * ABBA and GLoRA-Ex are NOT in upstream LyCORIS 4.1.3.  Their reference math
    is written here in torch from reference/algorithms.md, following the forks
    that carry them (Ktiseos-Nyx/LyCORIS lycoris/modules/abba.py and
    glora_extended.py).  DoRA on ABBA has no upstream at all: it follows the
    LyCORIS DoRA rule of §0 applied to W + ΔW_abba (Loft's own extension).

Every computation runs in float64 from float32-representable inputs (LyCORIS'
OFT/BOFT force a float32 inverse, so those two run in float32), and every
tensor is stored as float32.
"""

from __future__ import annotations

import json
import math
import os
import sys
import zlib
from pathlib import Path

os.environ.setdefault("LYCORIS_KERNEL_BACKEND", "torch")

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import save_file

import lycoris.modules.dylora as lyco_dylora
from lycoris.functional import boft as fboft
from lycoris.functional import diag_oft as fdiag_oft
from lycoris.functional import locon as flocon
from lycoris.functional import loha as floha
from lycoris.modules import (
    ButterflyOFTModule,
    DiagOFTModule,
    DyLoraModule,
    FullModule,
    GLoRAModule,
    IA3Module,
    LoConModule,
    LohaModule,
    LokrModule,
    NormModule,
)

ROOT = Path(__file__).resolve().parents[2]
OUT = ROOT / "tests" / "fixtures" / "networks"
FILES = OUT / "files"

LYCORIS_VERSION = "4.1.3"
torch.set_num_threads(2)

# --------------------------------------------------------------------------
# layers
# --------------------------------------------------------------------------

LIN = dict(layer="linear", cin=32, cout=48, bias=True)
LIN_NB = dict(layer="linear", cin=32, cout=48, bias=False)
CONV3 = dict(layer="conv", cin=16, cout=24, k=3, s=1, p=1, bias=True)
CONV3S2 = dict(layer="conv", cin=16, cout=24, k=3, s=2, p=1, bias=True)
CONV1 = dict(layer="conv", cin=16, cout=24, k=1, s=1, p=0, bias=True)
GN = dict(layer="groupnorm", groups=4, c=24)
LN = dict(layer="layernorm", c=32)


def make_layer(spec: dict) -> nn.Module:
    if spec["layer"] == "linear":
        return nn.Linear(spec["cin"], spec["cout"], bias=spec["bias"])
    if spec["layer"] == "conv":
        return nn.Conv2d(
            spec["cin"], spec["cout"], spec["k"], spec["s"], spec["p"], bias=spec["bias"]
        )
    if spec["layer"] == "groupnorm":
        return nn.GroupNorm(spec["groups"], spec["c"])
    if spec["layer"] == "layernorm":
        return nn.LayerNorm(spec["c"])
    raise ValueError(spec)


def input_shape(spec: dict) -> tuple:
    if spec["layer"] == "linear":
        return (2, 4, spec["cin"])  # tokens, as in attention / MLP layers
    if spec["layer"] == "conv":
        return (2, spec["cin"], 4, 4)
    if spec["layer"] == "groupnorm":
        return (2, spec["c"], 4, 4)
    if spec["layer"] == "layernorm":
        return (2, 5, spec["c"])
    raise ValueError(spec)


def layer_op(spec: dict, x, w, b):
    """The layer's own op with explicit weight/bias (the rebuild-mode op)."""
    if spec["layer"] == "linear":
        return F.linear(x, w, b)
    if spec["layer"] == "conv":
        return F.conv2d(x, w, b, stride=spec["s"], padding=spec["p"])
    if spec["layer"] == "groupnorm":
        return F.group_norm(x, spec["groups"], w, b, eps=1e-5)
    if spec["layer"] == "layernorm":
        return F.layer_norm(x, (spec["c"],), w, b, eps=1e-5)
    raise ValueError(spec)


# --------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a = a.detach().double()
    b = b.detach().double()
    assert a.shape == b.shape, (a.shape, b.shape)
    return float((a - b).abs().max() / max(float(b.abs().max()), 1e-6))


def check(what: str, a, b, tol: float):
    e = rel_err(a, b)
    if not e <= tol:
        raise AssertionError(f"{what}: rel err {e:.3e} > {tol:.1e}")


def f32_exact(t: torch.Tensor) -> torch.Tensor:
    """Round to float32 then return in the working dtype."""
    return t.float().to(t.dtype)


def weight_decompose(w, dora_scale, m, wd_on_output):
    """LyCORIS DoRA (§0): W′ = w·s, s = dora_scale/(‖w‖+eps); m≠1: s ← m(s−1)+1."""
    nd = w.dim() - 1
    eps = torch.finfo(w.dtype).eps
    if wd_on_output:
        norm = w.reshape(w.shape[0], -1).norm(dim=1).reshape(w.shape[0], *[1] * nd)
    else:
        norm = (
            w.transpose(0, 1)
            .reshape(w.shape[1], -1)
            .norm(dim=1)
            .reshape(w.shape[1], *[1] * nd)
            .transpose(0, 1)
        )
    s = dora_scale / (norm + eps)
    if m != 1:
        s = m * (s - 1) + 1
    return w * s


def dora_init(w, wd_on_output):
    nd = w.dim() - 1
    if wd_on_output:
        return w.reshape(w.shape[0], -1).norm(dim=1).reshape(w.shape[0], *[1] * nd)
    return (
        w.transpose(0, 1)
        .reshape(w.shape[1], -1)
        .norm(dim=1)
        .reshape(w.shape[1], *[1] * nd)
        .transpose(0, 1)
    )


class FixedRandom:
    """Stands in for `random` inside lycoris.modules.dylora: pins the block."""

    def __init__(self, value):
        self.value = value

    def randint(self, a, b):
        assert a <= self.value <= b
        return self.value


# --------------------------------------------------------------------------
# one case = one adapter on one layer
# --------------------------------------------------------------------------


class Case:
    """What a builder returns.

    params:   {state-dict name: tensor (requires_grad for trainable ones)}
    buffers:  {state-dict name: tensor} (alpha, on_input)
    forward:  x -> y, rebuild mode (differentiable w.r.t. x and params)
    bypass:   x -> y, bypass mode, or None
    dw, db:   ΔW (and Δb), scale included, multiplier excluded
    merged:   (W′, b′) at the case's multiplier
    extra:    more tensors to store
    """

    def __init__(self):
        self.params = {}
        self.buffers = {}
        self.forward = None
        self.bypass = None
        self.dw = None
        self.db = None
        self.merged = None
        self.extra = {}
        self.meta = {}


def seeded(name: str) -> torch.Generator:
    g = torch.Generator().manual_seed(zlib.crc32(name.encode()) & 0x7FFFFFFF)
    torch.manual_seed(zlib.crc32(name.encode()) & 0x7FFFFFFF)
    return g


def randn(g, shape, std=1.0, dtype=torch.float64):
    return f32_exact((torch.randn(*shape, generator=g, dtype=torch.float32) * std).to(dtype))


def randomize_module(mod: nn.Module, g, stds: dict | None = None):
    """Overwrite every adapter parameter with seeded random values (ΔW ≠ 0)."""
    stds = stds or {}
    with torch.no_grad():
        for name, p in mod.named_parameters():
            if name == "scalar":
                p.copy_(f32_exact(0.5 + torch.rand((), generator=g, dtype=torch.float32).to(p.dtype)))
            elif name == "dora_scale":
                p.copy_(f32_exact(p * (1 + 0.1 * torch.randn(p.shape, generator=g).to(p.dtype))))
            elif name == "rescale":
                p.copy_(f32_exact(1 + 0.1 * torch.randn(p.shape, generator=g).to(p.dtype)))
            else:
                std = 0.3
                for key, s in stds.items():
                    if key in name:
                        std = s
                p.copy_(randn(g, p.shape, std, p.dtype))


# Module parameter name -> LyCORIS state-dict name, where they differ.
RENAME = {
    FullModule: {"weight": "diff", "bias": "diff_b"},
}

LYCO_CLASS = {
    "lycoris_locon": LoConModule,
    "loha": LohaModule,
    "lokr": LokrModule,
    "ia3": IA3Module,
    "dylora": DyLoraModule,
    "diag_oft": DiagOFTModule,
    "boft": ButterflyOFTModule,
    "glora": GLoRAModule,
    "full": FullModule,
    "train_norm": NormModule,
}


def lyco_kwargs(algo: str, o: dict) -> dict:
    kw = {}
    if algo in ("lycoris_locon", "loha", "lokr", "glora", "dylora", "diag_oft", "boft"):
        kw["lora_dim"] = o["rank"]
    if algo in ("lycoris_locon", "loha", "lokr", "glora", "dylora"):
        kw["alpha"] = o["alpha"]
    if algo in ("lycoris_locon", "loha", "lokr"):
        kw.update(
            use_tucker=o.get("use_tucker", False),
            use_scalar=o.get("use_scalar", False),
            weight_decompose=o.get("dora_wd", False),
            wd_on_out=o.get("wd_on_output", True),
            rs_lora=o.get("rs_lora", False),
        )
    if algo == "glora":
        kw.update(use_scalar=o.get("use_scalar", False), rs_lora=o.get("rs_lora", False))
    if algo == "lokr":
        kw.update(
            factor=o.get("factor", -1),
            decompose_both=o.get("decompose_both", False),
            full_matrix=o.get("full_matrix", False),
            unbalanced_factorization=o.get("unbalanced_factorization", False),
        )
    if algo == "ia3":
        kw["train_on_input"] = o.get("train_on_input", False)
    if algo == "dylora":
        kw["block_size"] = o["block_size"]
    if algo in ("diag_oft", "boft"):
        kw.update(constraint=o.get("constraint", 0.0), rescaled=o.get("rescaled", False))
    return kw


def build_lycoris(name, algo, spec, o, m, dtype) -> Case:
    g = seeded(name)
    org = make_layer(spec)
    with torch.no_grad():
        for p in org.parameters():
            p.copy_(f32_exact(p))
        if spec["layer"] in ("groupnorm", "layernorm"):
            # non-trivial affine parameters
            org.weight.copy_(f32_exact(1 + 0.2 * torch.randn(org.weight.shape, generator=g)))
            org.bias.copy_(f32_exact(0.2 * torch.randn(org.bias.shape, generator=g)))
    org = org.to(dtype)
    cls = LYCO_CLASS[algo]
    mod = cls(f"lora_{name}", org, multiplier=m, **lyco_kwargs(algo, o))
    mod = mod.to(dtype)
    mod.eval()
    stds = {"oft_blocks": 0.1, "w_norm": 0.1, "b_norm": 0.1}
    if algo == "full":
        stds = {"weight": 0.05, "bias": 0.05}
    if algo == "loha":
        stds = {"hada_t": 0.5, "hada_w1_a": 0.3, "hada_w2_a": 0.3, "hada_w1_b": 0.6, "hada_w2_b": 0.6}
    randomize_module(mod, g, stds)
    if algo == "dylora":
        # Pin the block LyCORIS draws each step to the last one (full rank).
        lyco_dylora.random = FixedRandom(mod.block_count - 1)

    W = org.weight.detach()
    B = org.bias.detach() if getattr(org, "bias", None) is not None else None
    c = Case()
    c.org = org
    c.mod = mod
    rename = RENAME.get(cls, {})

    # ---- parameters under their state-dict names ----
    if algo == "dylora":
        up = torch.cat([p for p in mod.up_list], dim=1)
        down = torch.cat([p for p in mod.down_list], dim=0).reshape(mod.lora_dim, -1, *W.shape[2:])
        up = up.detach().clone().requires_grad_(True)
        down = down.detach().clone().requires_grad_(True)
        c.params["lora_up.weight"] = up  # (out, r), 2-D even for conv
        c.params["lora_down.weight"] = down  # (r, in, *k), as in the file
        c.buffers["alpha"] = mod.alpha.detach().clone()
    else:
        for pname, p in mod.named_parameters():
            c.params[rename.get(pname, pname)] = p
        if hasattr(mod, "alpha") and algo not in ("full", "train_norm", "ia3"):
            c.buffers["alpha"] = mod.alpha.detach().clone()
        if algo == "ia3":
            c.buffers["on_input"] = mod.on_input.detach().clone()

    shape = tuple(W.shape)
    P = c.params
    scalar = P["scalar"] if "scalar" in P else 1.0

    # ---- ΔW by the correct math ----
    if algo == "lycoris_locon":
        c.dw = flocon.diff_weight(
            P["lora_down.weight"], P["lora_up.weight"], P.get("lora_mid.weight"), gamma=mod.scale
        ).reshape(shape) * scalar
        check(f"{name} dw vs module", c.dw, mod.get_diff_weight(1)[0], 1e-12)
    elif algo == "loha":
        c.dw = floha.diff_weight(
            P["hada_w1_b"], P["hada_w1_a"], P["hada_w2_b"], P["hada_w2_a"],
            P.get("hada_t1"), P.get("hada_t2"), gamma=torch.tensor(mod.scale, dtype=W.dtype),
        ).reshape(shape) * scalar
        check(f"{name} dw vs module forward path", c.dw, mod.get_weight(shape) * scalar, 1e-12)
    elif algo == "lokr":
        w1 = P["lokr_w1"] if "lokr_w1" in P else P["lokr_w1_a"] @ P["lokr_w1_b"]
        if "lokr_w2" in P:
            w2 = P["lokr_w2"]
        elif "lokr_t2" in P:
            # w2[p, r, k...] = Σ_ij t2[i, j, k...] w2_a[i, p] w2_b[j, r]
            w2 = torch.einsum("ijhw,ip,jr->prhw", P["lokr_t2"], P["lokr_w2_a"], P["lokr_w2_b"])
        else:
            w2a, w2b = P["lokr_w2_a"], P["lokr_w2_b"]
            w2 = (w2a @ w2b).reshape(w2a.shape[0], -1, *shape[2:])
        while w1.dim() < w2.dim():
            w1 = w1.unsqueeze(-1)
        c.dw = torch.kron(w1.contiguous(), w2.contiguous()).reshape(shape) * mod.scale * scalar
        check(f"{name} dw vs module forward path", c.dw, mod.get_weight(shape) * scalar, 1e-12)
    elif algo == "ia3":
        w = P["weight"]
        if o.get("train_on_input"):
            c.dw = W * w.reshape(1, -1, *[1] * (W.dim() - 2))
        else:
            c.dw = W * w.reshape(-1, *[1] * (W.dim() - 1))
        check(f"{name} dw vs module", c.dw, mod.get_diff_weight(1)[0], 1e-12)
    elif algo == "dylora":
        n = mod.block_count
        c.dw = (P["lora_up.weight"] @ P["lora_down.weight"].reshape(mod.lora_dim, -1)).reshape(shape) * (o["alpha"] / n)
        c.meta["dylora_block"] = str(n - 1)
        c.meta["dylora_scale"] = "alpha/block_count"
    elif algo == "diag_oft":
        rescale = P.get("rescale")
        c.dw = fdiag_oft.diff_weight(W, P["oft_blocks"], rescale, constraint=mod.constraint)
        check(f"{name} dw vs module", c.dw, mod.get_diff_weight(1)[0], 1e-6)
    elif algo == "boft":
        rescale = P.get("rescale")
        c.dw = fboft.diff_weight(W, P["oft_blocks"], rescale, constraint=mod.constraint, scale=1)
        check(f"{name} dw vs module", c.dw, mod.get_diff_weight(1)[0], 1e-6)
    elif algo == "glora":
        a1 = P["a1.weight"].reshape(P["a1.weight"].shape[0], -1)  # (in, r)
        a2 = P["a2.weight"].reshape(P["a2.weight"].shape[0], -1)  # (r, in)
        b1 = P["b1.weight"].reshape(P["b1.weight"].shape[0], -1)  # (out, r)
        b2 = P["b2.weight"].reshape(P["b2.weight"].shape[0], -1)  # (r, in·∏k)
        wa = torch.einsum("oi...,ij->oj...", W, a1 @ a2)
        c.dw = (wa + (b1 @ b2).reshape(shape)) * mod.scale * scalar
        check(f"{name} dw vs module", c.dw, mod.get_diff_weight(1)[0], 1e-12)
    elif algo == "full":
        c.dw = P["diff"]
        c.db = P.get("diff_b")
    elif algo == "train_norm":
        c.dw = P["w_norm"]
        c.db = P["b_norm"]
    else:
        raise ValueError(algo)

    # ---- W′ at multiplier m ----
    mb = B
    if algo in ("lycoris_locon", "loha", "lokr") and o.get("dora_wd"):
        mw = weight_decompose(W + c.dw, P["dora_scale"], m, o.get("wd_on_output", True))
    elif algo == "ia3":
        w = P["weight"]
        if o.get("train_on_input"):
            mw = W * (1 + m * w.reshape(1, -1, *[1] * (W.dim() - 2)))
        else:
            mw = W * (1 + m * w.reshape(-1, *[1] * (W.dim() - 1)))
    elif algo == "diag_oft":
        blocks = P["oft_blocks"]
        nb, bs, _ = blocks.shape
        q = blocks - blocks.transpose(1, 2)
        if mod.constraint > 0:
            qn = torch.norm(q) + 1e-8
            if qn > mod.constraint:
                q = q * mod.constraint / qn
        eye = torch.eye(bs, dtype=q.dtype)
        r = (eye + q) @ torch.linalg.inv(eye - q)
        rm = m * (r - eye) + eye
        wk = W.reshape(nb, bs, -1)
        mw = torch.einsum("knm,knx->kmx", rm, wk).reshape(shape)  # R_mᵀ W_k
        if "rescale" in P:
            mw = P["rescale"] * mw
    elif algo == "boft":
        mw = W + fboft.diff_weight(W, P["oft_blocks"], P.get("rescale"), constraint=mod.constraint, scale=m)
    elif algo in ("full", "train_norm"):
        mw = W + m * c.dw
        if c.db is not None:
            mb = B + m * c.db
    else:
        mw = W + m * c.dw
    c.merged = (mw, mb)

    # ---- forwards ----
    if algo == "dylora":
        # LyCORIS' forward at the pinned full-rank block, with its detach of
        # the lower blocks, is checked below; the differentiable reference is
        # the same ΔW without the detach (what a full-rank eval forward
        # differentiates to).
        def fwd(x):
            dw = (P["lora_up.weight"] @ P["lora_down.weight"].reshape(mod.lora_dim, -1)).reshape(shape) * (o["alpha"] / mod.block_count)
            return layer_op(spec, x, W, B) + layer_op(spec, x, m * dw, None)

        c.forward = fwd
        c.lyco_forward = mod.forward
    else:
        c.forward = mod.forward

    bypass_ok = algo not in ("full", "train_norm", "dylora") and not o.get("dora_wd")
    if bypass_ok:
        def byp(x):
            mod.bypass_mode = True
            try:
                return mod.forward(x)
            finally:
                mod.bypass_mode = False

        c.bypass = byp
        if algo == "diag_oft":
            # 4.1.3's DIAG-OFT bypass at multiplier ≠ 1 fails on a view of a
            # non-contiguous einsum result; write it out (y′ = rescale ⊙ R_mᵀ-
            # blockwise applied to org(x), bias included) and check it against
            # the module where the module runs.
            def oft_byp(x):
                yo = org(x)
                if spec["layer"] == "conv":
                    yo = yo.movedim(1, -1)
                lead = yo.shape[:-1]
                yk = yo.reshape(*lead, nb, bs)
                out = torch.einsum("knm,...kn->...km", rm, yk).reshape(*lead, -1)
                if "rescale" in P:
                    out = out * P["rescale"].reshape(-1)
                if spec["layer"] == "conv":
                    out = out.movedim(-1, 1)
                return out

            def byp_checked(x):
                ours = oft_byp(x)
                try:
                    theirs = byp(x)
                except RuntimeError:
                    c.meta["bypass_reference"] = "written out (lycoris 4.1.3 DIAG-OFT bypass fails at multiplier != 1)"
                    return ours
                check(f"{name}: oft bypass vs module", ours, theirs, 3e-6)
                return theirs

            c.bypass = byp_checked
    return c


# ---- kohya LoRA / LoCon (networks/lora.py), written out ----


def build_kohya(name, algo, spec, o, m, dtype) -> Case:
    g = seeded(name)
    org = make_layer(spec)
    with torch.no_grad():
        for p in org.parameters():
            p.copy_(f32_exact(p))
    org = org.to(dtype)
    W = org.weight.detach()
    B = org.bias.detach() if org.bias is not None else None
    r, alpha = o["rank"], o["alpha"]
    if spec["layer"] == "linear":
        down = randn(g, (r, spec["cin"]), 0.3, dtype)
        up = randn(g, (spec["cout"], r), 0.3, dtype)
    else:
        down = randn(g, (r, spec["cin"], spec["k"], spec["k"]), 0.3, dtype)
        up = randn(g, (spec["cout"], r, 1, 1), 0.3, dtype)
    down.requires_grad_(True)
    up.requires_grad_(True)
    scale = alpha / r
    c = Case()
    c.org = org
    c.params = {"lora_down.weight": down, "lora_up.weight": up}
    c.buffers = {"alpha": torch.tensor(float(alpha), dtype=dtype)}
    shape = tuple(W.shape)
    c.dw = (up.reshape(up.shape[0], -1) @ down.reshape(r, -1)).reshape(shape) * scale
    c.merged = (W + m * c.dw, B)

    def fwd(x):
        return layer_op(spec, x, W, B) + layer_op(spec, x, m * ((up.reshape(up.shape[0], -1) @ down.reshape(r, -1)).reshape(shape) * scale), None)

    def byp(x):  # LoRAModule.forward: org(x) + up(down(x))·m·scale
        if spec["layer"] == "linear":
            lx = F.linear(F.linear(x, down), up)
        else:
            lx = F.conv2d(F.conv2d(x, down, stride=spec["s"], padding=spec["p"]), up)
        return org(x) + lx * m * scale

    c.forward = fwd
    c.bypass = byp
    return c


# ---- ABBA (not upstream; fork math, §1) ----


def build_abba(name, algo, spec, o, m, dtype) -> Case:
    g = seeded(name)
    org = make_layer(spec)
    with torch.no_grad():
        for p in org.parameters():
            p.copy_(f32_exact(p))
    org = org.to(dtype)
    W = org.weight.detach()
    B = org.bias.detach() if org.bias is not None else None
    r, alpha = o["rank"], o["alpha"]
    r1 = r // 2
    r2 = r - r1
    s = alpha**2 / math.sqrt(r1 * r2)
    if o.get("rs_lora"):
        raise ValueError("abba has no rs_lora")
    k = [] if spec["layer"] == "linear" else [spec["k"], spec["k"]]
    kk = [] if spec["layer"] == "linear" else [1, 1]
    P = {
        "lora_down1.weight": randn(g, (r1, spec["cin"], *k), 0.3, dtype),
        "lora_up1.weight": randn(g, (spec["cout"], r1, *kk), 0.3, dtype),
        "lora_down2.weight": randn(g, (r2, spec["cin"], *k), 0.3, dtype),
        "lora_up2.weight": randn(g, (spec["cout"], r2, *kk), 0.3, dtype),
    }
    if o.get("use_scalar"):
        P["scalar"] = f32_exact(torch.tensor(0.5 + torch.rand((), generator=g).item(), dtype=dtype))
    if o.get("dora_wd"):
        P["dora_scale"] = f32_exact(
            dora_init(W, o.get("wd_on_output", True)) * (1 + 0.1 * torch.randn(dora_init(W, o.get("wd_on_output", True)).shape, generator=g).to(dtype))
        )
    for p in P.values():
        p.requires_grad_(True)
    shape = tuple(W.shape)

    def delta():
        u1 = P["lora_up1.weight"].reshape(spec["cout"], -1)
        d1 = P["lora_down1.weight"].reshape(r1, -1)
        u2 = P["lora_up2.weight"].reshape(spec["cout"], -1)
        d2 = P["lora_down2.weight"].reshape(r2, -1)
        dw = ((u1 @ d1) * (u2 @ d2)).reshape(shape) * s
        if "scalar" in P:
            dw = dw * P["scalar"]
        return dw

    def merged():
        dw = delta()
        if o.get("dora_wd"):
            return weight_decompose(W + dw, P["dora_scale"], m, o.get("wd_on_output", True))
        return W + m * dw

    c = Case()
    c.org = org
    c.params = P
    c.buffers = {"alpha": torch.tensor(float(alpha), dtype=dtype)}
    c.dw = delta()
    c.merged = (merged(), B)

    def fwd(x):
        return layer_op(spec, x, W, B) + layer_op(spec, x, merged() - W, None)

    c.forward = fwd
    if not o.get("dora_wd"):
        def byp(x):
            if spec["layer"] == "linear":
                # Khatri-Rao form of the fork's linear bypass
                a_star = (P["lora_down1.weight"].unsqueeze(1) * P["lora_down2.weight"].unsqueeze(0)).reshape(r1 * r2, -1)
                b_star = (P["lora_up1.weight"].unsqueeze(2) * P["lora_up2.weight"].unsqueeze(1)).reshape(spec["cout"], r1 * r2)
                d = F.linear(F.linear(x, a_star), b_star) * s
                if "scalar" in P:
                    d = d * P["scalar"]
            else:
                d = layer_op(spec, x, delta(), None)
            return org(x) + m * d

        c.bypass = byp
    return c


# ---- GLoRA-Ex (not upstream; fork math, §1) ----


def build_glora_ex(name, algo, spec, o, m, dtype) -> Case:
    g = seeded(name)
    org = make_layer(spec)
    with torch.no_grad():
        for p in org.parameters():
            p.copy_(f32_exact(p))
    org = org.to(dtype)
    W = org.weight.detach()
    B = org.bias.detach() if org.bias is not None else None
    r, alpha = o["rank"], o["alpha"]
    conv = spec["layer"] == "conv"
    k = [spec["k"], spec["k"]] if conv else []
    one = [1, 1] if conv else []
    cin, cout = spec["cin"], spec["cout"]
    P = {
        "a1.weight": randn(g, (r, cin, *one), 0.3, dtype),
        "a2.weight": randn(g, (cin, r, *one), 0.3, dtype),
        "b1.weight": randn(g, (r, cin, *k), 0.3, dtype),
        "b2.weight": randn(g, (cout, r, *one), 0.3, dtype),
        "c1.weight": randn(g, (r, cin, *one), 0.3, dtype),
        "c2.weight": randn(g, (1, r, *one), 0.3, dtype),
    }
    if B is not None:
        P["d_param"] = randn(g, (cout,), 0.3, dtype)
    P["e_param"] = randn(g, (cout,), 0.1, dtype)
    if o.get("use_scalar"):
        P["scalar"] = f32_exact(torch.tensor(0.5 + torch.rand((), generator=g).item(), dtype=dtype))
    for p in P.values():
        p.requires_grad_(True)
    scale = alpha / (math.sqrt(r) if o.get("rs_lora") else r)
    shape = tuple(W.shape)

    def deltas():
        a1 = P["a1.weight"].reshape(r, cin)
        a2 = P["a2.weight"].reshape(cin, r)
        b1 = P["b1.weight"].reshape(r, -1)
        b2 = P["b2.weight"].reshape(cout, r)
        c1 = P["c1.weight"].reshape(r, cin)
        c2 = P["c2.weight"].reshape(1, r)
        dw = torch.einsum("oi...,ij->oj...", W, a2 @ a1) + (b2 @ b1).reshape(shape)
        cvec = (c2 @ c1).reshape(cin)
        dbc = torch.einsum("oi...,i->o...", W, cvec)
        if conv:
            dbc = dbc.mean(dim=(1, 2))  # the fork averages over kernel positions
        db = dbc + P["e_param"]
        if "d_param" in P:
            db = db + P["d_param"] * B
        s = scale * (P["scalar"] if "scalar" in P else 1.0)
        return dw * s, db * s

    c = Case()
    c.org = org
    c.params = P
    c.buffers = {"alpha": torch.tensor(float(alpha), dtype=dtype)}
    c.dw, c.db = deltas()
    c.merged = (W + m * c.dw, (B if B is not None else 0) + m * c.db)

    def fwd(x):
        dw, db = deltas()
        return layer_op(spec, x, W, B) + layer_op(spec, x, m * dw, m * db)

    c.forward = fwd
    c.bypass = None
    return c


# --------------------------------------------------------------------------
# the case list
# --------------------------------------------------------------------------

CASES: list[tuple[str, str, dict, dict, float]] = []


def case(name, algo, spec, m=1.0, **opts):
    CASES.append((name, algo, spec, opts, m))


# kohya LoRA / LoCon
case("lora_linear", "lora", LIN, rank=4, alpha=2.0)
case("lora_linear_nobias_m07", "lora", LIN_NB, 0.7, rank=4, alpha=8.0)
case("lora_conv1x1", "lora", CONV1, rank=4, alpha=1.0)
case("locon_conv3", "locon", CONV3, rank=4, alpha=2.0)
case("locon_conv3_s2_m07", "locon", CONV3S2, 0.7, rank=4, alpha=4.0)
# LyCORIS LoCon
case("lycoris_locon_linear", "lycoris_locon", LIN, rank=4, alpha=2.0)
case("lycoris_locon_linear_m07", "lycoris_locon", LIN, 0.7, rank=4, alpha=2.0)
case("lycoris_locon_conv3", "lycoris_locon", CONV3, rank=4, alpha=2.0)
case("lycoris_locon_conv3_s2", "lycoris_locon", CONV3S2, rank=4, alpha=1.0)
case("lycoris_locon_conv1x1", "lycoris_locon", CONV1, rank=4, alpha=4.0)
case("lycoris_locon_tucker_conv3", "lycoris_locon", CONV3, rank=4, alpha=2.0, use_tucker=True)
case("lycoris_locon_tucker_conv3_s2", "lycoris_locon", CONV3S2, rank=4, alpha=2.0, use_tucker=True)
case("lycoris_locon_dora_linear", "lycoris_locon", LIN, rank=4, alpha=2.0, dora_wd=True, wd_on_output=True)
case("lycoris_locon_dora_linear_m07", "lycoris_locon", LIN, 0.7, rank=4, alpha=2.0, dora_wd=True, wd_on_output=True)
case("lycoris_locon_dora_in_linear", "lycoris_locon", LIN, rank=4, alpha=2.0, dora_wd=True, wd_on_output=False)
case("lycoris_locon_dora_conv3", "lycoris_locon", CONV3, rank=4, alpha=2.0, dora_wd=True, wd_on_output=True)
case("lycoris_locon_dora_in_conv3", "lycoris_locon", CONV3, rank=4, alpha=2.0, dora_wd=True, wd_on_output=False)
case("lycoris_locon_rs_lora_linear", "lycoris_locon", LIN, rank=8, alpha=4.0, rs_lora=True)
case("lycoris_locon_scalar_linear", "lycoris_locon", LIN, rank=4, alpha=2.0, use_scalar=True)
# LoHa
case("loha_linear", "loha", LIN, rank=4, alpha=2.0)
case("loha_linear_m07", "loha", LIN, 0.7, rank=4, alpha=2.0)
case("loha_conv3", "loha", CONV3, rank=4, alpha=2.0)
case("loha_tucker_conv3", "loha", CONV3, rank=4, alpha=2.0, use_tucker=True)
case("loha_dora_linear", "loha", LIN, rank=4, alpha=2.0, dora_wd=True, wd_on_output=True)
case("loha_dora_in_conv3", "loha", CONV3, rank=4, alpha=2.0, dora_wd=True, wd_on_output=False)
case("loha_rs_scalar_linear", "loha", LIN, rank=4, alpha=2.0, rs_lora=True, use_scalar=True)
# IA3
case("ia3_linear", "ia3", LIN)
case("ia3_linear_m07", "ia3", LIN, 0.7)
case("ia3_conv3", "ia3", CONV3)
case("ia3_linear_on_input", "ia3", LIN, train_on_input=True)
case("ia3_conv3_on_input", "ia3", CONV3, train_on_input=True)
# LoKr
case("lokr_linear", "lokr", LIN, rank=2, alpha=1.0, factor=-1)
case("lokr_linear_m07", "lokr", LIN, 0.7, rank=2, alpha=1.0, factor=-1)
case("lokr_linear_f4", "lokr", LIN, rank=4, alpha=2.0, factor=4)
case("lokr_linear_full_matrix", "lokr", LIN, rank=2, alpha=1.0, factor=-1, full_matrix=True)
case("lokr_linear_decompose_both", "lokr", LIN, rank=2, alpha=1.0, factor=-1, decompose_both=True)
case("lokr_linear_unbalanced", "lokr", LIN, rank=2, alpha=1.0, factor=-1, unbalanced_factorization=True)
case("lokr_conv3", "lokr", CONV3, rank=2, alpha=1.0, factor=-1)
case("lokr_tucker_conv3", "lokr", CONV3, rank=2, alpha=1.0, factor=-1, use_tucker=True)
case("lokr_conv1x1_f4", "lokr", CONV1, rank=2, alpha=1.0, factor=4)
case("lokr_dora_linear", "lokr", LIN, rank=2, alpha=1.0, factor=-1, dora_wd=True, wd_on_output=True)
# DyLoRA (LyCORIS)
case("dylora_linear", "dylora", LIN, rank=4, alpha=2.0, block_size=2)
case("dylora_conv3", "dylora", CONV3, rank=6, alpha=3.0, block_size=2)
# DIAG-OFT
case("diag_oft_linear", "diag_oft", LIN, rank=4)
case("diag_oft_linear_constraint", "diag_oft", LIN, rank=4, constraint=0.005)
case("diag_oft_linear_rescaled_m07", "diag_oft", LIN, 0.7, rank=4, rescaled=True)
case("diag_oft_conv3_rescaled", "diag_oft", CONV3, rank=4, rescaled=True)
# BOFT
case("boft_linear", "boft", LIN, rank=8)
case("boft_conv3", "boft", CONV3, rank=6)
case("boft_linear_rescaled_constraint_m07", "boft", LIN, 0.7, rank=8, rescaled=True, constraint=0.01)
# GLoRA
case("glora_linear", "glora", LIN, rank=4, alpha=2.0)
case("glora_linear_m07", "glora", LIN, 0.7, rank=4, alpha=2.0)
case("glora_conv3", "glora", CONV3, rank=4, alpha=2.0)
case("glora_rs_scalar_linear", "glora", LIN, rank=4, alpha=2.0, rs_lora=True, use_scalar=True)
# GLoRA-Ex (fork math)
case("glora_ex_linear", "glora_ex", LIN, rank=4, alpha=2.0)
case("glora_ex_linear_nobias_m07", "glora_ex", LIN_NB, 0.7, rank=4, alpha=2.0)
case("glora_ex_conv3", "glora_ex", CONV3, rank=4, alpha=2.0)
# ABBA (fork math)
case("abba_linear", "abba", LIN, rank=4, alpha=2.0)
case("abba_linear_scalar_m07", "abba", LIN, 0.7, rank=4, alpha=2.0, use_scalar=True)
case("abba_conv3", "abba", CONV3, rank=4, alpha=2.0)
case("abba_dora_linear", "abba", LIN, rank=4, alpha=2.0, dora_wd=True, wd_on_output=True)
# FULL
case("full_linear", "full", LIN)
case("full_conv3_m07", "full", CONV3, 0.7)
# train_norm (LyCORIS NormModule on GroupNorm / LayerNorm)
case("train_norm_groupnorm", "train_norm", GN)
case("train_norm_layernorm_m07", "train_norm", LN, 0.7)


ALL_OPTION_KEYS = [
    "rank", "alpha", "dora_wd", "wd_on_output", "use_tucker", "rs_lora", "use_scalar",
    "train_on_input", "factor", "unbalanced_factorization", "full_matrix",
    "decompose_both", "block_size", "constraint", "rescaled", "bypass_mode", "train_norm",
]


def loft_options(algo: str, o: dict) -> dict:
    """The fixture's options as Loft NetworkOptions fields (defaults filled)."""
    d = dict(
        rank=o.get("rank", 4), alpha=float(o.get("alpha", o.get("rank", 4))),
        dora_wd=False, wd_on_output=False, use_tucker=False, rs_lora=False,
        use_scalar=False, train_on_input=False, factor=-1,
        unbalanced_factorization=False, full_matrix=False, decompose_both=False,
        block_size=o.get("block_size", 4), constraint=0.0, rescaled=False,
        bypass_mode=False, train_norm=algo == "train_norm",
    )
    for k, v in o.items():
        d[k] = float(v) if k in ("alpha", "constraint") else v
    if d["wd_on_output"]:
        d["dora_wd"] = True
    return d


def build(name, algo, spec, o, m):
    dtype = torch.float32 if algo in ("diag_oft", "boft") else torch.float64
    if algo in ("lora", "locon"):
        return build_kohya(name, algo, spec, o, m, dtype), dtype
    if algo == "abba":
        return build_abba(name, algo, spec, o, m, dtype), dtype
    if algo == "glora_ex":
        return build_glora_ex(name, algo, spec, o, m, dtype), dtype
    return build_lycoris(name, algo, spec, o, m, dtype), dtype


def t32(t):
    return t.detach().to(torch.float32).contiguous().clone()


def write_case(name, algo, spec, o, m):
    c, dtype = build(name, algo, spec, o, m)
    tol = 1e-10 if dtype == torch.float64 else 3e-6
    g = torch.Generator().manual_seed((zlib.crc32(name.encode()) + 1) & 0x7FFFFFFF)
    x = randn(g, input_shape(spec), 1.0, dtype).requires_grad_(True)
    y = c.forward(x)
    gout = randn(g, tuple(y.shape), 1.0, dtype)

    mw, mb = c.merged
    check(f"{name}: rebuild forward vs op(x, W′, b′)", y, layer_op(spec, x, mw, mb), tol)
    if hasattr(c, "lyco_forward"):
        check(f"{name}: lycoris forward vs reference forward", c.lyco_forward(x), y, tol)

    trainable = [k for k, v in c.params.items() if v.requires_grad]
    grads = torch.autograd.grad(
        (y * gout).sum(), [x] + [c.params[k] for k in trainable], allow_unused=True
    )
    y_byp = c.bypass(x) if c.bypass is not None else None
    if y_byp is not None and algo not in ("ia3", "diag_oft", "boft"):
        check(f"{name}: bypass vs rebuild", y_byp, y, tol)
    if y_byp is not None and algo in ("ia3", "diag_oft", "boft") and not spec.get("bias", True):
        check(f"{name}: bypass vs rebuild (no bias)", y_byp, y, tol)

    T = {}
    W = org_weight(c)
    T["org.weight"] = t32(W)
    bias = org_bias(c)
    if bias is not None:
        T["org.bias"] = t32(bias)
    T["x"] = t32(x)
    for k, v in c.params.items():
        T[f"param.{k}"] = t32(v)
    for k, v in c.buffers.items():
        T[f"param.{k}"] = v.detach().contiguous().clone() if k == "on_input" else t32(v)
    if o.get("dora_wd"):
        # dw is always W′(m=1) − W; for DoRA the low-rank ΔW goes to dw.lowrank
        T["dw"] = t32(weight_decompose(W + c.dw, c.params["dora_scale"], 1.0, o.get("wd_on_output", True)) - W)
        T["dw.lowrank"] = t32(c.dw)
    else:
        T["dw"] = t32(c.dw)
    if c.db is not None:
        T["db"] = t32(c.db)
    T["merged.weight"] = t32(mw)
    if mb is not None and (bias is None or not torch.equal(mb, bias)):
        T["merged.bias"] = t32(mb)
    T["y.rebuild"] = t32(y)
    if y_byp is not None:
        T["y.bypass"] = t32(y_byp)
    T["gout"] = t32(gout)
    T["grad.x"] = t32(grads[0])
    for k, gr in zip(trainable, grads[1:]):
        if gr is None:
            gr = torch.zeros_like(c.params[k])
        T[f"grad.param.{k}"] = t32(gr)
    for k, v in c.extra.items():
        T[k] = t32(v)

    meta = {
        "algo": algo,
        "layer": spec["layer"],
        "multiplier": repr(float(m)),
        "options": json.dumps(loft_options(algo, o), sort_keys=True),
        "reference": reference_of(algo),
        "compute_dtype": str(dtype).replace("torch.", ""),
    }
    if spec["layer"] in ("linear", "conv"):
        meta.update({"in": str(spec["cin"]), "out": str(spec["cout"])})
    if spec["layer"] == "conv":
        meta.update({"kernel": str(spec["k"]), "stride": str(spec["s"]), "padding": str(spec["p"])})
    if spec["layer"] == "linear":
        meta.update({"kernel": "1", "stride": "1", "padding": "0"})
    if spec["layer"] == "groupnorm":
        meta.update({"in": str(spec["c"]), "out": str(spec["c"]), "groups": str(spec["groups"]), "eps": "1e-5"})
    if spec["layer"] == "layernorm":
        meta.update({"in": str(spec["c"]), "out": str(spec["c"]), "eps": "1e-5"})
    meta.update(c.meta)
    path = OUT / f"{name}.safetensors"
    save_file(T, str(path), metadata=meta)
    return path


def org_weight(c):
    return c.org.weight.detach() if hasattr(c, "org") else c.W


def org_bias(c):
    if hasattr(c, "org"):
        b = getattr(c.org, "bias", None)
        return None if b is None else b.detach()
    return c.B


def reference_of(algo):
    if algo in ("lora", "locon"):
        return "kohya sd-scripts networks/lora.py math, written out in torch"
    if algo in ("abba", "glora_ex"):
        return "fork math (Ktiseos-Nyx/LyCORIS), written out in torch; not in upstream LyCORIS"
    return f"lycoris-lora=={LYCORIS_VERSION} module, torch=={torch.__version__}"


# --------------------------------------------------------------------------
# kohya-format files
# --------------------------------------------------------------------------

FILE_LAYERS = [
    # (diffusers module path, spec)
    ("down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q", dict(layer="linear", cin=16, cout=24, bias=False)),
    ("down_blocks.0.attentions.0.transformer_blocks.0.ff.net.2", dict(layer="linear", cin=32, cout=16, bias=True)),
    ("down_blocks.0.resnets.0.conv1", dict(layer="conv", cin=8, cout=12, k=3, s=1, p=1, bias=True)),
    ("down_blocks.0.resnets.0.conv_shortcut", dict(layer="conv", cin=8, cout=12, k=1, s=1, p=0, bias=True)),
]
NORM_LAYERS = [
    ("down_blocks.0.resnets.0.norm1", dict(layer="groupnorm", groups=4, c=8)),
    ("down_blocks.0.attentions.0.transformer_blocks.0.norm1", dict(layer="layernorm", c=16)),
]

FILE_SETS = {
    # file name: (algo, options, layers)
    "lora": ("lora", dict(rank=4, alpha=2.0), [0, 1, 3]),  # kohya LoRA: linear + 1x1 only
    "locon": ("locon", dict(rank=4, alpha=2.0), [0, 1, 2, 3]),
    "lycoris_locon": ("lycoris_locon", dict(rank=4, alpha=2.0, use_tucker=True), [0, 1, 2, 3]),
    "lycoris_locon_dora": ("lycoris_locon", dict(rank=4, alpha=2.0, dora_wd=True, wd_on_output=True), [0, 1, 2, 3]),
    "loha": ("loha", dict(rank=4, alpha=2.0, use_tucker=True), [0, 1, 2, 3]),
    "ia3": ("ia3", dict(), [0, 1, 2, 3]),
    "lokr": ("lokr", dict(rank=2, alpha=1.0, factor=-1, use_tucker=True), [0, 1, 2, 3]),
    "dylora": ("dylora", dict(rank=4, alpha=2.0, block_size=2), [0, 1, 2, 3]),
    "diag_oft": ("diag_oft", dict(rank=4, constraint=0.02, rescaled=True), [0, 1, 2, 3]),
    "boft": ("boft", dict(rank=6, rescaled=True), [0, 1, 2, 3]),
    "glora": ("glora", dict(rank=4, alpha=2.0), [0, 1, 2, 3]),
    "glora_ex": ("glora_ex", dict(rank=4, alpha=2.0), [0, 1, 2, 3]),
    "abba": ("abba", dict(rank=4, alpha=2.0), [0, 1, 2, 3]),
    "full": ("full", dict(), [0, 1, 2, 3]),
    "train_norm": ("train_norm", dict(), "norm"),
}


# The files whose expected output also holds W′ at these multipliers (LyCORIS 4.1.3's math).
MULTIPLIER_FILES = ("lycoris_locon_dora", "diag_oft", "boft")
MULTIPLIER_CHECKS = (0.5, 1.5)


def file_module_state(algo, c, o):
    """The tensors LyCORIS (or kohya / the fork) writes for one module."""
    if algo in ("lora", "locon", "abba", "glora_ex"):
        sd = {k: v for k, v in c.params.items() if k != "scalar"}
        if "scalar" in c.params:
            sc = c.params["scalar"]
            if algo == "abba":  # the fork bakes √scalar into both ups
                sd["lora_up1.weight"] = sd["lora_up1.weight"] * sc.sqrt()
                sd["lora_up2.weight"] = sd["lora_up2.weight"] * sc.sqrt()
        sd["alpha"] = c.buffers["alpha"]
        return sd
    # LyCORIS' own state_dict (custom_state_dict where the module has one:
    # scalar folded, DyLoRA blocks concatenated with up 2-D and down (r, in, *k),
    # FULL as diff/diff_b).
    if algo == "full":
        # FULL's custom_state_dict is `weight − org`, valid once apply_to() has
        # folded the original in (as in training); before it, `weight` is the diff.
        before = {k: v.detach().clone() for k, v in c.params.items()}
        c.mod.apply_to()
        sd = dict(c.mod.state_dict())
        assert sorted(sd) == sorted(before), (sorted(sd), sorted(before))
        for k in sd:
            check(f"full file {k}", sd[k], before[k], 1e-12)
        return sd
    return dict(c.mod.state_dict())


def file_expected_dw(algo, c, o):
    """ΔW (and Δb) at multiplier 1 as a correct loader applies the FILE."""
    W = org_weight(c)
    if algo == "dylora":
        # every loader reads a DyLoRA file as a plain LoRA: scale alpha/r
        up, down = c.params["lora_up.weight"], c.params["lora_down.weight"]
        return (up @ down.reshape(o["rank"], -1)).reshape(W.shape) * (o["alpha"] / o["rank"]), None
    mw, mb = c.merged  # built with m = 1
    b = org_bias(c)
    db = None
    if mb is not None and (b is None or not torch.equal(mb, b)):
        db = mb - (b if b is not None else 0)
    return mw - W, db


def write_files():
    FILES.mkdir(parents=True, exist_ok=True)
    for fname, (algo, o, layer_idx) in FILE_SETS.items():
        layers = NORM_LAYERS if layer_idx == "norm" else [FILE_LAYERS[i] for i in layer_idx]
        sd = {}
        exp = {}
        layer_meta = {}
        for path, spec in layers:
            lora_name = "lora_unet_" + path.replace(".", "_")
            layer_meta[lora_name] = spec
            c, dtype = build(f"file_{fname}_{lora_name}", algo, spec, o, 1.0)
            dw, db = file_expected_dw(algo, c, o)
            exp[f"{lora_name}.org.weight"] = t32(org_weight(c))
            b = org_bias(c)
            for k, v in file_module_state(algo, c, o).items():
                sd[f"{lora_name}.{k}"] = v.detach().contiguous().clone() if k == "on_input" else t32(v)
            if b is not None:
                exp[f"{lora_name}.org.bias"] = t32(b)
            exp[f"{lora_name}.dw"] = t32(dw)
            if db is not None:
                exp[f"{lora_name}.db"] = t32(db)
            # Where LyCORIS applies the multiplier inside the math (DoRA's norm, the OFT
            # rotation), W′ at m ≠ 1 is not W + m·ΔW(1): record it at two strengths.
            if fname in MULTIPLIER_FILES:
                for m in MULTIPLIER_CHECKS:
                    cm, _ = build(f"file_{fname}_{lora_name}", algo, spec, o, m)
                    assert torch.equal(org_weight(cm), org_weight(c)), "the same seeded module at every multiplier"
                    exp[f"{lora_name}.merged_m{m}"] = t32(cm.merged[0])
        net_args = {k: v for k, v in o.items() if k not in ("rank", "alpha")}
        if algo in ("lora", "locon"):
            module = "networks.lora"
            if algo == "locon":
                net_args = {"conv_dim": o["rank"], "conv_alpha": o["alpha"]}
        else:
            module = "lycoris.kohya"
            lyco_algo = {"diag_oft": "diag-oft", "lycoris_locon": "locon", "glora_ex": "glora-ex"}.get(algo, algo)
            net_args = {"algo": lyco_algo, **net_args}
            if algo == "train_norm":
                net_args = {"algo": "lora", "train_norm": True}
        meta = {
            "ss_network_module": module,
            "ss_network_dim": str(o.get("rank", 1)),
            "ss_network_alpha": str(float(o.get("alpha", o.get("rank", 1)))),
            "ss_network_args": json.dumps({k: str(v) for k, v in net_args.items()}),
            "loft_fixture_algo": algo,
            "loft_fixture_options": json.dumps(loft_options(algo, o), sort_keys=True),
        }
        save_file(sd, str(FILES / f"{fname}.safetensors"), metadata=meta)
        save_file(exp, str(FILES / f"{fname}.expected.safetensors"), metadata={
            "source": f"{fname}.safetensors",
            "layers": json.dumps(layer_meta, sort_keys=True),
            "multiplier": "1.0",
            "dw": "W′ − W at multiplier 1, by the correct math (loader view; DyLoRA read as alpha/r)",
            "merged_m": "W′ at multipliers " + ", ".join(map(str, MULTIPLIER_CHECKS)) + " with LyCORIS's semantics (m inside DoRA's norm and the OFT rotation)" if fname in MULTIPLIER_FILES else "",
        })


def main():
    OUT.mkdir(parents=True, exist_ok=True)
    only = set(sys.argv[1:])
    for f in OUT.glob("*.safetensors"):
        if not only:
            f.unlink()
    names = set()
    for name, algo, spec, o, m in CASES:
        assert name not in names, name
        names.add(name)
        if only and name not in only:
            continue
        p = write_case(name, algo, spec, o, m)
        print(f"{p.relative_to(ROOT)}  {p.stat().st_size/1024:.1f} KiB")
    if not only:
        write_files()
    total = sum(f.stat().st_size for f in OUT.rglob("*.safetensors"))
    print(f"{len(CASES)} cases; fixtures total {total/1024:.0f} KiB")


if __name__ == "__main__":
    main()
