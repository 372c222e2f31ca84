#!/usr/bin/env python3
"""Do files *Loft writes* load in LyCORIS 4.1.3 and give Loft's ΔW?  (run by hand)

    .venv-parity/bin/python tests/parity/check_loft_files.py [case ...]

Inputs: tests/fixtures/networks/loft-written/<case>.safetensors, written by Loft's
file writer (`lora_file::save_network`) in worker/tests/loft_written_files.rs, and
<case>.expected.safetensors (per module: org.weight, org.bias, dw = W′ − W at
multiplier 1 from Loft's Adapter::delta_weight, db where the bias changes).

How LyCORIS reads the file — the path sd-scripts users hit
(`train_network.py --network_weights`, `gen_img.py`, `networks/merge_lora.py`-style
tools with `--network_module lycoris.kohya`):

  1. a tiny torch model whose module paths give exactly the file's kohya names
     (`unet.down_blocks.0.attentions.0.proj_in` → `lora_unet_down_blocks_0_attentions_0_proj_in`,
     `text_encoder.text_model.encoder.layers.0.mlp.fc1` → `lora_te_text_model_encoder_layers_0_mlp_fc1`),
     carrying the base weights from the expected file;
  2. `network, sd = lycoris.kohya.create_network_from_weights(1.0, file, None,
     text_encoder, unet, weights_sd=load_file(file))`;
  3. `network.apply_to(text_encoder, unet, True, True)` and
     `network.load_state_dict(sd, strict=False)` (what sd-scripts does after creating
     the network from weights);
  4. eval mode, rebuild mode (LyCORIS' default).  W′ and b′ are read off the *patched
     original module's forward* with probe inputs (a zero input and one-hot inputs;
     for a conv, one-hot patches under one output pixel), so the result is exactly what
     inference with the loaded network computes.  LoHa / LoKr `get_diff_weight`
     (double scale, algorithms.md §5) and `merge_to` are never used.

Compared: W′ − W against `dw`, b′ − b against `db` (or 0), relative error
max|a−b| / max(max|b|, 1e-6) ≤ 1e-5, in float64 (LyCORIS' OFT/BOFT take a float32
inverse, ~1e-7).

Where LyCORIS cannot load a valid file (no module class for ABBA / GLoRA-Ex; the
loader limitations of algorithms.md §6), the module is checked instead by the
*reference math* (the formulas of make_network_fixtures.py / algorithms.md §1 applied
to the file's tensors), and the line says so: `OK (reference math: <why>)`.
"""

from __future__ import annotations

import importlib.metadata
import json
import math
import os
import sys
import logging
from pathlib import Path

os.environ.setdefault("LYCORIS_KERNEL_BACKEND", "torch")

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file

import lycoris
import lycoris.kohya as lyco_kohya
from lycoris.functional import boft as fboft
from lycoris.functional import diag_oft as fdiag_oft

ROOT = Path(__file__).resolve().parents[2]
DIR = ROOT / "tests" / "fixtures" / "networks" / "loft-written"
TOL = 1e-5
torch.set_num_threads(2)
logging.disable(logging.WARNING)
LYCORIS_VERSION = importlib.metadata.version("lycoris-lora")
# LyCORIS' DIAG-OFT / BOFT take `(I - Q).float().inverse()` and then matmul it with the
# block dtype, so they only run in float32 (as in make_network_fixtures.py).
FLOAT32_ALGOS = {"diag_oft", "boft"}

# kohya module name -> (model, module path)
PATHS = {
    "lora_unet_down_blocks_0_attentions_0_proj_in": ("unet", "down_blocks.0.attentions.0.proj_in"),
    "lora_unet_down_blocks_0_resnets_0_conv1": ("unet", "down_blocks.0.resnets.0.conv1"),
    "lora_unet_down_blocks_0_resnets_0_conv_shortcut": ("unet", "down_blocks.0.resnets.0.conv_shortcut"),
    "lora_te_text_model_encoder_layers_0_mlp_fc1": ("te", "text_model.encoder.layers.0.mlp.fc1"),
}


def rel_err(a, b):
    if tuple(a.shape) != tuple(b.shape):
        return float("inf")
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-6)).item()


# --------------------------------------------------------------------------
# tiny models
# --------------------------------------------------------------------------


def set_path(root: nn.Module, path: str, mod: nn.Module):
    parts = path.split(".")
    cur = root
    for p in parts[:-1]:
        if not hasattr(cur, p) or getattr(cur, p) is None:
            cur.add_module(p, nn.Module())
        cur = getattr(cur, p)
    cur.add_module(parts[-1], mod)


def get_path(root: nn.Module, path: str) -> nn.Module:
    cur = root
    for p in path.split("."):
        cur = getattr(cur, p)
    return cur


def build_models(layers: dict, exp: dict, dtype):
    unet, te = nn.Module(), nn.Module()
    for name, spec in layers.items():
        which, path = PATHS[name]
        shape = spec["shape"]
        w = exp[f"{name}.org.weight"]
        b = exp.get(f"{name}.org.bias")
        if len(shape) == 2:
            mod = nn.Linear(shape[1], shape[0], bias=b is not None)
        else:
            mod = nn.Conv2d(shape[1], shape[0], shape[2], padding=spec["padding"], bias=b is not None)
        with torch.no_grad():
            mod.weight.copy_(w)
            if b is not None:
                mod.bias.copy_(b)
        mod.requires_grad_(False)
        mod.to(dtype)
        set_path(unet if which == "unet" else te, path, mod)
    return unet, te


def probe(mod: nn.Module, shape, padding, dtype):
    """(W′, b′) as the module's forward applies them (eval, no grad), in float64."""
    with torch.no_grad():
        if len(shape) == 2:
            n_in = shape[1]
            x = torch.cat([torch.zeros(1, n_in), torch.eye(n_in)]).to(dtype)
            y = mod(x).to(torch.float64)
            return (y[1:] - y[:1]).T.contiguous(), y[0]
        out_c, in_c, kh, kw = shape
        assert kh == kw
        k, s = kh, 1
        po = -(-padding // s)  # first output pixel whose window lies inside the input
        off = po * s - padding
        hw = off + k
        n = in_c * k * k
        x = torch.zeros(n + 1, in_c, hw, hw)
        idx = 1
        for i in range(in_c):
            for a in range(k):
                for b in range(k):
                    x[idx, i, off + a, off + b] = 1.0
                    idx += 1
        y = mod(x.to(dtype))[:, :, po, po].to(torch.float64)
        w = (y[1:] - y[:1]).T.reshape(out_c, in_c, k, k).contiguous()
        return w, y[0]


# --------------------------------------------------------------------------
# reference math (for what LyCORIS cannot load)
# --------------------------------------------------------------------------


def weight_decompose(w, dora_scale, wd_on_output):
    """LyCORIS DoRA (§0) at m = 1: W′ = w·dora_scale/(‖w‖+eps)."""
    nd = w.dim() - 1
    eps = torch.finfo(torch.float32).eps
    if wd_on_output:
        norm = w.reshape(w.shape[0], -1).norm(dim=1).reshape(w.shape[0], *[1] * nd)
    else:
        norm = w.transpose(0, 1).reshape(w.shape[1], -1).norm(dim=1).reshape(w.shape[1], *[1] * nd).transpose(0, 1)
    return w * (dora_scale / (norm + eps))


def reference_delta(algo: str, t: dict, W, b):
    """ΔW (and Δb) at m = 1 from a module's file tensors, by the math of
    make_network_fixtures.py / algorithms.md §1."""
    shape = W.shape
    out = shape[0]
    conv = W.dim() == 4
    db = None
    if algo == "ia3":
        w = t["weight"]
        on_input = bool(t["on_input"].item()) if "on_input" in t else False
        if on_input:
            dw = W * w.reshape(1, -1, *[1] * (W.dim() - 2))
        else:
            dw = W * w.reshape(out, *[1] * (W.dim() - 1))
        return dw, None
    if algo == "abba":
        u1, d1 = t["lora_up1.weight"], t["lora_down1.weight"]
        u2, d2 = t["lora_up2.weight"], t["lora_down2.weight"]
        r1, r2 = d1.shape[0], d2.shape[0]
        alpha = t["alpha"].item()
        s = alpha**2 / math.sqrt(r1 * r2)
        dw = ((u1.reshape(out, r1) @ d1.reshape(r1, -1)) * (u2.reshape(out, r2) @ d2.reshape(r2, -1))).reshape(shape) * s
        if "dora_scale" in t:
            ds = t["dora_scale"]
            dw = weight_decompose(W + dw, ds, ds.shape[0] == out and ds.shape[1] == 1) - W
        return dw, None
    if algo == "glora_ex":
        a1, a2 = t["a1.weight"], t["a2.weight"]
        b1, b2 = t["b1.weight"], t["b2.weight"]
        c1, c2 = t["c1.weight"], t["c2.weight"]
        r = a1.shape[0]
        cin = W.shape[1]
        s = t["alpha"].item() / r
        dw = torch.einsum("oi...,ij->oj...", W, a2.reshape(cin, r) @ a1.reshape(r, cin))
        dw = dw + (b2.reshape(out, r) @ b1.reshape(r, -1)).reshape(shape)
        cvec = (c2.reshape(1, r) @ c1.reshape(r, cin)).reshape(cin)
        dbc = torch.einsum("oi...,i->o...", W, cvec)
        if conv:
            dbc = dbc.mean(dim=(1, 2))  # the fork averages over kernel positions
        db = dbc + t["e_param"]
        if "d_param" in t and b is not None:
            db = db + t["d_param"] * b
        return dw * s, db * s
    if algo in ("locon", "lora", "dylora"):
        up, down = t["lora_up.weight"], t["lora_down.weight"]
        r = down.shape[0]
        alpha = t["alpha"].item() if "alpha" in t else r
        if "lora_mid.weight" in t:
            mid = t["lora_mid.weight"]
            dw = torch.einsum("ij...,oi,jc->oc...", mid, up.reshape(out, r), down.reshape(r, -1))
        else:
            dw = (up.reshape(out, r) @ down.reshape(r, -1)).reshape(shape)
        dw = dw * (alpha / r)
        if "dora_scale" in t:
            ds = t["dora_scale"]
            dw = weight_decompose(W + dw, ds, ds.shape[1] == 1) - W
        return dw, None
    if algo == "diag_oft":
        blocks = t["oft_blocks"]
        rescale = t.get("rescale")
        c = t["alpha"].item() * out
        args = (blocks,) if rescale is None else (blocks, rescale)
        return fdiag_oft.diff_weight(W, *args, constraint=c), None
    if algo == "boft":
        blocks = t["oft_blocks"]
        rescale = t.get("rescale")
        c = t["alpha"].item() * out
        args = (blocks,) if rescale is None else (blocks, rescale)
        return fboft.diff_weight(W, *args, constraint=c), None
    raise NotImplementedError(f"no reference math for {algo}")


# Why LyCORIS 4.1.3 cannot read a valid Loft file of this algorithm (§1, §6).
NOT_IN_LYCORIS = {
    "abba": "ABBA is not in upstream LyCORIS (no module class; forks only)",
    "glora_ex": "GLoRA-Ex is not in upstream LyCORIS (no module class; Ktiseos-Nyx fork only)",
}


# --------------------------------------------------------------------------
# one file
# --------------------------------------------------------------------------


def load_expected(case: str):
    path = DIR / f"{case}.expected.safetensors"
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    exp = {k: v.to(torch.float64) for k, v in load_file(str(path)).items()}
    return exp, meta


def check_case(case: str) -> list[tuple[str, str, str]]:
    """Returns rows (case, module, result)."""
    exp, meta = load_expected(case)
    layers = json.loads(meta["layers"])
    algo = meta["loft_algo"]
    file = DIR / f"{case}.safetensors"
    raw = load_file(str(file))
    dtype = torch.float32 if algo in FLOAT32_ALGOS else torch.float64
    torch.set_default_dtype(dtype)  # LyCORIS builds helpers (torch.eye, scales) in it
    sd = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in raw.items()}

    def load(reload_state_dict: bool):
        """LyCORIS' loader on a fresh tiny model: (unet, te, {name: module}, unexpected keys),
        or the loader's error message."""
        unet, te = build_models(layers, exp, dtype)
        try:
            network, _ = lyco_kohya.create_network_from_weights(1.0, str(file), None, te, unet, weights_sd=dict(sd))
            network.apply_to(te, unet, True, True)
            unexpected = []
            if reload_state_dict:
                info = network.load_state_dict(dict(sd), strict=False)
                unexpected = list(info.unexpected_keys)
            network.to(dtype)
            network.eval()
        except Exception as e:  # a loader that cannot read the file
            return f"LyCORIS loader raised {type(e).__name__}: {str(e).splitlines()[0][:160]}"
        loaded = {lora.lora_name: lora for lora in network.unet_loras + network.text_encoder_loras}
        return unet, te, loaded, unexpected

    def lyco_delta(state, name, spec):
        unet, te, loaded, unexpected = state
        which, path = PATHS[name]
        mod = get_path(unet if which == "unet" else te, path)
        Wp, bp = probe(mod, spec["shape"], spec["padding"], dtype)
        b = exp.get(f"{name}.org.bias")
        return Wp - exp[f"{name}.org.weight"], (bp - b if b is not None else None)

    def errors(name, dw, db):
        want_dw = exp[f"{name}.dw"]
        want_db = exp.get(f"{name}.db")
        e_w = rel_err(dw, want_dw)
        if want_db is not None:
            e_b = rel_err(db if db is not None else torch.zeros_like(want_db), want_db)
        else:
            e_b = 0.0 if db is None else db.abs().max().item() / max(want_dw.abs().max().item(), 1e-6)
        return e_w, e_b

    def fmt(name, e_w, e_b, dw):
        want_dw = exp[f"{name}.dw"]
        s = f"ΔW rel {e_w:.1e}" + (f", Δb rel {e_b:.1e}" if f"{name}.db" in exp else "")
        if e_w > TOL:
            s += f" (max|ΔW| expected {want_dw.abs().max().item():.4g}, LyCORIS {dw.abs().max().item():.4g})"
        return s

    rows = []
    if algo in NOT_IN_LYCORIS:
        gen, ldr = NOT_IN_LYCORIS[algo], None
    else:
        gen = load(True)  # sd-scripts gen_img.py: from_weights, apply_to, load_state_dict
        ldr = load(False)  # the loader alone: from_weights, apply_to
    for name, spec in layers.items():
        W = exp[f"{name}.org.weight"]
        b = exp.get(f"{name}.org.bias")
        why = None
        if isinstance(gen, str):
            why = gen
        elif name not in gen[2]:
            why = "LyCORIS loader made no module for it"
        elif [k for k in gen[3] if k.startswith(name + ".")]:
            why = f"LyCORIS ignored keys {[k for k in gen[3] if k.startswith(name + '.')]}"
        if why is None:
            kind = type(gen[2][name]).__name__ + (", float32" if dtype == torch.float32 else "")
            try:
                dw, db = lyco_delta(gen, name, spec)
            except Exception as e:
                rows.append((case, name, f"MISMATCH: LyCORIS loaded it but its forward raised {type(e).__name__}: {str(e).splitlines()[0][:160]}"))
                continue
            e_w, e_b = errors(name, dw, db)
            if e_w <= TOL and e_b <= TOL:
                rows.append((case, name, f"OK  {fmt(name, e_w, e_b, dw)}  [LyCORIS {LYCORIS_VERSION} loader, sd-scripts gen_img path: {kind}]"))
                continue
            # Does the loader alone (without sd-scripts' second load_state_dict) get it right?
            dw2, db2 = lyco_delta(ldr, name, spec)
            e_w2, e_b2 = errors(name, dw2, db2)
            if e_w2 <= TOL and e_b2 <= TOL:
                rows.append((case, name,
                    f"LYCORIS-BUG  gen_img path (from_weights + apply_to + load_state_dict): {fmt(name, e_w, e_b, dw)}; "
                    f"loader + apply_to alone: OK {fmt(name, e_w2, e_b2, dw2)}  [{kind}]"))
            else:
                rows.append((case, name, f"MISMATCH  {fmt(name, e_w, e_b, dw)}; loader alone {fmt(name, e_w2, e_b2, dw2)}  [{kind}]"))
            continue
        tensors = {
            k[len(name) + 1:]: (v.to(torch.float64) if v.is_floating_point() else v)
            for k, v in raw.items() if k.startswith(name + ".")
        }
        try:
            dw, db = reference_delta(algo, tensors, W, b)
        except Exception as e:
            rows.append((case, name, f"NOT CHECKED ({why}; reference math failed: {e})"))
            continue
        e_w, e_b = errors(name, dw, db)
        verdict = "OK" if e_w <= TOL and e_b <= TOL else "MISMATCH"
        rows.append((case, name, f"{verdict}  {fmt(name, e_w, e_b, dw)}  [reference math; LyCORIS cannot load it: {why}]"))
    return rows


def main():
    only = sys.argv[1:]
    cases = sorted(p.name[: -len(".safetensors")] for p in DIR.glob("*.safetensors") if not p.name.endswith(".expected.safetensors"))
    if only:
        cases = [c for c in cases if c in only]
    bad = lyco_bugs = 0
    print(f"lycoris-lora {LYCORIS_VERSION}, torch {torch.__version__}")
    for case in cases:
        for c, mod, res in check_case(case):
            print(f"{c:<22} {mod:<50} {res}")
            if res.startswith("LYCORIS-BUG"):
                lyco_bugs += 1
            elif not res.startswith("OK"):
                bad += 1
    print(f"{len(cases)} files; {bad} module(s) not OK; {lyco_bugs} module(s) right in LyCORIS' loader "
          f"but wrong after sd-scripts' extra load_state_dict (a LyCORIS bug, see README)")
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
