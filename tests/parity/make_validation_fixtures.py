#!/usr/bin/env python3
"""sd-scripts' validation split and validation loss, for Loft's `validation` test (run by hand).

    .venv-parity/bin/python tests/parity/make_validation_fixtures.py PATH/TO/sd-scripts

Writes tests/fixtures/sd-scripts/validation.json and validation_batch.safetensors:

- `splits`: sd-scripts' own `split_train_val` (library/train_util.py) on lists of file names,
  training and validation parts, for several sizes, shares and seeds (it shuffles with Python's
  `random`, which Loft reproduces);
- `timesteps`: `np.linspace(min, max, 6, dtype=int)[1:-1]`, the fixed timesteps of
  train_network.py's validation;
- `batch`: the validation loss of one fixed batch on the tiny SD 1.5 fixture
  (tests/fixtures/models/tiny-sd15) computed with diffusers: at each validation timestep the
  latents noised by the scheduler, the U-Net's epsilon prediction, the mean squared error, and
  the mean over timesteps — what sd-scripts' process_batch computes for an unmasked, unweighted
  batch. The inputs (latents, text states, one noise per timestep) are in the safetensors file.

sd-scripts' train_util imports cv2, torchvision and imagesize at the top for image helpers the
split never calls; they are stubbed here.
"""

import json
import sys
from pathlib import Path
from unittest import mock

import numpy as np
import torch
from safetensors.torch import save_file

root = Path(sys.argv[1]).resolve()
repo = Path(__file__).resolve().parents[2]
import diffusers  # noqa: E402  (probes for torchvision: import before the stubs)
from diffusers import DDPMScheduler, UNet2DConditionModel  # noqa: E402

for stub in ["cv2", "torchvision", "torchvision.transforms", "imagesize"]:
    sys.modules.setdefault(stub, mock.MagicMock())
sys.path.insert(0, str(root))
from library.train_util import split_train_val  # noqa: E402

splits = []
for n, share, seed in [(10, 0.1, 42), (10, 0.2, 7), (7, 0.3, 123), (25, 0.15, 2026), (3, 0.5, 1), (40, 0.25, 4294967295)]:
    paths = [f"img{i:03}.png" for i in range(n)]
    sizes = [(64, 64)] * n
    train, _ = split_train_val(list(paths), list(sizes), True, share, seed)
    val, _ = split_train_val(list(paths), list(sizes), False, share, seed)
    splits.append({"n": n, "split": share, "seed": seed, "train": list(train), "validation": list(val)})

timesteps = []
for lo, hi in [(0, 1000), (100, 900), (0, 999), (37, 511)]:
    timesteps.append({"min": lo, "max": hi, "timesteps": [int(t) for t in np.linspace(lo, hi, 6, dtype=int)[1:-1]]})

model_dir = repo / "tests/fixtures/models/tiny-sd15"
unet = UNet2DConditionModel.from_pretrained(model_dir / "unet").eval()
scheduler = DDPMScheduler.from_pretrained(model_dir / "scheduler")
g = torch.Generator().manual_seed(20261204)
latents = torch.randn((2, 4, 4, 4), generator=g)
hidden = torch.randn((2, 77, unet.config.cross_attention_dim), generator=g)
val_ts = [int(t) for t in np.linspace(0, 1000, 6, dtype=int)[1:-1]]
tensors = {"latents": latents, "hidden": hidden}
losses = []
with torch.no_grad():
    for i, t in enumerate(val_ts):
        noise = torch.randn(latents.shape, generator=g)
        tensors[f"noise_{i}"] = noise
        ts = torch.full((latents.shape[0],), t, dtype=torch.long)
        noisy = scheduler.add_noise(latents, noise, ts)
        pred = unet(noisy, ts, hidden).sample
        losses.append(float(torch.nn.functional.mse_loss(pred.float(), noise.float(), reduction="none").mean([1, 2, 3]).mean()))

out_dir = repo / "tests/fixtures/sd-scripts"
save_file({k: v.contiguous() for k, v in tensors.items()}, out_dir / "validation_batch.safetensors")
commit = "unknown"
try:
    import subprocess
    commit = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
except OSError:
    pass
(out_dir / "validation.json").write_text(json.dumps({
    "source": f"kohya-ss/sd-scripts {commit} library/train_util.py split_train_val; train_network.py validation timesteps; diffusers {diffusers.__version__}",
    "splits": splits,
    "timesteps": timesteps,
    "batch": {"timesteps": val_ts, "losses": losses, "loss": sum(losses) / len(losses)},
}, indent=1) + "\n")
print("wrote", out_dir / "validation.json")
