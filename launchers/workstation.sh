#!/usr/bin/env bash
# `shapeflow train` on one machine: one process per GPU, or CPU processes where there is none.
#
#   launchers/workstation.sh [options] CONFIG [key=value ...]
#
# Options:
#   -n, --nproc N          processes (default: the GPUs torch sees; 1 without a GPU)
#   -a, --accelerate CFG   start through `accelerate launch --config_file CFG`: a file or a
#                          name in configs/accelerate/ (single_gpu, multi_gpu_ddp, zero1,
#                          zero2, zero2_offload, zero3, fsdp2); default: torchrun
#   -p, --port PORT        rendezvous port (default 0: a free port)
#       --dry-run          print the command instead of running it
#   -h, --help
#
# Without --accelerate: 1 process runs `python -m trainer.commands train` directly, N > 1 runs
# `torchrun --standalone --nproc-per-node N`. On a machine without a GPU the processes run on
# CPU over gloo (the engine picks the backend), with the cores split between them.
# The strategy (ddp, deepspeed, fsdp2) is the training config's `engine.*` keys or the
# accelerate config's choice. Run from the repository root.
#
# Environment: SHAPEFLOW_PYTHON (default: python, else python3), OMP_NUM_THREADS (default:
# CPU cores / processes on a CPU-only machine, 1 per process with GPUs), MLFLOW_TRACKING_URI
# (default: sqlite in run.dir).
set -euo pipefail

usage() { sed -n '2,23p' "$0" | sed 's/^# \{0,1\}//'; }
die() { echo "workstation.sh: error: $*" >&2; exit 2; }

NPROC=""
ACCEL=""
PORT=0
DRY_RUN=0
while [[ $# -gt 0 ]]; do
  case $1 in
    -n|--nproc) NPROC=${2:?}; shift 2 ;;
    -a|--accelerate) ACCEL=${2:?}; shift 2 ;;
    -p|--port) PORT=${2:?}; shift 2 ;;
    --dry-run) DRY_RUN=1; shift ;;
    -h|--help) usage; exit 0 ;;
    --) shift; break ;;
    -*) die "unknown option $1 (see --help)" ;;
    *) break ;;
  esac
done
[[ $# -ge 1 ]] || { usage >&2; exit 2; }
PYTHON=${SHAPEFLOW_PYTHON:-$(command -v python || command -v python3 || echo python3)}

# GPUs torch sees (honours CUDA_VISIBLE_DEVICES); no torch import where no GPU device exists.
GPUS=0
if compgen -G '/dev/nvidia[0-9]*' >/dev/null || [[ -e /dev/kfd ]]; then
  GPUS=$("$PYTHON" -c 'import torch; print(torch.cuda.device_count() if torch.cuda.is_available() else 0)' 2>/dev/null || echo 0)
fi
NPROC=${NPROC:-$((GPUS > 0 ? GPUS : 1))}
[[ $NPROC =~ ^[1-9][0-9]*$ ]] || die "--nproc must be a positive integer, got '$NPROC'"
if [[ $GPUS -eq 0 ]]; then
  cores=$(nproc 2>/dev/null || echo 1)
  threads=$((cores / NPROC))
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$((threads > 0 ? threads : 1))}
  device="CPU ($cores cores)"
else
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
  device="$GPUS GPU(s)"
fi

train=(-m trainer.commands train "$@")
if [[ -n $ACCEL ]]; then
  config=$ACCEL
  [[ -f $config ]] || config=configs/accelerate/${ACCEL%.yaml}.yaml
  [[ -f $config ]] || die "accelerate config '$ACCEL' not found (nor $config)"
  cmd=("$PYTHON" -m accelerate.commands.launch --config_file "$config"
    --num_processes "$NPROC" --main_process_port "$PORT" "${train[@]}")
elif [[ $NPROC -eq 1 ]]; then
  cmd=("$PYTHON" "${train[@]}")
else
  cmd=("$PYTHON" -m torch.distributed.run --nproc-per-node "$NPROC" --max-restarts 0)
  if [[ $PORT -eq 0 ]]; then cmd+=(--standalone)  # a private rendezvous on a free port
  else cmd+=(--master-addr 127.0.0.1 --master-port "$PORT"); fi
  cmd+=("${train[@]}")
fi

echo "workstation.sh: $NPROC process(es) on $device, OMP_NUM_THREADS=$OMP_NUM_THREADS: ${cmd[*]}" >&2
[[ $DRY_RUN -eq 1 ]] && exit 0
exec "${cmd[@]}"
