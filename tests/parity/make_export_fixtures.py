#!/usr/bin/env python3
"""What LyCORIS builds from each of Loft's sd-scripts exports (run by hand, never by cargo test).

    .venv-parity/bin/python tests/parity/make_export_fixtures.py PATH/TO/sd-scripts

For every case in tests/fixtures/export/cases.json (written by
`LOFT_WRITE_EXPORT_CASES=1 cargo test --test export_lycoris`; not committed, it holds every
case's preset file without its comments: the output records its sha256, which the Rust test checks), builds the network the exported
configuration asks for as sd-scripts does — `lycoris.kohya.create_network(1.0, network_dim,
network_alpha, vae, text_encoder(s), unet, **network_args)` — on sd-scripts' own full-size UNet
(library/original_unet.py for SD 1.x, library/sdxl_original_unet.py for SDXL) and transformers'
CLIP text encoders, all on the meta device (no weights allocated), and records the kohya names
of the modules it created, or the error it raised, in tests/fixtures/export/lycoris_modules.json.
A `preset_file` in a case is written to a temporary file and passed as `preset=FILE`, as a user
does with the file Loft exports beside the TOML.

LyCORIS keeps presets as class attributes, so every case starts from the values it had at import.
"""

import gc
import hashlib
import json
import subprocess
import sys
import tempfile
import types
from pathlib import Path

import torch

sd_scripts = Path(sys.argv[1]).resolve()
sys.path.insert(0, str(sd_scripts))
# library/utils.py pulls in torchvision and diffusers schedulers for its other helpers; the UNets
# only need its logging setup.
utils = types.ModuleType("library.utils")
utils.setup_logging = lambda *a, **k: None
sys.modules["library.utils"] = utils

import lycoris  # noqa: E402
from lycoris.kohya import LycorisNetworkKohya, create_network  # noqa: E402
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection  # noqa: E402
from library import original_unet, sdxl_original_unet  # noqa: E402

root = Path(__file__).resolve().parents[2]
fixtures = root / "tests" / "fixtures" / "export"
cases_bytes = (fixtures / "cases.json").read_bytes()
cases = json.loads(cases_bytes)["cases"]

CLASS_STATE = {k: v for k, v in vars(LycorisNetworkKohya).items() if k.isupper()}


def clip(hidden, layers, act, projection):
    cfg = CLIPTextConfig(vocab_size=49408, hidden_size=hidden, intermediate_size=hidden * 4, num_hidden_layers=layers,
                         num_attention_heads=hidden // 64, hidden_act=act, projection_dim=1280 if projection else 768,
                         max_position_embeddings=77)
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(cfg)


def real(module):
    """Built on the meta device (no initialisation), then given uninitialised bf16 storage on the
    CPU: some LyCORIS modules read their layer's weight (`.item()`, copies) while being built."""
    return module.to_empty(device="cpu").to(torch.bfloat16)


torch.set_default_dtype(torch.bfloat16)
with torch.device("meta"):
    sd15 = (original_unet.UNet2DConditionModel(sample_size=64, attention_head_dim=8, cross_attention_dim=768), clip(768, 12, "quick_gelu", False))
    sdxl = (sdxl_original_unet.SdxlUNet2DConditionModel(), [clip(768, 12, "quick_gelu", False), clip(1280, 32, "gelu", True)])
models = {
    "sd15": (real(sd15[0]), real(sd15[1])),
    "sdxl": (real(sdxl[0]), [real(t) for t in sdxl[1]]),
}
for unet, te in models.values():
    for m in [unet, *(te if isinstance(te, list) else [te])]:
        for p in m.parameters():
            p.data.normal_(0, 0.02)  # LyCORIS's IA3/OFT/DoRA read the weights; no NaNs from garbage

out = {}
with tempfile.TemporaryDirectory() as tmp:
    for case in cases:
        for k, v in CLASS_STATE.items():
            setattr(LycorisNetworkKohya, k, v)
        unet, te = models[case["family"]]
        kwargs = dict(a.split("=", 1) for a in case["network_args"])
        if case["preset_file"]:
            path = Path(tmp) / case["preset_file"]["name"]
            path.write_text(case["preset_file"]["text"])
            kwargs["preset"] = str(path)
        try:
            net = create_network(1.0, case["network_dim"], case["network_alpha"], None,
                                 te if case["train_text_encoder"] else None, unet, **kwargs)
            loras = (net.text_encoder_loras if case["train_text_encoder"] else []) + (net.unet_loras if case["train_unet"] else [])
            out[case["name"]] = {"modules": sorted(l.lora_name for l in loras)}
            del net, loras
        except Exception as e:  # noqa: BLE001 — recorded, the Rust test reports it
            out[case["name"]] = {"error": f"{type(e).__name__}: {e}"}
        gc.collect()
        r = out[case["name"]]
        print(case["name"], r["error"] if "error" in r else len(r["modules"]))

# Compact: one sorted table of every module name, and per case a bit mask over it (hex, bit i of
# the number = name i), instead of each case's full list.
names = sorted({n for r in out.values() for n in r.get("modules", [])})
index = {n: i for i, n in enumerate(names)}
for r in out.values():
    if "modules" in r:
        r["count"] = len(r["modules"])
        r["mask"] = format(sum(1 << index[n] for n in r.pop("modules")), "x")
commit = subprocess.run(["git", "-C", str(sd_scripts), "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
(fixtures / "lycoris_modules.json").write_text(json.dumps(
    {"lycoris": getattr(lycoris, "__version__", "4.1.3"), "sd_scripts": commit,
     "cases_sha256": hashlib.sha256(cases_bytes).hexdigest(), "names": names, "cases": out}, indent=0, sort_keys=True) + "\n")
print(f"{len(out)} cases -> {fixtures / 'lycoris_modules.json'}")
