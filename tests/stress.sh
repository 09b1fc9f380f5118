#!/usr/bin/env bash
# Flake check: run multi-process test files N times in a row; stop at the first failure.
#
#   tests/stress.sh [N] [pytest args...]      (default: 30 runs of the two-process train DDP tests)
#   tests/stress.sh 30 tests/test_train_ddp.py -k one_vs_two
#   tests/stress.sh 10 tests/test_train_ddp.py tests/test_loader_distributed.py tests/test_fault.py
#
# Shards are preprocessed once (SHAPEFLOW_TEST_SHARDS) instead of once per run. Each run's output is
# kept in $STRESS_DIR/run-<i>.log (default /tmp/shapeflow-stress); the last line says how many passed.
set -u
N=${1:-30}
shift || true
[ $# -gt 0 ] || set -- tests/test_train_ddp.py -k one_vs_two
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
OUT=${STRESS_DIR:-/tmp/shapeflow-stress}
mkdir -p "$OUT"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
if [ -z "${SHAPEFLOW_TEST_SHARDS:-}" ]; then
    export SHAPEFLOW_TEST_SHARDS="$OUT/shards"
    [ -f "$SHAPEFLOW_TEST_SHARDS/manifest.json" ] || python -c "
import sys; sys.path.insert(0, 'tests')
from pathlib import Path
from train_fixtures import build_train_shards
build_train_shards(Path('$SHAPEFLOW_TEST_SHARDS'))" > "$OUT/shards.log" 2>&1 || { cat "$OUT/shards.log"; exit 2; }
fi
passed=0
start=$(date +%s)
for i in $(seq 1 "$N"); do
    t0=$(date +%s)
    if python -m pytest -q -x -p no:cacheprovider "$@" > "$OUT/run-$i.log" 2>&1; then
        passed=$((passed + 1))
        echo "run $i/$N passed ($(( $(date +%s) - t0 ))s): $(tail -n 1 "$OUT/run-$i.log")"
    else
        echo "run $i/$N FAILED ($(( $(date +%s) - t0 ))s); output in $OUT/run-$i.log:"
        tail -n 60 "$OUT/run-$i.log"
        echo "stress: $passed of $N runs passed before the first failure ($(( $(date +%s) - start ))s): $*"
        exit 1
    fi
done
echo "stress: $passed of $N runs passed in a row ($(( $(date +%s) - start ))s): $*"
