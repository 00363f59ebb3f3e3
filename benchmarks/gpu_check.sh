#!/usr/bin/env bash
# One command for a person with a GPU: the speed table, an op-level profile, the solver table and
# the test suite on that accelerator, in at most 8 minutes (the limits below sum to 480 s), each
# part with its own time limit so that one slow part cannot hide the others. Every benchmark streams its rows and writes partial JSON, so a part
# cut off by its limit still reports what it measured.
#
#     bash benchmarks/gpu_check.sh [OUT_DIR]          # default results/gpu_check
#
# Needs the test extra (pip install -e ".[test]"); the peers are optional ([peers]).
set -uo pipefail
cd "$(dirname "$0")/.."
out="${1:-results/gpu_check}"
mkdir -p "$out"
python -c "import jax; print('backend:', jax.default_backend(), jax.devices())" | tee "$out/device.txt"

echo "== speed (paper MLP, quick; every method side by side) =="
timeout 150 python -m benchmarks.speed --quick --workloads paper --no-progress --out "$out" \
  2>&1 | tee "$out/speed.txt"

echo "== profile (per-op time of rngd and the fast configurations) =="
timeout 60 python -m benchmarks.profile --chunks 2 --top 12 --out "$out" \
  2>&1 | tee "$out/profile.txt"

echo "== block solvers =="
timeout 45 python -m benchmarks.solvers --shapes 64x65,1x785,512x513,1x2049 --repeats 5 \
  --rounds 3 --out "$out" 2>&1 | tee "$out/solvers.txt"

echo "== conv statistics memory =="
timeout 30 python -m benchmarks.conv_memory --out "$out" 2>&1 | tee "$out/conv_memory.txt"

echo "== test suite =="
timeout 195 python -m pytest -q -x -p no:cacheprovider 2>&1 | tail -30 | tee "$out/tests.txt"
echo "wrote $out/"
