#!/usr/bin/env bash
# One command for a person with a GPU: the speed table, an op-level profile, the solver table and
# the test suite on that accelerator, in at most 8 minutes (the limits below sum to 460 s), each
# part with its own time limit so that one slow part cannot hide the others.  Every benchmark
# streams its rows and writes partial JSON, so a part cut off by its limit still reports what it
# measured; the tests print one line per test as it finishes, for the same reason.
#
#     bash benchmarks/gpu_check.sh [OUT_DIR]          # default results/gpu_check
#
# Needs the test extra (pip install -e ".[test]"); the peers are optional ([peers]).  PYTHON
# names the interpreter (default: python, else python3).  With pytest-xdist installed the
# tests run on up to 12 workers, each taking GPU memory as it needs it; the files whose
# expectations depend on the backend run first, so a cut-off run still checks them.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${1:-results/gpu_check}"
py="${PYTHON:-$(command -v python || command -v python3)}"
mkdir -p "$out"
"$py" -c "import jax; print('backend:', jax.default_backend(), jax.devices(), 'jax', jax.__version__)" \
  | tee "$out/device.txt"

echo "== speed (paper MLP, quick; every method side by side) =="
timeout 150 "$py" -m benchmarks.speed --quick --workloads paper --no-progress --out "$out" \
  2>&1 | tee "$out/speed.txt"

echo "== profile (per-op device time of rngd and the fast configurations) =="
timeout 60 "$py" -m benchmarks.profile --chunks 2 --top 12 --out "$out" \
  --keep "$out/traces" 2>&1 | tee "$out/profile.txt"

echo "== step time: the refresh in a conditional, and decided outside it (refresh=True/False) =="
timeout 30 "$py" -m benchmarks.step_time --reps 10 --out "$out" \
  --methods adam,rngd,rngd:host,rngd_white_k10,rngd_white_k10:host 2>&1 | tee "$out/step_time.txt"

echo "== block solvers =="
timeout 45 "$py" -m benchmarks.solvers --shapes 64x65,1x785,512x513,1x2049 --repeats 5 \
  --rounds 3 --out "$out" 2>&1 | tee "$out/solvers.txt"

echo "== test suite: the backend-sensitive files first, then the rest =="
workers=()
if "$py" -c "import xdist" 2>/dev/null; then
  n=$(( $(nproc) < 12 ? $(nproc) : 12 ))
  workers=(-n "$n")
fi
# What depends on the backend: precision and rounding (dtypes, transform), the solvers and
# eigh (solvers, estimators), sharding, the fresh-process checkpoint (ecosystem).
first=(tests/test_dtypes.py tests/test_transform.py tests/test_solvers.py
       tests/test_estimators.py tests/test_sharding.py tests/test_ecosystem.py)
rest=()
for f in "${first[@]}"; do rest+=(--ignore="$f"); done
XLA_PYTHON_CLIENT_PREALLOCATE=false timeout 80 "$py" -m pytest -rfE -p no:cacheprovider \
  "${workers[@]}" -o console_output_style=classic -v "${first[@]}" 2>&1 \
  | tee "$out/tests_backend.txt" | tail -25
XLA_PYTHON_CLIENT_PREALLOCATE=false timeout 95 "$py" -m pytest -rfE -p no:cacheprovider \
  "${workers[@]}" -o console_output_style=classic -v "${rest[@]}" 2>&1 \
  | tee "$out/tests.txt" | tail -25
echo "wrote $out/"
