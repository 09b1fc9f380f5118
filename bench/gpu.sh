#!/usr/bin/env bash
# One short run on a lent GPU machine: model benchmarks (eager and compiled, bf16 autocast, SDPA picks
# flash attention) with MFU against the GPU's dense bf16 peak, then the strategy benchmark in bf16 with
# engine.compile on. Usage: bench/gpu.sh [PEAK_TFLOPS]   (default 989: H100/H200 SXM dense bf16)
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PEAK="${1:-989}"
NGPU="$(python -c 'import torch; print(torch.cuda.device_count())')"
[ "$NGPU" -ge 1 ] || { echo "bench/gpu.sh: no CUDA device visible" >&2; exit 2; }
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
python bench/bench_models.py --device cuda --bf16 --compile --skip-memory --threads 0 --peak-tflops "$PEAK" \
    --json "${OUT:-.}/bench_models_gpu.json"
python bench/bench_strategies.py --nproc "$NGPU" --precision bf16 --compile --width 1024 --depth 8 \
    --tokens 2048 --batch 8 --steps 8 --strategies ddp,zero2,zero3,fsdp2
