#!/usr/bin/env python3
"""sd-scripts' weighted captions and wildcards, for Loft's `captions` test (run by hand only).

    .venv-parity/bin/python tests/parity/make_caption_fixtures.py PATH/TO/sd-scripts

Writes tests/fixtures/sd-scripts/captions.json and weighted_captions.safetensors:

- `weighted`: per caption and max_token_length (75, 150), the token windows and weights of
  sd-scripts' `TokenizeStrategy._get_input_ids(..., weighted=True)` with the tiny SD 1.5
  fixture's tokenizer (tests/fixtures/models/tiny-sd15/tokenizer);
- the text-encoder states of those captions after `SdTextEncodingStrategy.encode_tokens_with_weights`
  on the fixture's text encoder, as `states_75` / `states_150` in the safetensors file;
- `wildcards`: for captions with `{a|b}` choices, escaped braces and several lines, every
  caption sd-scripts' `BaseDataset.process_caption` (enable_wildcard) gives over 400 seeds of
  Python's `random`, with the caption prefix and suffix it applies first.

sd-scripts' library imports cv2, torchvision and imagesize at the top for image helpers this
never calls; they are stubbed here.
"""

import json
import random
import sys
from pathlib import Path
from types import SimpleNamespace
from unittest import mock

import torch
from safetensors.torch import save_file

root = Path(sys.argv[1]).resolve()
repo = Path(__file__).resolve().parents[2]
import diffusers  # noqa: E402,F401  (probes for torchvision: import before the stubs)
from transformers import CLIPTextModel, CLIPTokenizer  # noqa: E402

for stub in ["cv2", "torchvision", "torchvision.transforms", "imagesize"]:
    sys.modules.setdefault(stub, mock.MagicMock())
sys.path.insert(0, str(root))
from library import train_util  # noqa: E402
from library.strategy_sd import SdTextEncodingStrategy, SdTokenizeStrategy  # noqa: E402

model_dir = repo / "tests/fixtures/models/tiny-sd15"
tokenizer = CLIPTokenizer.from_pretrained(model_dir / "tokenizer")
text_encoder = CLIPTextModel.from_pretrained(model_dir / "text_encoder").eval()

captions = [
    "a photo of a dog",
    "an (important) word, [quiet] background",
    "a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).",
    "\\(literal\\) brackets, (unbalanced",
    "(" + ", ".join(f"tag{i}" for i in range(60)) + ":1.2), tail words",
]

weighted = []
tensors = {}
for max_token_length in [75, 150]:
    strategy = SdTokenizeStrategy.__new__(SdTokenizeStrategy)  # without downloading a tokenizer
    strategy.tokenizer = tokenizer
    strategy.max_length = max_token_length + 2
    tokens, weights = strategy.tokenize_with_weights(captions)
    for i, c in enumerate(captions):
        weighted.append({
            "caption": c,
            "max_token_length": max_token_length,
            "windows": tokens[0][i].reshape(-1, 77).tolist(),
            "window_weights": weights[0][i].reshape(-1, 77).tolist(),
        })
    encoding = SdTextEncodingStrategy(clip_skip=None)
    with torch.no_grad():
        states = encoding.encode_tokens_with_weights(strategy, [text_encoder], tokens, weights)[0]
    tensors[f"states_{max_token_length}"] = states.float().contiguous()


def process(caption, prefix="", suffix="", seeds=400):
    subset = SimpleNamespace(
        caption_prefix=prefix, caption_suffix=suffix, caption_dropout_rate=0.0, caption_dropout_every_n_epochs=0,
        enable_wildcard=True, shuffle_caption=False, token_warmup_step=0, caption_tag_dropout_rate=0.0,
        keep_tokens=0, keep_tokens_separator="", caption_separator=",", secondary_separator=None,
    )
    dataset = SimpleNamespace(current_epoch=1, current_step=0, max_train_steps=100, replacements={})
    seen = set()
    for seed in range(seeds):
        random.seed(seed)
        seen.add(train_util.BaseDataset.process_caption(dataset, subset, caption))
    return sorted(seen)


wildcards = []
for caption, prefix, suffix in [
    ("a {red|blue|green} {cat|dog}", "", ""),
    ("{{literal}} and {a|b}, {}", "", ""),
    ("first line {x|y}\nsecond line\nthird {p|q|r}", "", ""),
    ("one line\nother line", "sks", "photo"),
    ("nested {a{b|c}|d} end", "", ""),
]:
    wildcards.append({"caption": caption, "prefix": prefix, "suffix": suffix, "outcomes": process(caption, prefix, suffix)})

out_dir = repo / "tests/fixtures/sd-scripts"
save_file(tensors, out_dir / "weighted_captions.safetensors")
commit = "unknown"
try:
    import subprocess
    commit = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
except OSError:
    pass
(out_dir / "captions.json").write_text(json.dumps({
    "source": f"kohya-ss/sd-scripts {commit} library/strategy_base.py, strategy_sd.py, train_util.py BaseDataset.process_caption",
    "captions": captions,
    "weighted": weighted,
    "wildcards": wildcards,
}, indent=1) + "\n")
print("wrote", out_dir / "captions.json")
