#!/usr/bin/env bash
# Builds everything a GPU machine without Rust needs — the GPU test executables, the release
# `llmq` binary and the device scripts — into .gpu/, and packs it as .gpupack/gpu.tar.xz.
# Every binary embeds the same kernel fatbin; xz -9 (a 64 MiB window) stores it about once, so
# a pack of five binaries is ~15 MB (the default -6 window of 8 MiB stored it per binary: 62 MB).
# Only the test executables named in GPU_BINS (default: ops attention telemetry nccl copy_comm gpu_model hf_compare) are
# packed, plus the kernel timings (benches/kernels.rs) as .gpu/kernels-bench.
# An executable .gpu/llmq-base (e.g. the previous build, for before/after timings in one run) is
# packed too when present.
# On the GPU machine: tar -xJf .gpupack/gpu.tar.xz -C .gpu && bash .gpu/device-run.sh tests
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
GPU_TEST_CLEAN=1 bash scripts/gpu-test.sh >/dev/null
bash scripts/gpu-test.sh -p llmq-cli --test gpu_model --test hf_compare >/dev/null
cargo build --release -p llmq-cli
cp target/release/llmq .gpu/llmq
bench="$(cargo bench -p llmq-cuda --bench kernels --no-run --message-format=json 2>/dev/null | python3 -c 'import json, sys; print([m["executable"] for m in map(json.loads, sys.stdin) if m.get("reason") == "compiler-artifact" and m["target"]["name"] == "kernels" and m.get("executable")][-1])')"
cp "$bench" .gpu/kernels-bench
cp scripts/bench.sh scripts/tune-matmuls.sh scripts/hf_reference.py scripts/device-run.sh scripts/ncu_summary.py .gpu/
keep="${GPU_BINS:-ops attention telemetry nccl copy_comm gpu_model hf_compare}"
for f in .gpu/bin/*; do
  case " $keep " in *" $(basename "$f") "*) strip --strip-debug "$f" ;; *) rm -f "$f" ;; esac
done
strip --strip-debug .gpu/llmq .gpu/kernels-bench
mkdir -p .gpupack
tar -C .gpu -cf - --exclude=logs --exclude=out . | xz -9 -T1 > .gpupack/gpu.tar.xz
ls -la .gpupack/gpu.tar.xz
