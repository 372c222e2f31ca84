#!/usr/bin/env python3
"""sd-scripts' LoRA+ parameter groups, for Loft's `param_groups` test (run by hand only).

    .venv-parity/bin/python tests/parity/make_loraplus_fixtures.py PATH/TO/sd-scripts

Builds kohya's `LoRANetwork` (sd-scripts `networks/lora.py`, through its own `create_network`
with the LoRA+ network_args) on a small stand-in U-Net and text encoder whose module classes
carry the names sd-scripts targets (`Transformer2DModel`, `ResnetBlock2D`, `CLIPAttention`,
`CLIPMLP`), calls `prepare_optimizer_params(text_encoder_lr, unet_lr, learning_rate)` and
writes, per case, every group's description, learning rate and parameter names to
tests/fixtures/sd-scripts/loraplus_groups.json.

sd-scripts' `library/utils.py` imports torchvision and cv2 at the top for its image helpers,
which building a network never calls; they are stubbed here so the parity venv needs neither.
"""

import json
import subprocess
import sys
import types
from pathlib import Path

import torch
from torch import nn

root = Path(sys.argv[1]).resolve()
# diffusers and transformers probe for torchvision when first imported: import them before
# the stubs exist.
import diffusers  # noqa: E402,F401
from diffusers import AutoencoderKL, EulerAncestralDiscreteScheduler  # noqa: E402,F401
from transformers import CLIPTextModel  # noqa: E402,F401
import diffusers.schedulers.scheduling_euler_ancestral_discrete  # noqa: E402,F401

for stub in ["cv2", "torchvision", "torchvision.transforms"]:
    sys.modules.setdefault(stub, types.ModuleType(stub))
sys.modules["torchvision"].transforms = sys.modules["torchvision.transforms"]
sys.path.insert(0, str(root))
from networks import lora as kohya_lora  # noqa: E402


# Stand-in modules: sd-scripts finds its targets by class name and walks named_modules().
class Transformer2DModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj_in = nn.Conv2d(8, 8, 1)
        self.to_q = nn.Linear(8, 8, bias=False)
        self.to_out = nn.Linear(8, 8)


class ResnetBlock2D(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(8, 8, 3, padding=1)


class CLIPAttention(nn.Module):
    def __init__(self):
        super().__init__()
        self.q_proj = nn.Linear(8, 8)
        self.out_proj = nn.Linear(8, 8)


class CLIPMLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(8, 16)
        self.fc2 = nn.Linear(16, 8)


class Unet(nn.Module):
    def __init__(self):
        super().__init__()
        self.down = nn.ModuleList([Transformer2DModel(), ResnetBlock2D()])
        self.mid = Transformer2DModel()


class TextEncoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.layer = nn.ModuleList([nn.ModuleDict({"self_attn": CLIPAttention(), "mlp": CLIPMLP()})])


# (name, network_args, text_encoder_lr, unet_lr, learning_rate)
CASES = [
    ("off", {}, None, None, 1e-4),
    ("shared_ratio", {"loraplus_lr_ratio": "16"}, None, None, 1e-4),
    ("per_part_ratios", {"loraplus_lr_ratio": "16", "loraplus_text_encoder_lr_ratio": "4"}, 5e-5, 2e-4, 1e-4),
    ("unet_only_ratio", {"loraplus_unet_lr_ratio": "8"}, 3e-5, None, 1e-4),
    ("with_conv", {"loraplus_lr_ratio": "2", "conv_dim": "4", "conv_alpha": "1"}, None, 1e-3, 1e-4),
]

torch.manual_seed(0)
unet, text_encoder = Unet(), TextEncoder()
out = []
for name, args, te_lr, unet_lr, lr in CASES:
    network = kohya_lora.create_network(1.0, 4, 2.0, None, text_encoder, unet, **args)
    network.apply_to(text_encoder, unet, apply_text_encoder=True, apply_unet=True)
    names = {}
    for lora in network.text_encoder_loras + network.unet_loras:
        for pname, p in lora.named_parameters():
            names[id(p)] = f"{lora.lora_name}.{pname}"
    params, descriptions = network.prepare_optimizer_params(te_lr, unet_lr, lr)
    groups = [
        {"description": d, "lr": g["lr"], "params": sorted(names[id(p)] for p in g["params"])}
        for g, d in zip(params, descriptions)
    ]
    out.append({"name": name, "network_args": args, "text_encoder_lr": te_lr, "unet_lr": unet_lr, "learning_rate": lr, "groups": groups})
    # apply_to replaced the forwards; fresh stand-ins for the next case.
    unet, text_encoder = Unet(), TextEncoder()

commit = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
dest = Path(__file__).resolve().parents[1] / "fixtures" / "sd-scripts" / "loraplus_groups.json"
dest.write_text(json.dumps({"source": "kohya-ss/sd-scripts networks/lora.py", "commit": commit, "cases": out}, indent=1) + "\n")
print(f"{len(out)} cases -> {dest}")
