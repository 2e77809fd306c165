#!/usr/bin/env bash
# Measures cuBLASLt algorithm choices for the benchmark configurations and appends them to OUT_FILE
# as a tuning.txt section: one step of each bench.sh configuration (the same model, micro-batch
# and flags, so the same matmul shapes; one micro-batch, Adam m/v in bf16 as in its BENCH_TOKENS
# runs) with every shape the table does not list timed at its first call
# (crates/llmq-cuda/src/tuning.rs). On the GPU machine:
#   bash .gpu/tune-matmuls.sh .gpu/llmq tune.txt [which...]   (which: as bench.sh; default all)
# BENCH_BS and BENCH_EXTRA apply as in bench.sh. Keep only entries that win in whole runs
# (`device-run.sh ab WHICH 2 'base||' 'tuned|--matmul-tuning tune.txt|'`): isolated timings
# have misled before (docs/BENCHMARKS.md, ninth and twelfth rounds).
set -uo pipefail
BIN="$1"; OUT_FILE="$2"; shift 2
WHICH=("$@")
[ ${#WHICH[@]} -eq 0 ] && WHICH=(0.5b-bf16 1.5b-bf16 0.5b-fp8 1.5b-fp8 3b-fp8 7b-fp8)
logs="$(mktemp -d)"
for w in "${WHICH[@]}"; do
  BENCH_EXTRA="${BENCH_EXTRA:-} --matmul-autotune $OUT_FILE" BENCH_TOKENS=1 BENCH_STEPS=1 \
    bash "$(dirname "${BASH_SOURCE[0]}")/bench.sh" "$BIN" "$logs" "$w" > /dev/null
  grep -q "^exit" "$logs/bench.txt" && { echo "tune $w failed:" >&2; tail -n 5 "$logs/bench-$w.log" >&2; }
  rm -f "$logs/bench.txt"
done
