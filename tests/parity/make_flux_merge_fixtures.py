#!/usr/bin/env python3
"""Reference merges of a Flux LoRA that Loft trained (run by hand, never by CI).

    .venv-parity/bin/python tests/parity/make_flux_merge_fixtures.py

Reads tests/fixtures/models/tiny-flux-dev-lora.safetensors (a kohya-layout Flux LoRA written
by `loft train` on the tiny dev fixture, rank 2, alpha 1, CLIP-L trained too) and merges it
with kohya's definition (sd-scripts' lora_flux `merge_to`: W + (up @ down) * alpha / rank):

  - into BFL's single file (tiny-flux-dev.safetensors): every `lora_unet_<path>` onto
    `<path>.weight`;
  - into the diffusers folder (tiny-flux-dev/): the same BFL deltas cut into the diffusers
    tensors that hold them (q/k/v and proj_mlp row blocks, norm_out with its halves swapped),
    and `lora_te1_<path>` onto CLIP-L's `<path>.weight`.

Writes tests/fixtures/models/tiny-flux-dev-lora-merged-ref.safetensors with every changed
tensor under `bfl.<key>`, `diffusers.transformer.<key>` and `diffusers.text_encoder.<key>`.
"""

from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

ROOT = Path(__file__).resolve().parents[2]
M = ROOT / "tests" / "fixtures" / "models"


def main() -> None:
    lora = load_file(M / "tiny-flux-dev-lora.safetensors")
    modules = sorted({k.split(".", 1)[0] for k in lora})
    deltas = {}
    for m in modules:
        down = lora[f"{m}.lora_down.weight"].double()
        up = lora[f"{m}.lora_up.weight"].double()
        alpha = float(lora[f"{m}.alpha"]) if f"{m}.alpha" in lora else down.shape[0]
        deltas[m] = up @ down * (alpha / down.shape[0])
    out = {}
    bfl = load_file(M / "tiny-flux-dev.safetensors")
    for key, w in bfl.items():
        if not key.endswith(".weight"):
            continue
        name = "lora_unet_" + key[: -len(".weight")].replace(".", "_")
        if name in deltas:
            out[f"bfl.{key}"] = (w.double() + deltas[name]).float()
    # diffusers layout: the BFL delta of each layer, cut as the diffusers tensors hold it.
    hidden = bfl["img_in.weight"].shape[0]
    mlp = bfl["double_blocks.0.img_mlp.0.weight"].shape[0]
    tr = load_file(M / "tiny-flux-dev" / "transformer" / "diffusion_pytorch_model.safetensors")

    def put(diff_key: str, delta: torch.Tensor) -> None:
        out[f"diffusers.transformer.{diff_key}"] = (tr[diff_key].double() + delta).float()

    for name, d in deltas.items():
        if not name.startswith("lora_unet_"):
            continue
        p = name[len("lora_unet_"):]
        parts = p.split("_")
        if parts[0] == "double" and parts[1] == "blocks":
            i, rest = parts[2], "_".join(parts[3:])
            s = f"transformer_blocks.{i}"
            fused = {"img_attn_qkv": ["attn.to_q", "attn.to_k", "attn.to_v"], "txt_attn_qkv": ["attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"]}
            single = {"img_attn_proj": "attn.to_out.0", "txt_attn_proj": "attn.to_add_out", "img_mlp_0": "ff.net.0.proj", "img_mlp_2": "ff.net.2",
                      "txt_mlp_0": "ff_context.net.0.proj", "txt_mlp_2": "ff_context.net.2", "img_mod_lin": "norm1.linear", "txt_mod_lin": "norm1_context.linear"}
            if rest in fused:
                for j, t in enumerate(fused[rest]):
                    put(f"{s}.{t}.weight", d[j * hidden:(j + 1) * hidden])
            else:
                put(f"{s}.{single[rest]}.weight", d)
        elif parts[0] == "single" and parts[1] == "blocks":
            i, rest = parts[2], "_".join(parts[3:])
            s = f"single_transformer_blocks.{i}"
            if rest == "linear1":
                for j, t in enumerate(["attn.to_q", "attn.to_k", "attn.to_v"]):
                    put(f"{s}.{t}.weight", d[j * hidden:(j + 1) * hidden])
                put(f"{s}.proj_mlp.weight", d[3 * hidden:3 * hidden + mlp])
            else:
                put(f"{s}.{ {'linear2': 'proj_out', 'modulation_lin': 'norm.linear'}[rest] }.weight", d)
        else:
            raise SystemExit(f"unexpected module {name}: extend this script")
    te = load_file(M / "tiny-flux-dev" / "text_encoder" / "model.safetensors")
    for key, w in te.items():
        name = "lora_te1_" + key[: -len(".weight")].replace(".", "_") if key.endswith(".weight") else None
        if name in deltas:
            out[f"diffusers.text_encoder.{key}"] = (w.double() + deltas[name]).float()
    save_file({k: v.contiguous() for k, v in out.items()}, M / "tiny-flux-dev-lora-merged-ref.safetensors")
    print(f"{len(deltas)} modules; {len(out)} merged tensors written")


if __name__ == "__main__":
    main()
