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
# It runs every executable in .gpu/bin (single-threaded test harness, output not captured) and
# writes one log per executable plus summary.txt to $OUT (or .gpu/logs without $OUT). It needs
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
# Runs every test executable in .gpu/bin; logs to $OUT (or .gpu/logs). Made by scripts/gpu-test.sh.
cd "$(dirname "${BASH_SOURCE[0]}")/.."
LOGS="${OUT:-.gpu/logs}"
mkdir -p "$LOGS"
# CUDA libraries: the toolkit's and those of the pip wheels (torch's nvidia-* packages)
EXTRA="$(python3 -c 'import nvidia, os, glob; print(":".join(sorted(set(os.path.dirname(p) for d in nvidia.__path__ for p in glob.glob(os.path.join(d, "*", "lib", "lib*.so*"))))))' 2>/dev/null || true)"
export LD_LIBRARY_PATH="/usr/local/cuda/lib64:/usr/local/cuda/lib:${EXTRA}:${LD_LIBRARY_PATH:-}"
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export RUST_BACKTRACE=1
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm --format=csv,noheader 2>&1 | tee "$LOGS/gpu.txt"
: >"$LOGS/summary.txt"
status=0
for exe in .gpu/bin/*; do
  [[ -x "$exe" ]] || continue
  name="$(basename "$exe")"
  start=$(date +%s.%N)
  timeout "${GPU_TEST_TIMEOUT:-480}" "$exe" --test-threads=1 --nocapture ${GPU_TEST_FILTER:-} >"$LOGS/$name.log" 2>&1
  rc=$?
  end=$(date +%s.%N)
  line="$(grep -E '^test result:' "$LOGS/$name.log" | tail -n1)"
  printf '%-28s rc=%d %6.1fs %s\n' "$name" "$rc" "$(awk "BEGIN{print $end - $start}")" "$line" | tee -a "$LOGS/summary.txt"
  if [[ $rc -ne 0 ]]; then
    status=1
    grep -E "panicked|FAILED|failed|error" "$LOGS/$name.log" | head -n 20 | tee -a "$LOGS/summary.txt"
  fi
done
exit $status
EOF
chmod +x .gpu/run.sh
du -sh .gpu
echo "run on the device with: carry [\".gpu\"], command: bash .gpu/run.sh"
