#!/usr/bin/env python3
"""A tiny WD14-shaped ONNX tagger, test images, and what onnxruntime says of them (run by hand).

    .venv-parity/bin/pip install onnx onnxruntime numpy pillow
    .venv-parity/bin/python tests/parity/make_tagger_fixtures.py

Writes tests/fixtures/tagger/:
  tiny-wd14/model.onnx, tiny-wd14/selected_tags.csv   the tagger (input [batch,448,448,3], output [batch,14])
  tiny-wd14-64/...                                    the same at 64x64 (the size is read from the model)
  images/*.png                                        flat colours, a tall one (white padding), a
                                                      transparent one (composited on white), a 448x448 gradient
  expected.json                                       per image: onnxruntime's probabilities on the
                                                      reference preprocessing, and the tags the
                                                      reference postprocessing keeps

The tagger's contract is SmilingWolf's: float32 NHWC, BGR, 0..255, no normalisation, sigmoid in the
graph. Its main path is a colour detector (mean of B, G, R over the padded square image), so flat
colours catch a wrong channel order, black padding and a dropped alpha channel; a side branch is a
one-block ViT (AveragePool, Conv, LayerNormalization, Einsum attention, Softmax, Erf GELU) with tiny
weights, so the runtime must run those ops. Preprocessing and postprocessing follow the HF space
SmilingWolf/wd-tagger (app.py): RGBA composited on white, padded to a white centred square, resized
with PIL's bicubic when not at the model's size, RGB -> BGR; general tags with p > 0.35 and character
tags with p > 0.85, characters first then general, each by probability, underscores turned to spaces
except in kaomoji; no escaping of parentheses (captions are training text).
"""
import csv
import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime
from onnx import TensorProto, helper, numpy_helper
from PIL import Image

OUT = Path(__file__).resolve().parents[1] / "fixtures" / "tagger"

# name, category (9 rating, 0 general, 4 character), logit = wb*b + wg*g + wr*r + c (means in 0..1)
TAGS = [
    ("general", 9, (0, 0, 0, 2.0)),
    ("sensitive", 9, (0, 0, 0, 0.0)),
    ("questionable", 9, (0, 0, 0, -2.0)),
    ("explicit", 9, (0, 0, 0, -4.0)),
    ("blue_theme", 0, (12, 0, 0, -7.2)),
    ("green_theme", 0, (0, 12, 0, -7.2)),
    ("red_theme", 0, (0, 0, 12, -7.2)),
    ("white_background", 0, (4, 4, 4, -9.6)),
    ("star_(sky)", 0, (12, 0, 0, -7.2)),
    ("^_^", 0, (0, 0, 12, -7.2)),
    ("solo", 0, (0, 0, 0, 0.0)),
    ("looking_at_viewer", 0, (0, 0, 0, -5.0)),
    ("hatsune_miku", 4, (0, 12, 0, -7.2)),
    ("kagamine_rin", 4, (0, 0, 0, 1.386)),
]
KAOMOJI = {"0_0", "(o)_(o)", "+_+", "+_-", "._.", "<o>_<o>", "<|>_<|>", "=_=", ">_<", "3_3", "6_9", ">_o", "@_@", "^_^", "o_o", "u_u", "x_x", "|_|", "||_||"}


def make_model(size: int, path: Path) -> None:
    k = len(TAGS)
    w = np.array([[t[2][0], t[2][1], t[2][2]] for t in TAGS], dtype=np.float32).T
    c = np.array([t[2][3] for t in TAGS], dtype=np.float32)
    rng = np.random.default_rng(0)
    d, p, pool = 16, 4, max(1, size // 28)
    init = []

    def const(name, arr):
        init.append(numpy_helper.from_array(np.asarray(arr), name))
        return name

    nodes = [
        helper.make_node("ReduceMean", ["input"], ["mean_bgr"], axes=[1, 2], keepdims=0),
        helper.make_node("Div", ["mean_bgr", const("c255", np.float32(255.0))], ["f"]),
        helper.make_node("Einsum", ["f", const("W", w)], ["lin"], equation="nc,ck->nk"),
        helper.make_node("Add", ["lin", const("C", c)], ["logits_main"]),
        helper.make_node("Transpose", ["input"], ["nchw"], perm=[0, 3, 1, 2]),
        helper.make_node("Div", ["nchw", "c255"], ["x01"]),
        helper.make_node("AveragePool", ["x01"], ["x_small"], kernel_shape=[pool, pool], strides=[pool, pool]),
        helper.make_node("Conv", ["x_small", const("patch_w", rng.normal(0, 0.05, (d, 3, p, p)).astype(np.float32))], ["patches"],
                         kernel_shape=[p, p], strides=[p, p]),
        helper.make_node("Reshape", ["patches", const("tok_shape", np.array([0, d, -1], np.int64))], ["tok_cd"]),
        helper.make_node("Transpose", ["tok_cd"], ["tok"], perm=[0, 2, 1]),
        helper.make_node("LayerNormalization", ["tok", const("ln_s", np.ones(d, np.float32)), const("ln_b", np.zeros(d, np.float32))],
                         ["ln"], axis=-1, epsilon=1e-5),
        helper.make_node("Einsum", ["ln", "ln"], ["qk"], equation="nqd,nkd->nqk"),
        helper.make_node("Mul", ["qk", const("inv_sqrt_d", np.float32(1 / np.sqrt(d)))], ["qk_s"]),
        helper.make_node("Softmax", ["qk_s"], ["attn"], axis=-1),
        helper.make_node("Einsum", ["attn", "ln"], ["ctx"], equation="nqk,nkd->nqd"),
        helper.make_node("Add", ["tok", "ctx"], ["res"]),
        helper.make_node("MatMul", ["res", const("mlp1", rng.normal(0, 0.1, (d, 2 * d)).astype(np.float32))], ["h"]),
        helper.make_node("Div", ["h", const("sqrt2", np.float32(np.sqrt(2.0)))], ["h_s"]),
        helper.make_node("Erf", ["h_s"], ["h_erf"]),
        helper.make_node("Add", ["h_erf", const("one", np.float32(1.0))], ["h_1"]),
        helper.make_node("Mul", ["h", "h_1"], ["h_m"]),
        helper.make_node("Mul", ["h_m", const("half", np.float32(0.5))], ["gelu"]),
        helper.make_node("ReduceMean", ["gelu"], ["pooled"], axes=[1], keepdims=0),
        helper.make_node("MatMul", ["pooled", const("head", rng.normal(0, 1e-3, (2 * d, k)).astype(np.float32))], ["logits_vit"]),
        helper.make_node("Add", ["logits_main", "logits_vit"], ["logits"]),
        helper.make_node("Sigmoid", ["logits"], ["output"]),
    ]
    graph = helper.make_graph(nodes, "tiny_wd14", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", size, size, 3])],
                              [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["batch", k])], init)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("ai.onnx.ml", 4)], producer_name="loft-tiny-wd14")
    model.ir_version = 8
    onnx.checker.check_model(model)
    path.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path / "model.onnx"))
    with open(path / "selected_tags.csv", "w", newline="") as f:
        wr = csv.writer(f)
        wr.writerow(["tag_id", "name", "category", "count"])
        for i, (name, cat, _) in enumerate(TAGS):
            wr.writerow([1000 + i, name, cat, 1000 - i])


def images() -> dict:
    out = {}
    out["blue.png"] = Image.new("RGB", (300, 300), (20, 40, 230))
    out["red.png"] = Image.new("RGB", (300, 300), (230, 30, 20))
    out["green.png"] = Image.new("RGB", (300, 300), (30, 220, 40))
    out["tall-blue.png"] = Image.new("RGB", (200, 600), (20, 40, 230))
    out["transparent.png"] = Image.new("RGBA", (300, 300), (0, 0, 0, 0))
    g = np.zeros((448, 448, 3), np.uint8)
    g[..., 0] = np.linspace(0, 255, 448, dtype=np.float32)[None, :].astype(np.uint8)
    g[..., 1] = np.linspace(255, 0, 448, dtype=np.float32)[:, None].astype(np.uint8)
    g[..., 2] = 90
    out["gradient.png"] = Image.fromarray(g, "RGB")
    return out


def prepare(img: Image.Image, size: int) -> np.ndarray:
    """The HF space's preprocessing (pil_ensure_rgb, pil_pad_square, bicubic resize, RGB->BGR)."""
    if img.mode not in ("RGB", "RGBA"):
        img = img.convert("RGBA") if "transparency" in img.info else img.convert("RGB")
    if img.mode == "RGBA":
        canvas = Image.new("RGBA", img.size, (255, 255, 255))
        canvas.alpha_composite(img)
        img = canvas.convert("RGB")
    w, h = img.size
    m = max(w, h)
    square = Image.new("RGB", (m, m), (255, 255, 255))
    square.paste(img, ((m - w) // 2, (m - h) // 2))
    if m != size:
        square = square.resize((size, size), Image.BICUBIC)
    return np.asarray(square, dtype=np.float32)[:, :, ::-1]


def tags_of(probs: np.ndarray, general=0.35, character=0.85) -> list:
    def name(t):
        return t if t in KAOMOJI else t.replace("_", " ")
    chars = sorted([(p, t) for p, (t, c, _) in zip(probs, TAGS) if c == 4 and p > character], reverse=True)
    gen = sorted([(p, t) for p, (t, c, _) in zip(probs, TAGS) if c == 0 and p > general], reverse=True)
    return [name(t) for _, t in chars] + [name(t) for _, t in gen]


def main() -> None:
    make_model(448, OUT / "tiny-wd14")
    make_model(64, OUT / "tiny-wd14-64")
    (OUT / "images").mkdir(parents=True, exist_ok=True)
    expected = {"reference": f"onnxruntime {onnxruntime.__version__}, preprocessing of SmilingWolf/wd-tagger app.py (PIL bicubic)", "images": {}}
    for model_dir, size in (("tiny-wd14", 448), ("tiny-wd14-64", 64)):
        session = onnxruntime.InferenceSession(str(OUT / model_dir / "model.onnx"))
        for file, img in images().items():
            img.save(OUT / "images" / file)
            x = prepare(Image.open(OUT / "images" / file), size)[None]
            probs = session.run(None, {session.get_inputs()[0].name: x})[0][0]
            expected["images"].setdefault(model_dir, {})[file] = {
                "probs": [float(p) for p in probs],
                "tags": tags_of(probs),
                "tags_character_0.75": tags_of(probs, character=0.75),
            }
            print(f"{model_dir} {file:16} -> {', '.join(tags_of(probs))}")
    (OUT / "expected.json").write_text(json.dumps(expected, indent=1) + "\n")


if __name__ == "__main__":
    main()
