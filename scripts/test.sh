#!/usr/bin/env bash
# Runs the whole test suite: installs the pinned CUDA compiler (pip wheels, no GPU needed) so
# that every kernel is compiled, then runs all tests. GPU tests skip with a message when there
# is no GPU; on a GPU machine see scripts/gpu-test.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -z "${LLMQ_NO_NVCC:-}" ]; then
  NVCC_BIN="$(bash scripts/install-nvcc.sh | tail -n 1)"
  export PATH="$(dirname "$NVCC_BIN"):$PATH"
fi
cargo test --release --workspace "$@"
