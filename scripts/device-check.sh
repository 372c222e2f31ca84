#!/usr/bin/env bash
# The GPU machine's check, in one run (target: under 8 minutes on an H200). Given the CUDA
# binary built on a CPU machine (scripts/build-cuda.sh → target/cuda/release/loft, or the
# carried target/cuda/loft.gz):
#   1. the device check: Loft's ops (linear, conv, attention; outputs and gradients) and the
#      tiny fixture models' gradients on CUDA against the CPU (`loft bench check-device`);
#   2. the benchmark, Loft and PyTorch + LyCORIS on the same card in the same run, synthetic
#      full-size weights, LoRA rank 16, bf16: SD1.5 512² batch 1 and 4, SDXL 1024² batch 1;
#   3. one table (s/step, peak VRAM, ratios, the published anchors beside them), printed and
#      left in $OUT/device-table.md (or ./device-table.md), with the raw JSON beside it.
#
# Needs on the GPU machine: an NVIDIA driver, nvidia-smi, and a Python with torch (its
# nvidia/*/lib folders supply the CUDA libraries the binary links), diffusers, transformers and
# lycoris-lora. LOFT_BIN, PYTHON and LOFT_STEPS override the defaults.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-.}
mkdir -p "$out"
bin=${LOFT_BIN:-target/cuda/release/loft}
if [ ! -x "$bin" ] && [ -f target/cuda/loft.gz ]; then
  # The carried copy (scripts/build-cuda.sh writes it).
  bin=/tmp/loft-cuda
  gunzip -c target/cuda/loft.gz > "$bin" && chmod +x "$bin"
fi
steps=${LOFT_STEPS:-3}
# Synthetic models (GBs): never under $OUT, which travels back.
models=${LOFT_MODELS:-/tmp/loft-models}
table="$out/device-table.md"
log="$out/device-check.log"
: > "$log"
say() { echo "$*" | tee -a "$log"; }

python=${PYTHON:-}
if [ -z "$python" ]; then
  for p in .venv-parity/bin/python python3 python; do
    if command -v "$p" >/dev/null 2>&1 && "$p" -c "import torch" 2>/dev/null; then python=$p; break; fi
  done
fi
[ -n "$python" ] || { say "no Python with torch found (set PYTHON)"; exit 1; }
site=$("$python" -c "import torch, os; print(os.path.dirname(os.path.dirname(torch.__file__)))")
libs=$(ls -d "$site"/nvidia/*/lib "$site"/nvidia/cu13/lib 2>/dev/null | sort -u | tr '\n' ':')
export LD_LIBRARY_PATH="${libs}${LD_LIBRARY_PATH:-}"
missing=$("$python" -c "
import importlib
print(' '.join(m for m in ['diffusers', 'transformers', 'lycoris'] if importlib.util.find_spec(m) is None))")
[ -z "$missing" ] || say "PyTorch reference disabled: $python lacks $missing"
say "binary: $bin; python: $python ($("$python" -c 'import torch; print(torch.__version__)'))"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee -a "$log"

# 1. Device check.
say ""
say "== 1. ops and models on CUDA against the CPU"
timeout 120 "$bin" bench check-device --device cuda 2>&1 | tee -a "$log"
check_rc=${PIPESTATUS[0]}

# 1b. The hand-written kernels (worker/kernels) against their CPU references, every dtype,
# outputs pre-filled with NaN; then their speeds beside the card's copy bandwidth.
say ""
say "== 1b. kernels on CUDA against their CPU references, and their speeds"
timeout 240 "$bin" bench kernels --device cuda 2>&1 | tee -a "$log" "$out/kernels-table.md"
kernels_rc=${PIPESTATUS[0]}

# 2. Benchmarks. Peak VRAM from nvidia-smi sampled every 100 ms while each run is alive (the
# same measure for both engines), less the memory in use before it started.
peak_of() { # command...: runs it, prints the peak MiB used above the baseline to fd 3
  local base; base=$(nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -i 0 | head -1)
  local f; f=$(mktemp)
  ( while :; do nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -i 0 >> "$f"; sleep 0.1; done ) &
  local poller=$!
  "$@"
  local rc=$?
  kill $poller 2>/dev/null; wait $poller 2>/dev/null
  sort -n "$f" | tail -1 | awk -v b="$base" '{print $1 - b}' >&3
  rm -f "$f"
  return $rc
}

rows=()
bench() { # label model resolution batch
  local label=$1 model=$2 res=$3 batch=$4 json="$out/bench-$1.json"
  say ""
  say "== 2. $label"
  local ref=()
  [ -z "$missing" ] || ref=(--no-reference)
  # Loft alone first (its VRAM), then the reference alone.
  exec 3>"$out/peak-loft-$label"
  peak_of timeout 300 "$bin" bench train --model "$model" --resolution "$res" --batch-size "$batch" --rank 16 \
    --device cuda --mixed-precision bf16 --steps "$steps" --no-reference --cache-dir "$models" --json-out "$json" 2>&1 | tee -a "$log"
  exec 3>&-
  local loft_s loft_mem torch_s="" torch_mem=""
  loft_s=$("$python" -c "import json; print('%.3f' % json.load(open('$json'))['loft']['s_per_step'])" 2>/dev/null || echo "failed")
  loft_mem=$(cat "$out/peak-loft-$label" 2>/dev/null)
  if [ -z "$missing" ]; then
    local lat=$((res / 8))
    exec 3>"$out/peak-torch-$label"
    peak_of timeout 300 "$python" tests/parity/bench_train.py --model "$models/loft-$model" --steps "$steps" --latent $lat $lat \
      --batch "$batch" --rank 16 --device cuda --dtype bfloat16 > "$out/torch-$label.json" 2>>"$log"
    exec 3>&-
    torch_s=$("$python" -c "import json; print('%.3f' % json.loads(open('$out/torch-$label.json').read().splitlines()[-1])['s_per_step'])" 2>/dev/null || echo "failed")
    torch_mem=$(cat "$out/peak-torch-$label" 2>/dev/null)
  fi
  rows+=("$label|$loft_s|$loft_mem|$torch_s|$torch_mem")
}

bench sd15-512-bs1 sd15-synthetic 512 1
# The same step with the hand-written kernels off (candle's ops everywhere): their end-to-end effect.
LOFT_KERNELS=off bench sd15-512-bs1-kernels-off sd15-synthetic 512 1
bench sd15-512-bs4 sd15-synthetic 512 4
bench sdxl-1024-bs1 sdxl-synthetic 1024 1

# 3. The table.
{
  echo "GPU: $(nvidia-smi --query-gpu=name --format=csv,noheader | head -1); LoRA rank 16, bf16, $steps timed steps; VRAM = peak nvidia-smi use above idle (MiB)"
  echo ""
  echo "| case | Loft s/step | Loft VRAM | PyTorch s/step | PyTorch VRAM | time ratio (Loft/PyTorch) | VRAM ratio | published anchor |"
  echo "|---|---|---|---|---|---|---|---|"
  for r in "${rows[@]}"; do
    IFS='|' read -r label ls lm ts tm <<< "$r"
    anchor="-"
    case $label in
      sd15-512-bs1) anchor="SimpleTuner H100: 0.181 s/step, 2.87 GiB";;
      sdxl-1024-bs1) anchor="SimpleTuner H100 (LoKr): 0.606 s/step, 13 GiB";;
    esac
    ratio=$(awk -v a="$ls" -v b="$ts" 'BEGIN{ if (b+0 > 0 && a+0 > 0) printf "%.2f", a/b; else print "-" }')
    mratio=$(awk -v a="$lm" -v b="$tm" 'BEGIN{ if (b+0 > 0 && a+0 > 0) printf "%.2f", a/b; else print "-" }')
    echo "| $label | $ls | $lm | ${ts:--} | ${tm:--} | $ratio | $mratio | $anchor |"
  done
  echo ""
  echo "device check exit status: $check_rc; kernel check exit status: $kernels_rc"
} > "$table"
cat "$table" | tee -a "$log"
