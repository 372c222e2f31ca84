#!/usr/bin/env python3
"""sd-scripts' masked-loss weighting, for Loft's `masked_loss` test (run by hand only).

    .venv-parity/bin/python tests/parity/make_masked_loss_fixtures.py PATH/TO/sd-scripts

Calls sd-scripts' own `apply_masked_loss` (library/custom_train_functions.py) and then reduces
as its `train_network.py` does (mean over every element of a sample, times the sample's loss
weight, mean over the batch) on fixed element-wise losses and masks:

- `alpha`: alpha masks in [0, 1] at pixel size (8× the loss grid), as the dataset gives them;
- `conditioning`: mask images as the ControlNet dataset gives them (RGB u8 through ToTensor and
  Normalize(0.5, 0.5)); sd-scripts reads the red channel;
- `uneven`: an alpha mask whose size is not a multiple of the loss grid (area interpolation's
  overlapping spans).

Writes tests/fixtures/sd-scripts/masked_loss.json: per case the inputs (loss, mask values as
Loft reads them: alpha in [0, 1], or the red channel's u8), the mask on the loss grid, and the
per-sample and batch losses.

sd-scripts' `library/utils.py` imports torchvision and cv2 at the top for image helpers this
never calls; they are stubbed here so the parity venv needs neither.
"""

import json
import sys
import types
from pathlib import Path

import torch

root = Path(sys.argv[1]).resolve()
import diffusers  # noqa: E402,F401  (probes for torchvision: import before the stubs)
from diffusers.schedulers.scheduling_ddpm import DDPMScheduler  # noqa: E402,F401

for stub in ["cv2", "torchvision", "torchvision.transforms"]:
    sys.modules.setdefault(stub, types.ModuleType(stub))
sys.modules["torchvision"].transforms = sys.modules["torchvision.transforms"]
sys.path.insert(0, str(root))
from library.custom_train_functions import apply_masked_loss  # noqa: E402

g = torch.Generator().manual_seed(20261204)


def reduce(loss, loss_weights):
    per_sample = loss.mean(dim=list(range(1, loss.ndim))) * loss_weights
    return per_sample, per_sample.mean()


def flat(t):
    return [float(v) for v in t.flatten().tolist()]


cases = []

# alpha: B=2, loss (2, 4, 3, 5), masks (2, 24, 40); one sample a regularisation image (weight 0.5).
loss = torch.rand((2, 4, 3, 5), generator=g)
alpha = (torch.randint(0, 256, (2, 24, 40), generator=g).float() / 255.0)
alpha[0, :, :20] = 0.0  # half the first image transparent
weights = torch.tensor([1.0, 0.5])
masked = apply_masked_loss(loss.clone(), {"alpha_masks": alpha})
grid = torch.nn.functional.interpolate(alpha.unsqueeze(1), size=loss.shape[2:], mode="area")
per_sample, total = reduce(masked, weights)
cases.append({"name": "alpha", "kind": "alpha", "loss_shape": list(loss.shape), "loss": flat(loss),
              "mask_shape": list(alpha.shape), "mask": flat(alpha), "loss_weights": flat(weights),
              "mask_on_grid": flat(grid), "per_sample": flat(per_sample), "loss_mean": float(total)})

# conditioning: RGB u8 mask images → ToTensor → Normalize(0.5, 0.5), as sd-scripts' IMAGE_TRANSFORMS.
loss = torch.rand((2, 4, 2, 4), generator=g)
rgb = torch.randint(0, 256, (2, 3, 16, 32), generator=g)
rgb[1, 0, 8:, :] = 255  # bottom half of the second mask white in red
cond = (rgb.float() / 255.0 - 0.5) / 0.5
weights = torch.tensor([1.0, 1.0])
masked = apply_masked_loss(loss.clone(), {"conditioning_images": cond})
grid = torch.nn.functional.interpolate((cond[:, 0] / 2 + 0.5).unsqueeze(1), size=loss.shape[2:], mode="area")
per_sample, total = reduce(masked, weights)
cases.append({"name": "conditioning", "kind": "red_u8", "loss_shape": list(loss.shape), "loss": flat(loss),
              "mask_shape": [2, 16, 32], "mask": [int(v) for v in rgb[:, 0].flatten().tolist()], "loss_weights": flat(weights),
              "mask_on_grid": flat(grid), "per_sample": flat(per_sample), "loss_mean": float(total)})

# uneven: a 13×19 mask onto a 3×5 grid.
loss = torch.rand((1, 4, 3, 5), generator=g)
alpha = torch.rand((1, 13, 19), generator=g)
weights = torch.tensor([1.0])
masked = apply_masked_loss(loss.clone(), {"alpha_masks": alpha})
grid = torch.nn.functional.interpolate(alpha.unsqueeze(1), size=loss.shape[2:], mode="area")
per_sample, total = reduce(masked, weights)
cases.append({"name": "uneven", "kind": "alpha", "loss_shape": list(loss.shape), "loss": flat(loss),
              "mask_shape": list(alpha.shape), "mask": flat(alpha), "loss_weights": flat(weights),
              "mask_on_grid": flat(grid), "per_sample": flat(per_sample), "loss_mean": float(total)})

out = Path(__file__).resolve().parents[1] / "fixtures/sd-scripts/masked_loss.json"
commit = "unknown"
try:
    import subprocess
    commit = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
except OSError:
    pass
out.write_text(json.dumps({"source": f"kohya-ss/sd-scripts {commit} library/custom_train_functions.py apply_masked_loss",
                           "torch": torch.__version__, "cases": cases}, indent=1) + "\n")
print(f"wrote {out}")
