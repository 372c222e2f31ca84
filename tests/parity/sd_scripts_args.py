#!/usr/bin/env python3
"""The argument names kohya's sd-scripts accept, for Loft's export test (run by hand).

    python3 tests/parity/sd_scripts_args.py PATH/TO/sd-scripts

Reads (never imports) `train_network.py`, `sdxl_train_network.py` and `library/*.py` of an
sd-scripts checkout and collects every `parser.add_argument("--name", ...)`; writes them to
tests/fixtures/sd-scripts/args.json with the commit it read. A `--config_file` TOML may only
use these keys: sd-scripts turns the file into the parser's namespace.
"""

import ast
import json
import subprocess
import sys
from pathlib import Path

root = Path(sys.argv[1])
files = [root / "train_network.py", root / "sdxl_train_network.py", *sorted((root / "library").glob("*.py"))]
names = set()
for f in files:
    for node in ast.walk(ast.parse(f.read_text())):
        if isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "add_argument":
            for a in node.args:
                if isinstance(a, ast.Constant) and isinstance(a.value, str) and a.value.startswith("--"):
                    names.add(a.value[2:].replace("-", "_"))
try:
    commit = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
except OSError:
    commit = ""
out = Path(__file__).resolve().parents[1] / "fixtures" / "sd-scripts" / "args.json"
out.write_text(json.dumps({"source": "kohya-ss/sd-scripts", "commit": commit, "args": sorted(names)}, indent=1) + "\n")
print(f"{len(names)} arguments -> {out}")
