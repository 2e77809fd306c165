#!/usr/bin/env bash
# One device call: GPU tests (incl. the HF transformers comparison), then benchmarks.
# Expects .gpu/ unpacked (see scripts/gpu-pack.sh). Writes a few consolidated files to $OUT.
# Usage: bash .gpu/device-run.sh [tests] [bench WHICH...] [ab WHICH ROUNDS SPEC...] [quality]
#        [kernels-bench SECTION...] [capped SIZE MODEL ACCUM FLAGS...] [scaling WHICH...]
#        [capped-ranks GPUS SIZE MODEL ACCUM FLAGS...] [launch FLAGS...] [graphs WHICH...] [timeout-kill]
# Issue 24 modes: scaling takes ZeRO levels in SCALING_LEVELS, a level written "3a" runs with
# --all-to-all-reduce (reduce-scatters by copy-engine all-to-all + a local reduction kernel);
# launch compares one process per GPU with the threaded run (LAUNCH_THREADS_EXTRA: flags of the
# threaded run only, e.g. "--all-to-all-reduce --memcpy-all-gather", which processes refuse);
# timeout-kill checks that rank 0 names the killed rank (the roll call over the rendezvous).
cd "$(dirname "${BASH_SOURCE[0]}")/.."
O="${OUT:-.gpu/out}"; mkdir -p "$O"
export LD_LIBRARY_PATH="/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}"
# cudarc opens libnccl.so (not .so.2, which is what distributions and pip wheels ship)
nccl2="$(ldconfig -p 2>/dev/null | awk '/libnccl\.so\.2 /{print $NF; exit}')"
if [ -n "$nccl2" ] && ! ldconfig -p 2>/dev/null | grep -q 'libnccl\.so '; then
  mkdir -p .gpu/lib && ln -sf "$nccl2" .gpu/lib/libnccl.so && export LD_LIBRARY_PATH="$PWD/.gpu/lib:$LD_LIBRARY_PATH"
fi
what="${1:-tests}"; shift || true
case "$what" in
  tests)
    (PYTHONUNBUFFERED=1 python3 .gpu/hf_reference.py /tmp/hf_ref 2>&1) > /tmp/hf_reference.log
    export LLMQ_HF_REF=/tmp/hf_ref LLMQ_REQUIRE_GPU=1
    OUT=/tmp/testlogs bash .gpu/run.sh > "$O/summary.txt" 2>&1
    for f in /tmp/hf_reference.log /tmp/testlogs/*.log; do echo "######## $f"; cat "$f"; done > "$O/tests.log"
    ;;
  bench)
    # LLMQ=<binary> (default .gpu/llmq) TAG=<name>: results append to $O/bench.txt, logs to bench-logs.txt
    tag="${TAG:-$(basename "${LLMQ:-.gpu/llmq}")}"
    rm -rf /tmp/bench; bash .gpu/bench.sh "${LLMQ:-.gpu/llmq}" /tmp/bench "$@" > /dev/null 2>&1
    { echo "######## $tag"; cat /tmp/bench/bench.txt; } >> "$O/bench.txt"
    for f in /tmp/bench/bench-*.log; do echo "######## $tag $f"; cat "$f"; done >> "$O/bench-logs.txt"
    ;;
  ab)
    # same-call comparison of variants, alternating: ab WHICH ROUNDS 'tag|llmq flags|ENV=v ...' ...
    # e.g. BENCH_TOKENS=262144 BENCH_STEPS=5 bash .gpu/device-run.sh ab 1.5b-fp8 2 \
    #        'old|--no-wgrad-overlap --side-sms 0|' 'new||'
    which="$1"; rounds="$2"; shift 2
    for r in $(seq "$rounds"); do
      for spec in "$@"; do
        IFS='|' read -r tag flags envs <<< "$spec"
        rm -rf /tmp/bench
        # shellcheck disable=SC2086 # envs: words of NAME=value
        env $envs BENCH_EXTRA="$flags" bash .gpu/bench.sh "${LLMQ:-.gpu/llmq}" /tmp/bench $which > /dev/null 2>&1
        { echo "######## $tag (round $r)"; cat /tmp/bench/bench.txt; } >> "$O/bench.txt"
        for f in /tmp/bench/bench-*.log; do echo "######## $tag (round $r) $f"; grep -E "^step|throughput|free" "$f"; done >> "$O/bench-logs.txt"
      done
    done
    ;;
  graphs)
    # issue 22: --cuda-graphs on vs --no-cuda-graphs at a small micro-batch, where launch overhead shows,
    # alternating in one call: graphs [WHICH...] (default 0.5b-fp8), micro-batch GRAPHS_BS
    # (default 4), GRAPHS_ROUNDS rounds (default 3). --cuda-graphs implies --no-wgrad-overlap in
    # fp8 runs, so those are also measured eager without the overlap.
    which="${*:-0.5b-fp8}"
    specs=('eager|--no-cuda-graphs|' 'graphs|--cuda-graphs|')
    [[ "$which" != *bf16* ]] && specs+=('eager-no-overlap|--no-cuda-graphs --no-wgrad-overlap|')
    BENCH_BS="${GRAPHS_BS:-4}" bash "$0" ab "$which" "${GRAPHS_ROUNDS:-3}" "${specs[@]}"
    ;;
  kernels)
    # per-kernel GPU time of one training step under Nsight Compute (one 3-step run per config)
    # usage: kernels WHICH... (0.5b-bf16, 0.5b-fp8, 1.5b-bf16 ...); KB: micro-batch (16), KEXTRA: more
    # llmq flags for every config (e.g. --fp8-fast-accumulation)
    for w in "$@"; do
      size="${w%-*}"; prec="${w##*-}"
      extra=(--matmul-dtype bf16); [ "$prec" = fp8 ] && extra=(--matmul-dtype e4m3 --persistent-quants)
      ncu --clock-control none --metrics gpu__time_duration.sum --csv --page raw --print-units base \
        .gpu/llmq train --device cuda --model "qwen2.5-$size" --from-scratch --random-data --seq-len 1024 \
        --batch-size "${KB:-16}" --steps 3 --warmup 1 --eval-every 0 "${extra[@]}" ${KEXTRA:-} > "/tmp/ncu-$w.csv" 2> "/tmp/ncu-$w.err"
      { echo "######## $w"; python3 .gpu/ncu_summary.py "/tmp/ncu-$w.csv" || tail -20 "/tmp/ncu-$w.err"; } >> "$O/kernels.txt" 2>&1
    done
    ;;
  quality)
    # FP8 vs bf16 on a Qwen2.5-0.5B-shaped model from scratch on the embedded Markov corpus.
    # QUALITY_RUNS: bf16, e4m3, e4m3-fast (--fp8-fast-accumulation)
    for run in ${QUALITY_RUNS:-bf16 e4m3}; do
      p="${run%%-*}"; fast=(); [[ "$run" == *-fast ]] && fast=(--fp8-fast-accumulation)
      .gpu/llmq train --device cuda --model qwen2.5-0.5b --from-scratch --seq-len 1024 --batch-size 8 \
        --steps "${QUALITY_STEPS:-300}" --matmul-dtype "$p" "${fast[@]}" --eval-every 50 --eval-batches 4 --print-every 10 \
        --learning-rate 1e-3 --log-file "$O/quality-$run.jsonl" >> "$O/quality.txt" 2>&1
    done
    ;;
  diag)
    # is a step host-bound (issue time ~ step time) or clock-limited (SM clock, power, throttle
    # reasons sampled every 250 ms during the run)? Then Nsight Compute's full analysis of the
    # attention kernels of step 2.
    nvidia-smi --query-gpu=timestamp,clocks.sm,clocks.mem,power.draw,temperature.gpu,clocks_throttle_reasons.active --format=csv -lms 250 > "$O/clocks.txt" &
    smi=$!
    for w in "${@:-0.5b-bf16}"; do
      size="${w%-*}"; prec="${w##*-}"
      extra=(--matmul-dtype bf16); [ "$prec" = fp8 ] && extra=(--matmul-dtype e4m3 --persistent-quants)
      echo "=== $w" >> "$O/diag.txt"
      .gpu/llmq train --device cuda --model "qwen2.5-$size" --from-scratch --random-data --seq-len 1024 --batch-size 16 \
        --steps 12 --warmup 2 --eval-every 0 "${extra[@]}" --log-file "/tmp/diag-$w.jsonl" >> "$O/diag.txt" 2>&1
      python3 -c 'import json,sys; [print("step %d: %.1f ms, host issue %.1f ms" % (r["step"], r["ms"], r["issue_ms"])) for r in map(json.loads, open(sys.argv[1])) if r.get("type") == "step"]' "/tmp/diag-$w.jsonl" >> "$O/diag.txt"
    done
    kill $smi
    ncu --clock-control none --kernel-name regex:llmq_attn[345] --launch-skip 119 --launch-count 4 --set full \
      .gpu/llmq train --device cuda --model qwen2.5-0.5b --from-scratch --random-data --seq-len 1024 --batch-size 16 \
      --steps 2 --warmup 1 --eval-every 0 --matmul-dtype bf16 > "$O/ncu-attention.txt" 2>&1
    ;;
  attnprof)
    # Nsight Compute's full analysis of COUNT attention kernels matching ATTN_RE after SKIP of
    # them, in a 0.5B bf16 run (ATTN_FLAGS='--attention mma' for the mma.sync kernels, with
    # ATTN_RE=llmq_attn3)
    ncu --clock-control none --kernel-name regex:"${ATTN_RE:-llmq_attn4}" --launch-skip "${SKIP:-48}" --launch-count "${COUNT:-2}" --set full \
      .gpu/llmq train --device cuda --model qwen2.5-0.5b --from-scratch --random-data --seq-len 1024 --batch-size 16 \
      --steps 2 --warmup 1 --eval-every 0 --matmul-dtype bf16 ${ATTN_FLAGS:-} > "$O/ncu-${TAG:-attn}.txt" 2>&1
    ;;
  kernels-bench)
    # per-kernel timings (crates/llmq-cuda/benches/kernels.rs): kernels, matmuls, matmuls-tuning, attention
    .gpu/kernels-bench "$@" > "$O/kernels-bench.txt" 2>&1
    ;;
  capped)
    # a model under --memory-limit (consumer-card emulation): capped SIZE MODEL ACCUM [llmq flags]
    # e.g. capped 16GiB qwen2.5-7b 16 --auto-memory; the driver's device memory in use is
    # sampled every 250 ms and its maximum reported beside the run's own accounting;
    # CAPPED_TIMEOUT (seconds, default none) stops the run (SIGTERM: it ends the current step)
    # so that the peak is still reported within an outer time limit
    limit="$1"; model="$2"; accum="$3"; shift 3
    nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 250 > "/tmp/smi-$model-$limit.txt" & smi=$!
    timeout -k 30 "${CAPPED_TIMEOUT:-0}" .gpu/llmq train --device cuda --model "$model" --from-scratch --random-data --seq-len 1024 --matmul-dtype e4m3 \
      --model-dtype bf16 --opt-m-dtype bf16 --opt-v-dtype bf16 --grad-dtype bf16 --batch-size "${CAPPED_BS:-8}" \
      --grad-accumulation "$accum" --steps "${CAPPED_STEPS:-4}" --warmup 1 --eval-every 0 --print-every 1 \
      --memory-limit "$limit" "$@" >> "$O/capped.txt" 2>&1
    kill $smi
    echo "driver-measured device memory peak: $(sort -n "/tmp/smi-$model-$limit.txt" | tail -1) MiB ($model, $limit)" >> "$O/capped.txt"
    ;;
  scaling)
    # issue 24: one GPU against two at the same tokens per step, for each ZeRO level given:
    # scaling WHICH... (e.g. 0.5b-fp8 1.5b-fp8 3b-fp8 7b-fp8); SCALING_LEVELS="1 3" by default,
    # "1a 3a" add --all-to-all-reduce
    for w in "$@"; do
      for run in 1 $(for z in ${SCALING_LEVELS:-1 3}; do echo "2:$z"; done); do
        gpus="${run%%:*}"; z="${run#*:}"; tag="$w 1gpu"; flags=""
        a2a=""; [ "${z%a}" != "$z" ] && { z="${z%a}"; a2a="--all-to-all-reduce"; }
        [ "$gpus" = 2 ] && { tag="$w 2gpu zero$z${a2a:+ a2a}"; flags="--zero-level $z $a2a ${SCALING_EXTRA:-}"; }
        rm -rf /tmp/bench
        BENCH_TOKENS="${BENCH_TOKENS:-524288}" BENCH_GPUS="$gpus" BENCH_EXTRA="$flags" bash .gpu/bench.sh "${LLMQ:-.gpu/llmq}" /tmp/bench "$w" > /dev/null 2>&1
        { echo "######## $tag"; cat /tmp/bench/bench.txt; } >> "$O/scaling.txt"
        for f in /tmp/bench/bench-*.log; do echo "######## $tag $f"; grep -E "^step|throughput|ranks|memory|error" "$f"; done >> "$O/scaling-logs.txt"
      done
    done
    ;;
  capped-ranks)
    # consumer-card emulation on several GPUs: capped-ranks GPUS SIZE MODEL ACCUM [llmq flags]
    # e.g. capped-ranks 2 24GiB qwen2.5-14b 16 --zero-level 3 --auto-memory
    gpus="$1"; shift
    nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 250 > /tmp/smi-ranks.txt & smi=$!
    bash "$0" capped "$@" --gpus "$gpus"
    kill $smi
    echo "driver-measured device memory peak over the GPUs: $(sort -n /tmp/smi-ranks.txt | tail -1) MiB" >> "$O/capped.txt"
    ;;
  launch)
    # one process per GPU under the launcher environment against the threaded run (same
    # losses expected): launch [llmq flags]
    common=(train --device cuda --model qwen2.5-0.5b --from-scratch --random-data --seq-len 1024 --batch-size 16
            --steps "${LAUNCH_STEPS:-10}" --eval-every 0 --print-every 1 --matmul-dtype e4m3 "$@")
    # shellcheck disable=SC2086 # LAUNCH_THREADS_EXTRA: words of flags
    .gpu/llmq "${common[@]}" --gpus 2 ${LAUNCH_THREADS_EXTRA:-} --log-file "$O/launch-threads.jsonl" > "$O/launch-threads.txt" 2>&1
    for r in 0 1; do
      log=(); [ "$r" = 0 ] && log=(--log-file "$O/launch-procs.jsonl")
      RANK=$r WORLD_SIZE=2 LOCAL_RANK=$r MASTER_ADDR=127.0.0.1 MASTER_PORT=29511 \
        .gpu/llmq "${common[@]}" "${log[@]}" > "$O/launch-rank$r.txt" 2>&1 &
    done
    wait
    ;;
  timeout-kill)
    # kill rank 1's process mid-run; rank 0 must exit non-zero within --collective-timeout,
    # naming rank 1 ("rank(s) 1 did not arrive", from the roll call)
    for r in 0 1; do
      RANK=$r WORLD_SIZE=2 LOCAL_RANK=$r MASTER_ADDR=127.0.0.1 MASTER_PORT=29512 \
        .gpu/llmq train --device cuda --model qwen2.5-0.5b --from-scratch --random-data --seq-len 1024 --batch-size 16 \
        --steps 100000 --eval-every 0 --print-every 1 --collective-timeout "${KILL_TIMEOUT:-60}" > "$O/kill-rank$r.txt" 2>&1 &
      pids[r]=$!
    done
    until grep -q "^step      5/" "$O/kill-rank0.txt" 2>/dev/null; do sleep 1; done
    kill -9 "${pids[1]}"; t0=$(date +%s)
    wait "${pids[0]}"; rc=$?
    echo "rank 1 killed; rank 0 exited with $rc after $(( $(date +%s) - t0 )) s (timeout ${KILL_TIMEOUT:-60} s)" >> "$O/kill.txt"
    tail -3 "$O/kill-rank0.txt" >> "$O/kill.txt"
    grep -q "rank(s) 1 did not arrive" "$O/kill-rank0.txt" && echo "rank 0 named rank 1" >> "$O/kill.txt" || echo "rank 0 did NOT name rank 1" >> "$O/kill.txt"
    ;;
  profile)
    .gpu/llmq train --device cuda --model qwen2.5-0.5b --from-scratch --random-data --seq-len 1024 --batch-size 16 \
      --steps 6 --warmup 1 --eval-every 0 --profile "$@" > "$O/profile.txt" 2>&1
    ;;
esac
