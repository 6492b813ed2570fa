#!/usr/bin/env bash
# GPU check of the tokenskip CUDA kernels in ONE device call (planned for under 4 minutes on an H200):
#   1. build libtokenskip_kernels.so for this GPU (its nvcc; the kernels' C entry points need no TensorRT),
#   2. tests/test_plugins_gpu.py (per-row k, NaN, both selection paths, in-place scatter, vs numpy),
#   3. compute-sanitizer memcheck + racecheck on small calls of every kernel (scripts/device_kernels_sanitize.py;
#      skipped when steps 1-2 took over 110 s, at most 50 s per tool),
#   4. the kernel benchmark: bf16, batch 1 and 8, H 576/4096/8192, S 1k..32k, CUDA graphs + events,
# writing logs and raw JSON under $OUT (default ./device-out). No install: a symlink tree gives Python the
# package layout of pyproject.toml. Run it with the device tool, e.g.
#   run(command="bash scripts/device_kernels.sh", timeout_s=400)
# and commit $OUT's bench_kernels_bf16.json + logs under docs/device-logs/.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/device-out}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
. scripts/package_shim.sh
T0=$SECONDS
step() { echo "== $1 ($((SECONDS - T0)) s)"; }

step environment
{ nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,memory.total --format=csv
  command -v nvcc && nvcc --version | tail -2
  "$PY" -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name(), torch.cuda.get_device_capability())"
  git log --oneline -1 2>/dev/null; } 2>&1 | tee "$OUT/env.log"

step "build the kernels"
ARCH=$("$PY" -c "import torch; a, b = torch.cuda.get_device_capability(); print(f'{a}{b}')")
LIB=$("$PY" -c "from tokenskip.plugins import build_library; print(build_library(arch='$ARCH', kernels_only=True, verbose=True))" 2>"$OUT/build.log")
RC_BUILD=$?
echo "library: $LIB (rc $RC_BUILD)" | tee -a "$OUT/build.log"
tail -5 "$OUT/build.log"

step "GPU tests"
"$PY" -m pytest tests/test_plugins_gpu.py -q -p no:cacheprovider --durations=5 --junitxml="$OUT/gpu_tests.xml" 2>&1 \
  | tee "$OUT/gpu_tests.log" | tail -25
RC_TESTS=${PIPESTATUS[0]}

step "compute-sanitizer"
RC_SAN=skipped
if command -v compute-sanitizer >/dev/null && [ $RC_BUILD -eq 0 ] && [ $((SECONDS - T0)) -lt 110 ]; then
  : >"$OUT/sanitizer.log"
  for tool in memcheck racecheck; do
    timeout 50 compute-sanitizer --tool $tool --error-exitcode 3 "$PY" scripts/device_kernels_sanitize.py "$LIB" \
      >>"$OUT/sanitizer.log" 2>&1
    rc=$?; echo "$tool rc $rc" | tee -a "$OUT/sanitizer.log"; RC_SAN="$RC_SAN $tool=$rc"
  done
  tail -6 "$OUT/sanitizer.log"
fi

step "kernel benchmark"
"$PY" -m tokenskip.plugins.bench_kernels --lib "$LIB" --json "$OUT/bench_kernels_bf16.json" 2>&1 | tee "$OUT/bench_kernels.log"
RC_BENCH=${PIPESTATUS[0]}

step done
printf '{"build": %s, "gpu_tests": %s, "sanitizer": "%s", "bench": %s, "seconds": %s}\n' \
  "$RC_BUILD" "$RC_TESTS" "${RC_SAN# }" "$RC_BENCH" "$((SECONDS - T0))" | tee "$OUT/summary.json"
rm -rf "$SHIM"
[ $RC_BUILD -eq 0 ] && [ $RC_TESTS -eq 0 ] && [ $RC_BENCH -eq 0 ]
