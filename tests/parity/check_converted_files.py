#!/usr/bin/env python3
"""Does a file Loft trained, converted to a plain LoRA, load in diffusers?  (run by hand)

    cargo build                       # the script drives target/debug/loft
    .venv-parity/bin/python tests/parity/check_converted_files.py [algo ...]

For each of the 13 network algorithms (and LoCon with DoRA) on the tiny SD 1.5 fixture model:

  1. `loft train` a few epochs on a generated three-image dataset (conv layers included where
     the algorithm has them, so the file has LoCon-style 3×3 modules);
  2. `loft lora convert FILE --to lora --energy 0.999 --base MODEL --json`: the retained energy
     and relative error Loft reports;
  3. `loft lora merge --base MODEL --lora FILE` of the *original* file: W + ΔW as Loft computes it;
  4. diffusers 0.37 `StableDiffusionPipeline.load_lora_weights(converted)` — the kohya → diffusers
     conversion every diffusers user goes through; it raises on keys it cannot place, and a
     warning for unexpected keys is an error here — then `fuse_lora(lora_scale=1.0)`.

Checked: every module of the converted file changes its layer in diffusers (except conv_in,
conv_out and time_embedding, which diffusers drops from any kohya LoCon — Loft's compatibility
table says so — and which are counted), no warning of keys that did not match, and over those
layers ‖W_diffusers − W_loft‖ / ‖W_loft − W‖ is at most the relative error Loft printed plus
1e-3 (diffusers fuses in float32). Layers the conversion names as left out (bias deltas and
norms, which a plain LoRA cannot carry) are reported, not compared.
"""

from __future__ import annotations

import json
import re
import logging
import subprocess
import sys
import tempfile
import warnings as warnings_module
from pathlib import Path

import numpy as np
import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[2]
LOFT = REPO / "target" / "debug" / "loft"
MODEL = REPO / "tests" / "fixtures" / "models" / "tiny-sd15"

EDGE_MODULES = ("lora_unet_conv_in", "lora_unet_conv_out", "lora_unet_time_embedding")

# algorithm -> extra config lines
CASES = {
    "lora": "",
    "locon": "conv_dim = 4\nconv_alpha = 4",
    "lycoris_locon": "conv_dim = 4\nconv_alpha = 4",
    "lycoris_locon_dora": "conv_dim = 4\nconv_alpha = 4\ndora_wd = true",
    "loha": "conv_dim = 4\nconv_alpha = 4",
    "ia3": "",
    "lokr": "conv_dim = 4\nconv_alpha = 4",
    "dylora": "conv_dim = 4\nconv_alpha = 4",
    "diag_oft": "",
    "boft": "",
    "glora": "conv_dim = 4\nconv_alpha = 4",
    "glora_ex": "conv_dim = 4\nconv_alpha = 4",
    "abba": "conv_dim = 4\nconv_alpha = 4",
    "full": "",
}


def only_edge_keys(warning: str) -> bool:
    """A peft "keys did not match" warning that names only the modules diffusers drops."""
    keys = re.findall(r"'([^']+)'", warning)
    return bool(keys) and all(re.search(r"conv.in|conv.out|time.embedding", k) for k in keys)


def run(*args: str) -> str:
    p = subprocess.run([str(LOFT), *args], capture_output=True, text=True)
    if p.returncode != 0:
        raise RuntimeError(f"loft {' '.join(args)} failed:\n{p.stdout}\n{p.stderr}")
    return p.stdout


def dataset(root: Path) -> Path:
    sub = root / "data" / "3_blob"
    sub.mkdir(parents=True)
    for i in range(3):
        x, y = np.meshgrid(np.arange(40), np.arange(32))
        img = np.stack([(x * 6) % 256, (y * 7) % 256, np.full_like(x, 80 * i)], -1).astype(np.uint8)
        Image.fromarray(img).save(sub / f"{i}.png")
        (sub / f"{i}.txt").write_text(f"blob, picture {i}")
    return root / "data"


def train(root: Path, algo: str, extra: str) -> Path:
    network_algo = "lycoris_locon" if algo == "lycoris_locon_dora" else algo
    (root / "job.toml").write_text(f"""
pretrained_model_name_or_path = "{MODEL}"
train_data_dir = "{dataset(root)}"
output_dir = "{root / 'out'}"
output_name = "net"
network_algo = "{network_algo}"
resolution = 32
min_bucket_reso = 16
max_bucket_reso = 64
bucket_reso_steps = 8
network_dim = 4
network_alpha = 4
learning_rate = {0.0005 if algo == "full" else 0.01}
max_train_epochs = 2
save_precision = "float"
{extra}
""")
    run("train", str(root / "job.toml"))
    return root / "out" / "net.safetensors"


def weights(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out = {}
    for part in ("unet", "text_encoder"):
        for f in sorted((folder / part).glob("*.safetensors")):
            out.update({f"{part}.{k}": v.double() for k, v in load_file(f).items()})
    return out


def check(algo: str) -> bool:
    from diffusers import StableDiffusionPipeline

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        original = train(root, algo, CASES[algo])
        converted = root / "converted.safetensors"
        report = json.loads(run("lora", "convert", str(original), "--to", "lora", "--energy", "0.999",
                                "--base", str(MODEL), "--out", str(converted), "--json"))
        run("lora", "merge", "--base", str(MODEL), "--lora", str(original), "--out", str(root / "merged"))
        base, loft = weights(MODEL), weights(root / "merged")

        pipe = StableDiffusionPipeline.from_pretrained(MODEL, torch_dtype=torch.float32, safety_checker=None)
        warnings: list[str] = []

        class Catch(logging.Handler):
            def emit(self, record):
                if record.levelno >= logging.WARNING:
                    warnings.append(record.getMessage())

        handler = Catch()
        logging.getLogger("diffusers").addHandler(handler)
        logging.getLogger("peft").addHandler(handler)
        try:
            with warnings_module.catch_warnings(record=True) as caught:
                warnings_module.simplefilter("always")
                pipe.load_lora_weights(str(converted))
            warnings.extend(str(w.message) for w in caught)
        finally:
            logging.getLogger("diffusers").removeHandler(handler)
            logging.getLogger("peft").removeHandler(handler)
        pipe.fuse_lora(lora_scale=1.0)
        pipe.unload_lora_weights()
        fused = {f"unet.{k}": v.double() for k, v in pipe.unet.state_dict().items()}
        fused.update({f"text_encoder.{k}": v.double() for k, v in pipe.text_encoder.state_dict().items()})

        modules = len(report["modules"])
        # diffusers has no place for these (compat.rs says so for every kohya LoCon file).
        edge = [m["name"] for m in report["modules"] if m["name"].startswith(EDGE_MODULES)]
        changed = [k for k, w in fused.items() if k in base and k.endswith(".weight") and not torch.equal(w, base[k])]
        num = den = 0.0
        for k in changed:
            num += float(((fused[k] - loft[k]) ** 2).sum())
            den += float(((loft[k] - base[k]) ** 2).sum())
        rel = (num / den) ** 0.5 if den > 0 else float("nan")
        bad_warnings = [w for w in warnings if "unexpected" in w.lower() or ("did not match" in w.lower() and not only_edge_keys(w))]
        loaded_all = len(changed) == modules - len(edge) and not bad_warnings
        ok = loaded_all and rel <= report["rel_error"] + 1e-3
        print(f"{algo:20} {'OK  ' if ok else 'FAIL'} modules {modules:3}  layers changed in diffusers {len(changed):3}  "
              f"energy {report['retained_energy']:.5f}  Loft rel err {report['rel_error']:.2e}  "
              f"diffusers vs Loft merge {rel:.2e}  left out {len(report['skipped'])}"
              + (f"  dropped by diffusers (conv_in/conv_out/time_embedding) {len(edge)}" if edge else ""))
        for w in warnings:
            print(f"    diffusers: {w}")
        return ok


if __name__ == "__main__":
    logging.basicConfig(level=logging.ERROR)
    algos = sys.argv[1:] or list(CASES)
    results = [check(a) for a in algos]
    sys.exit(0 if all(results) else 1)
