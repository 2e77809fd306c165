#!/usr/bin/env bash
# Throughput benchmarks on a GPU machine, from scratch on random tokens at T=1024.
# Usage: bash scripts/bench.sh [LLMQ_BINARY] [OUT_DIR] [which...]
#   which: 0.5b-bf16 1.5b-bf16 0.5b-fp8 1.5b-fp8 3b-fp8 7b-fp8 (default: all)
# Each run prints per-step lines and a final "throughput: median ..." line (median step time
# after warm-up); the summary table is written to OUT_DIR/bench.txt.
# BENCH_TOKENS=524288 accumulates micro-batches up to that many tokens per optimizer step and keeps
# Adam m/v in bf16: the setting of the reference system's published numbers (REFERENCE.md), where
# the optimizer's cost is spread over 32 micro-batches. Unset: one micro-batch per step, fp32
# optimizer state for 0.5B/1.5B (the optimizer's cost counts fully).
# BENCH_TOKENS below one micro-batch (e.g. 1): one micro-batch per step with that setting's memory.
# BENCH_EXTRA: more `llmq train` flags for every run (e.g. "--no-wgrad-overlap", "--cuda-graphs").
# BENCH_BS: the micro-batch (e.g. 4 for launch-bound runs; device-run.sh graphs compares
# --cuda-graphs on and off there).
# BENCH_GPUS=N: N data-parallel ranks (--gpus N); with BENCH_TOKENS the tokens per step stay the
# same (each rank accumulates 1/N of the micro-batches), so the throughputs compare directly.
set -uo pipefail
BIN="${1:-./target/release/llmq}"
OUT="${2:-bench-out}"
shift 2 2>/dev/null || true
WHICH=("$@")
[ ${#WHICH[@]} -eq 0 ] && WHICH=(0.5b-bf16 1.5b-bf16 0.5b-fp8 1.5b-fp8 3b-fp8 7b-fp8)
STEPS="${BENCH_STEPS:-12}"
mkdir -p "$OUT"
for w in "${WHICH[@]}"; do
  size="${w%-*}"; prec="${w##*-}"
  # micro-batch: the largest that fits the H200 without recompute (larger micro-batches amortise
  # the per-micro-batch costs: 0.5B at B=64 vs 16 +2.3% bf16 / +3.3% e4m3, 1.5B at 32 vs 16
  # +1.3% / +2.2%, docs/BENCHMARKS.md, seventh round; tenth round, since fp8 runs keep less:
  # 3B e4m3 at 32 vs 16 +2.2%, 7B e4m3 at 16 vs 8 +3.1%, 1.5B e4m3 at 64 vs 32 +0.7% with
  # 0.86 GiB free); 1.5B bf16 at 64 would need ~148 GiB; 0.5B e4m3 at 128: +0.2%, kept at 64
  case "$size" in
    0.5b) model=qwen2.5-0.5b; bs=64 ;;
    1.5b) model=qwen2.5-1.5b; bs=32; [ "$prec" = fp8 ] && bs=64 ;;
    3b) model=qwen2.5-3b; bs=32 ;;
    7b) model=qwen2.5-7b; bs=16 ;;
  esac
  bs="${BENCH_BS:-$bs}"  # micro-batch override (e.g. 16 for the earlier rounds' tables)
  extra=()
  [ "$prec" = fp8 ] && extra+=(--matmul-dtype e4m3 --persistent-quants) || extra+=(--matmul-dtype bf16)
  read -ra more <<< "${BENCH_EXTRA:-}"
  extra+=("${more[@]}")
  steps="$STEPS"
  if [ -n "${BENCH_TOKENS:-}" ]; then
    accum=$(( BENCH_TOKENS / (bs * 1024 * ${BENCH_GPUS:-1}) )); [ "$accum" -lt 1 ] && accum=1
    extra+=(--grad-accumulation "$accum" --opt-m-dtype bf16 --opt-v-dtype bf16)
    steps="${BENCH_STEPS:-4}"
  fi
  [ "${BENCH_GPUS:-1}" -gt 1 ] && extra+=(--gpus "$BENCH_GPUS")
  # large models: bf16 master weights and optimizer state (as the reference's published runs)
  case "$size" in 3b|7b) extra+=(--model-dtype bf16 --grad-dtype bf16); [ -z "${BENCH_TOKENS:-}" ] && extra+=(--opt-m-dtype bf16 --opt-v-dtype bf16) ;; esac
  echo "=== $w: $model B=$bs T=1024 ${extra[*]}" | tee -a "$OUT/bench.txt"
  "$BIN" train --device cuda --model "$model" --from-scratch --random-data --seq-len 1024 --batch-size "$bs" \
     --steps "$steps" --warmup $(( steps > 2 ? 2 : 0 )) --eval-every 0 --print-every 1 "${extra[@]}" > "$OUT/bench-$w.log" 2>&1
  rc=$?
  tail -n 3 "$OUT/bench-$w.log" | tee -a "$OUT/bench.txt"
  [ $rc -ne 0 ] && echo "exit $rc" | tee -a "$OUT/bench.txt"
done
