#!/usr/bin/env bash
# Builds Loft's CUDA binary (`cargo build --release --features cuda`) on a machine with no GPU
# and no CUDA toolkit: CUDA 13.0 compilers from PyPI wheels, and link-time stub libraries for
# the CUDA libraries candle links (the real ones are on the GPU machine). The binary lands in
# target/cuda/release/loft (its own target folder: the CPU binary stays where it is; a stripped,
# gzipped copy to carry is target/cuda/loft.gz) and runs on a CUDA 13 machine (driver 580+) whose libcuda, cuBLAS,
# cuBLASLt, cuRAND and cudart are on LD_LIBRARY_PATH (README, "GPU").
#
#   scripts/build-cuda.sh [TOOLCHAIN_DIR]     (default: target/cuda-toolchain)
#
# CUDA_COMPUTE_CAP (default 90: H100/H200, PTX for sm_90a) picks the GPU generation; use the
# card's value (e.g. 80 for A100, 89 for RTX 40xx) for another one.
set -euo pipefail
cd "$(dirname "$0")/.."
dir=$(realpath -m "${1:-target/cuda-toolchain}")
cap=${CUDA_COMPUTE_CAP:-90}

if [ ! -x "$dir/cuda/bin/nvcc" ]; then
  echo "CUDA toolchain: PyPI wheels into $dir"
  mkdir -p "$dir"
  python3 -m venv "$dir/venv"
  # 13.0: the PTX a newer nvcc writes would not load on driver 580.
  "$dir/venv/bin/pip" install -q --no-deps \
    nvidia-cuda-nvcc==13.0.88 nvidia-nvvm==13.0.88 nvidia-cuda-crt==13.0.88 \
    nvidia-cuda-runtime==13.0.96 nvidia-cuda-cccl==13.0.85
  cu=$(echo "$dir"/venv/lib/python3*/site-packages/nvidia/cu13)
  ln -sfn lib "$cu/lib64"
  ln -sf libcudart.so.13 "$cu/lib/libcudart.so"
  ln -sfn "$cu" "$dir/cuda"
fi

# Stubs for the libraries cudarc links (symbol names from cudarc's own declarations). They must
# exist before cudarc's build script first runs: it adds lib/stubs to the link path only then.
stubs="$dir/cuda/lib/stubs"
if [ ! -f "$stubs/libcuda.so" ]; then
  cargo fetch -q
  src=$(ls -d "${CARGO_HOME:-$HOME/.cargo}"/registry/src/*/cudarc-0.19*/src | sort -V | tail -1)
  mkdir -p "$stubs"
  tmp=$(mktemp -d)
  stub() { # module in cudarc, library name, soname
    grep -ohE '^\s+fn [A-Za-z0-9_]+\(' "$src/$1/sys/mod.rs" | sed -E 's/^\s+fn //; s/\($//' | sort -u \
      | awk '{print "int " $1 "(void){return 100;}"}' > "$tmp/$2.c"
    ${CC:-gcc} -shared -fPIC -Wl,-soname,"$3" "$tmp/$2.c" -o "$stubs/lib$2.so"
  }
  stub driver cuda libcuda.so.1
  stub cublas cublas libcublas.so.13
  stub cublaslt cublasLt libcublasLt.so.13
  stub curand curand libcurand.so.10
  stub nvrtc nvrtc libnvrtc.so.13
  rm -rf "$tmp"
  # A cudarc built before the stubs existed would not look for them.
  cargo clean -q --release --target-dir target/cuda -p cudarc 2>/dev/null || true
fi

export CUDA_HOME="$dir/cuda" CUDA_PATH="$dir/cuda" CUDA_ROOT="$dir/cuda"
export PATH="$dir/cuda/bin:$PATH"
export CUDA_COMPUTE_CAP="$cap"
# Plain gcc-12 fails at nvcc's link step; g++-12 works.
export NVCC_CCBIN="${NVCC_CCBIN:-g++-12}"
cargo build --release --features cuda --target-dir target/cuda "${@:2}"
# A stripped, gzipped copy to carry to a GPU machine (~20 MB instead of ~80: mostly PTX text).
strip -o target/cuda/loft target/cuda/release/loft
gzip -9 -f target/cuda/loft
echo "CUDA binary: target/cuda/release/loft (compute capability $cap); to carry: target/cuda/loft.gz"

