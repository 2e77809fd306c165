#!/usr/bin/env bash
# Runs the whole test suite: installs the pinned CUDA compiler (pip wheels, no GPU needed) so
# that every kernel is compiled, then runs all tests. GPU tests skip with a message when there
# is no GPU; on a GPU machine see scripts/gpu-test.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -z "${LLMQ_NO_NVCC:-}" ]; then
  NVCC_BIN="$(bash scripts/install-nvcc.sh | tail -n 1)"
  export PATH="$(dirname "$NVCC_BIN"):$PATH"
  # LLMQ_NVCC is watched by llmq-cuda's build script: setting it reruns the script even when an
  # earlier build (e.g. the README's first command, before nvcc was installed) cached "no nvcc";
  # LLMQ_REQUIRE_KERNELS makes tests/kernels_built.rs fail if the kernels were still not compiled
  export LLMQ_NVCC="$NVCC_BIN" LLMQ_REQUIRE_KERNELS=1
fi
cargo test --release --workspace "$@"

# The Python package (crates/llmq-py): built by maturin in release into the same target directory
# as the tests above (the kernels and most dependencies are reused), installed into a fresh virtual
# environment with maturin, pytest, numpy and mypy from the package index, then its pytest tests
# and a check of its type stubs.
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$PWD/target}"
PY_VENV="$(mktemp -d)"
trap 'rm -rf "$PY_VENV"' EXIT
python3 -m venv "$PY_VENV"
export PATH="$PY_VENV/bin:$PATH"
python -m pip install --quiet maturin pytest numpy mypy
python -m pip install --quiet --no-build-isolation ./crates/llmq-py
# the binary the cargo tests built, for the test that compares the package with `llmq train`
LLMQ_BIN="$CARGO_TARGET_DIR/release/llmq" python -m pytest -q crates/llmq-py/tests
# the type stubs (llmq.pyi) against the module's real functions and signatures
python -m mypy.stubtest llmq --allowlist crates/llmq-py/stubtest-allowlist.txt
