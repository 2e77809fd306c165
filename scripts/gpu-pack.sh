#!/usr/bin/env bash
# Builds everything a GPU machine without Rust needs — the GPU test executables, the release
# `llmq` binary and the device scripts — into .gpu/, and packs it as .gpupack/gpu.tar.xz
# (the binaries embed the kernel fatbin; packed they fit a 64 MiB transfer).
# On the GPU machine: tar -xJf .gpupack/gpu.tar.xz -C .gpu && bash .gpu/device-run.sh tests
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
GPU_TEST_CLEAN=1 bash scripts/gpu-test.sh >/dev/null
bash scripts/gpu-test.sh -p llmq-cli --test gpu_model --test hf_compare >/dev/null
cargo build --release -p llmq-cli
cp target/release/llmq .gpu/llmq && strip --strip-debug .gpu/llmq
cp scripts/bench.sh scripts/hf_reference.py scripts/device-run.sh .gpu/
mkdir -p .gpupack
tar -C .gpu -cJf .gpupack/gpu.tar.xz --exclude=logs --exclude=out .
ls -la .gpupack/gpu.tar.xz
