#!/usr/bin/env bash
# Stop the test cluster started by start_cluster.sh (slurmctld and both slurmd).
#
#   tests/slurm/stop_cluster.sh [STATE_DIR] [--purge]   # --purge also deletes STATE_DIR
#
# munged is left running (it is a machine-wide service other tools may use).
set -euo pipefail

STATE_DIR=/tmp/shapeflow-slurm
PURGE=0
for arg in "$@"; do
  case $arg in
    --purge) PURGE=1 ;;
    *) STATE_DIR=$arg ;;
  esac
done

stop_pidfile() {
  local file=$1 pid
  [[ -s $file ]] || return 0
  pid=$(cat "$file")
  if kill -0 "$pid" 2>/dev/null; then
    echo "stop_cluster: stopping $(basename "$file" .pid) (pid $pid)" >&2
    kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -0 "$pid" 2>/dev/null && kill -KILL "$pid" 2>/dev/null || true
  fi
  rm -f "$file"
}

for file in "$STATE_DIR"/slurmd-*.pid "$STATE_DIR/slurmctld.pid"; do
  [[ -e $file ]] && stop_pidfile "$file"
done
if [[ $PURGE -eq 1 ]]; then rm -rf "$STATE_DIR"; fi
exit 0
