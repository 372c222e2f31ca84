#!/usr/bin/env python3
"""sd-scripts' color augmentation and face crop, for Loft's `augment` test (run by hand only).

    .venv-parity/bin/pip install opencv-python-headless==4.10.0.84
    .venv-parity/bin/python tests/parity/make_augment_fixtures.py PATH/TO/sd-scripts

Writes tests/fixtures/sd-scripts/augment.json:

- `hue`: a fixed 12×12 RGB image through the two branches of sd-scripts' `AugHelper.color_aug`
  (library/train_util.py) with the random draws replaced by fixed values: the hue shift (cv2's
  8-bit BGR→HSV, the shift, HSV→BGR) for several shifts, and the gamma for several gammas —
  the lines of that function, run on cv2 4.10;
- `face`: sd-scripts' own `BaseDataset.crop_target` with `random.randint`/`random.uniform`
  pinned (no randomness: min = max range, or the fixed `uniform` value given), the resulting
  crop box as (resized width, height, left, top), for several images, face boxes and ranges.
"""

import json
import random
import sys
from pathlib import Path
from types import SimpleNamespace
from unittest import mock

import cv2
import numpy as np

root = Path(sys.argv[1]).resolve()
repo = Path(__file__).resolve().parents[2]
import diffusers  # noqa: E402,F401  (diffusers and transformers probe for torchvision: import them before the stubs)
import transformers  # noqa: E402,F401

for stub in ["torchvision", "torchvision.transforms", "imagesize"]:
    sys.modules.setdefault(stub, mock.MagicMock())
sys.path.insert(0, str(root))
from library import train_util  # noqa: E402

rng = np.random.default_rng(20261204)
image = rng.integers(0, 256, (12, 12, 3), dtype=np.uint8)
image[0, :4] = [[0, 0, 0], [255, 255, 255], [128, 128, 128], [255, 0, 0]]
image[1, :4] = [[0, 255, 0], [0, 0, 255], [255, 255, 0], [10, 200, 10]]

hue = []
for shift in [-7.3, -0.4, 0.0, 3.9, 7.99]:
    # AugHelper.color_aug's hue branch with `hue_shift` fixed.
    hsv_img = cv2.cvtColor(image, cv2.COLOR_BGR2HSV)
    hue_shift = shift
    if hue_shift < 0:
        hue_shift = 180 + hue_shift
    hsv_img[:, :, 0] = (hsv_img[:, :, 0] + hue_shift) % 180
    out = cv2.cvtColor(hsv_img, cv2.COLOR_HSV2BGR)
    hue.append({"shift": shift, "image": out.flatten().tolist()})
gamma = []
for g in [0.95, 0.99, 1.0, 1.03, 1.05]:
    out = np.clip(image**g, 0, 255).astype(np.uint8)
    gamma.append({"gamma": g, "image": out.flatten().tolist()})

# crop_target on a recording image: the resize and the two cuts it makes.
face = []
for (w, h), (cx, cy, fw, fh), (lo, hi), target, uniform in [
    ((1000, 800), (500, 300, 120, 150), (2.0, 2.0), (256, 256), None),
    ((1000, 800), (900, 700, 60, 60), (1.5, 4.0), (256, 256), 0.3),
    ((640, 960), (100, 120, 300, 280), (1.0, 1.0), (512, 512), None),
    ((600, 300), (300, 150, 20, 20), (3.0, 3.0), (256, 256), None),
]:
    calls = {}

    def marked_resize(img_, width, height, nw, nh, interpolation=None):
        # Each pixel holds its own (column, row), so the crop's origin reads back.
        calls["resized"] = (nw, nh)
        out = np.zeros((nh, nw, 3), np.int32)
        out[:, :, 0] = np.arange(nw)[None, :]
        out[:, :, 1] = np.arange(nh)[:, None]
        return out

    subset = SimpleNamespace(face_crop_aug_range=(lo, hi), random_crop=False, resize_interpolation=None)
    dataset = SimpleNamespace(width=target[0], height=target[1])
    img = np.zeros((h, w, 3), np.uint8)
    with mock.patch.object(train_util, "resize_image", marked_resize), \
         mock.patch.object(random, "uniform", lambda a, b: a + (b - a) * uniform), \
         mock.patch.object(random, "randint", lambda a, b: 0):
        cropped = train_util.BaseDataset.crop_target(dataset, subset, img, cx, cy, fw, fh)
    left, top = int(cropped[0, 0, 0]), int(cropped[0, 0, 1])
    face.append({"size": [w, h], "face": [cx, cy, fw, fh], "range": [lo, hi], "target": list(target), "uniform": uniform,
                 "resized": list(calls["resized"]), "origin": [left, top], "cropped": [cropped.shape[1], cropped.shape[0]]})

(repo / "tests/fixtures/sd-scripts/augment.json").write_text(json.dumps({
    "source": f"kohya-ss/sd-scripts library/train_util.py AugHelper.color_aug, BaseDataset.crop_target; cv2 {cv2.__version__}",
    "image": image.flatten().tolist(), "size": [12, 12], "hue": hue, "gamma": gamma, "face": face,
}) + "\n")
print("wrote tests/fixtures/sd-scripts/augment.json")
