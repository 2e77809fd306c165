#!/usr/bin/env bash
# Installs a pinned CUDA 13.0 compiler (nvcc, cicc/nvvm, ptxas, crt headers, cccl, cudart headers)
# and the CUTLASS C++ headers (nvidia-cutlass: cutlass_library/source/include) from NVIDIA's pip
# wheels into <repo>/.cuda-toolchain, so that llmq-cuda's build.rs can compile the kernels on a
# machine without a CUDA installation (no GPU needed to build).
# Idempotent: a second run finds the toolchain and only prints the nvcc path.
# Usage: scripts/install-nvcc.sh   -> prints the path of nvcc on the last line.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DEST="${LLMQ_CUDA_TOOLCHAIN:-$ROOT/.cuda-toolchain}"
PY="${PYTHON:-python3}"
PKGS=(nvidia-cuda-nvcc==13.0.88 nvidia-nvvm==13.0.88 nvidia-cuda-crt==13.0.88 nvidia-cuda-cccl==13.0.85 nvidia-cuda-runtime==13.0.96 nvidia-cutlass==4.2.0.0)
STAMP="$DEST/.installed"
WANT="${PKGS[*]}"
if [[ -f "$STAMP" && "$(cat "$STAMP")" == "$WANT" && -x "$DEST/nvidia/cu13/bin/nvcc" ]]; then
  echo "$DEST/nvidia/cu13/bin/nvcc"
  exit 0
fi
mkdir -p "$DEST"
"$PY" -m pip install --quiet --disable-pip-version-check --no-deps --upgrade --target "$DEST" "${PKGS[@]}" >&2
NVCC="$DEST/nvidia/cu13/bin/nvcc"
if [[ ! -x "$NVCC" ]]; then
  NVCC="$(find "$DEST" -type f -name nvcc | head -n1)"
fi
[[ -x "$NVCC" ]] || { echo "install-nvcc.sh: nvcc not found under $DEST" >&2; exit 1; }
[[ -f "$DEST/cutlass_library/source/include/cutlass/cutlass.h" ]] || { echo "install-nvcc.sh: CUTLASS headers not found under $DEST/cutlass_library/source/include" >&2; exit 1; }
echo "$WANT" > "$STAMP"
echo "$NVCC"
