#!/usr/bin/env bash
# Builds the GPU test executables here (no GPU needed) and stages them with a runner in .gpu/,
# for running on a machine with an NVIDIA GPU that has no Rust toolchain.
#
#   scripts/gpu-test.sh                      # tests of llmq-cuda
#   scripts/gpu-test.sh -p llmq-cli --test gpu_model   # other cargo test selections (repeatable:
#                                            # every run of the script adds to .gpu/bin; use
#                                            # GPU_TEST_CLEAN=1 to start from an empty .gpu/bin)
#
# On the device machine (the `run` tool of this workplace): carry [".gpu"] and run
#   bash .gpu/run.sh
# It runs every test of every executable in .gpu/bin, one process per test (output not captured), and
# writes one log per executable plus summary.txt to $OUT (or .gpu/logs without $OUT); with
# GPU_SANITIZE="<executable> [test filters]" it also runs compute-sanitizer's memcheck. It needs
# libcuda and libcublasLt: LD_LIBRARY_PATH gets /usr/local/cuda/lib64 and the pip nvidia wheels.
#
# The kernels are compiled by llmq-cuda's build.rs with nvcc; scripts/install-nvcc.sh installs a
# pinned nvcc into .cuda-toolchain/ first if none is found.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

if ! command -v nvcc >/dev/null 2>&1 && [[ -z "${CUDA_HOME:-}" ]]; then
  bash scripts/install-nvcc.sh >/dev/null
fi

ARGS=("$@")
if [[ ${#ARGS[@]} -eq 0 ]]; then
  ARGS=(-p llmq-cuda)
fi

mkdir -p .gpu/bin
if [[ "${GPU_TEST_CLEAN:-0}" == 1 ]]; then
  rm -f .gpu/bin/*
fi

# Build (cargo's human-readable output to stderr), collect the test executables from the JSON.
JSON="$(mktemp)"
cargo test --release "${ARGS[@]}" --no-run --message-format=json-render-diagnostics >"$JSON"
python3 - "$JSON" <<'EOF' >"$JSON.list"
import json, sys
for line in open(sys.argv[1]):
    try:
        m = json.loads(line)
    except ValueError:
        continue
    if m.get("reason") == "compiler-artifact" and m.get("profile", {}).get("test") and m.get("executable"):
        print(m["executable"])
EOF
while read -r exe; do
  name="$(basename "$exe")"
  name="${name%-*}"          # drop cargo's hash suffix
  cp "$exe" ".gpu/bin/$name"
  strip --strip-debug ".gpu/bin/$name" 2>/dev/null || true
  echo "staged .gpu/bin/$name"
done <"$JSON.list"
rm -f "$JSON" "$JSON.list"

cat >.gpu/run.sh <<'EOF'
#!/usr/bin/env bash
# Runs every test executable in .gpu/bin, each test in its own process (a CUDA fault poisons the
# process's context, so isolation keeps one bad kernel from failing every later test).
# Logs to $OUT (or .gpu/logs). Made by scripts/gpu-test.sh.
cd "$(dirname "${BASH_SOURCE[0]}")/.."
LOGS="${OUT:-.gpu/logs}"
mkdir -p "$LOGS"
# CUDA libraries: the toolkit's and those of the pip wheels (torch's nvidia-* packages)
EXTRA="$(python3 -c 'import nvidia, os, glob; print(":".join(sorted(set(os.path.dirname(p) for d in nvidia.__path__ for p in glob.glob(os.path.join(d, "*", "lib", "lib*.so*"))))))' 2>/dev/null || true)"
export LD_LIBRARY_PATH="/usr/local/cuda/lib64:/usr/local/cuda/lib:${EXTRA}:${LD_LIBRARY_PATH:-}"
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export RUST_BACKTRACE=1
# a GPU test that cannot run here (no device, no kernels) fails instead of printing SKIPPED
export LLMQ_REQUIRE_GPU=1
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm --format=csv,noheader 2>&1 | tee "$LOGS/gpu.txt"
: >"$LOGS/summary.txt"
status=0
total_pass=0
total_fail=0
for exe in .gpu/bin/*; do
  [[ -x "$exe" ]] || continue
  name="$(basename "$exe")"
  log="$LOGS/$name.log"
  : >"$log"
  tests="$("$exe" --list --format terse 2>/dev/null | sed -n 's/: test$//p')"
  pass=0
  fail=0
  failed=""
  start=$(date +%s.%N)
  for t in $tests; do
    if [[ -n "${GPU_TEST_FILTER:-}" && "$t" != *"$GPU_TEST_FILTER"* ]]; then continue; fi
    echo "===== $t" >>"$log"
    timeout "${GPU_TEST_TIMEOUT:-300}" "$exe" --exact "$t" --test-threads=1 --nocapture >>"$log" 2>&1
    rc=$?
    if [[ $rc -eq 0 ]]; then pass=$((pass + 1)); else fail=$((fail + 1)); failed="$failed $t(rc=$rc)"; fi
  done
  end=$(date +%s.%N)
  printf '%-24s %3d passed, %3d failed  %6.1fs%s\n' "$name" "$pass" "$fail" "$(awk "BEGIN{print $end - $start}")" "${failed:+  failed:$failed}" | tee -a "$LOGS/summary.txt"
  total_pass=$((total_pass + pass))
  total_fail=$((total_fail + fail))
  [[ $fail -eq 0 ]] || status=1
done
# Optional memory checker pass: GPU_SANITIZE="<executable> [test name filters...]"
if [[ -n "${GPU_SANITIZE:-}" ]]; then
  set -- $GPU_SANITIZE
  exe=".gpu/bin/$1"; shift
  timeout "${GPU_SANITIZE_TIMEOUT:-240}" compute-sanitizer --tool memcheck --print-limit 20 "$exe" --test-threads=1 "$@" >"$LOGS/memcheck.log" 2>&1
  echo "compute-sanitizer memcheck rc=$?: $(grep -E 'ERROR SUMMARY|^test result' "$LOGS/memcheck.log" | tr '\n' ' ')" | tee -a "$LOGS/summary.txt"
fi
echo "$total_pass passed, $total_fail failed" | tee -a "$LOGS/summary.txt"
exit $status
EOF
chmod +x .gpu/run.sh
du -sh .gpu
echo "run on the device with: carry [\".gpu\"], command: bash .gpu/run.sh"
