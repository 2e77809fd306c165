#!/usr/bin/env bash
# Measures cuBLASLt algorithm choices for the benchmark configurations (one training step each,
# every new matmul shape's candidates timed; crates/llmq-cuda/src/tuning.rs) and appends them to
# OUT_FILE as a tuning.txt section. On the GPU machine:
#   bash .gpu/tune-matmuls.sh .gpu/llmq tune.txt [which...]   (which: as bench.sh; default all)
# then paste the file's lines into crates/llmq-cuda/tuning.txt (or use LLMQ_CUBLASLT_TUNING=file).
set -uo pipefail
BIN="$1"; OUT_FILE="$2"; shift 2
WHICH=("$@")
[ ${#WHICH[@]} -eq 0 ] && WHICH=(0.5b-bf16 1.5b-bf16 0.5b-fp8 1.5b-fp8 3b-fp8 7b-fp8)
for w in "${WHICH[@]}"; do
  size="${w%-*}"; prec="${w##*-}"
  case "$size" in 0.5b) bs=64 ;; 1.5b) bs=32 ;; 3b) bs=16 ;; 7b) bs=8 ;; esac
  extra=(--matmul-dtype bf16); [ "$prec" = fp8 ] && extra=(--matmul-dtype e4m3 --persistent-quants)
  case "$size" in 3b|7b) extra+=(--model-dtype bf16 --grad-dtype bf16 --opt-m-dtype bf16 --opt-v-dtype bf16) ;; esac
  LLMQ_CUBLASLT_AUTOTUNE=1 LLMQ_CUBLASLT_TUNE_OUT="$OUT_FILE" "$BIN" train --device cuda --model "qwen2.5-$size" --from-scratch \
    --random-data --seq-len 1024 --batch-size "${BENCH_BS:-$bs}" --steps 1 --warmup 0 --eval-every 0 "${extra[@]}" > /dev/null 2>&1 \
    || echo "tune $w: exit $?" >&2
done
