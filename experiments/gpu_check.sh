#!/usr/bin/env bash
# The GPU check (`make gpu-check`): on one CUDA GPU (sized for under 8 minutes on an H100/H200-class
# card; not yet run on one: no GPU was lent to the session that wrote it),
#   1. the gpu test tier (CUDA sampling, kernels on the device, offload on CUDA);
#   2. the paper-setting benchmark: a full-size random SD3-Medium (no download) pruned with
#      OBS-Diff, 100 prompts x 25 steps x 512 x 512, float16, 4 packages, printing calibration and
#      solve time and the peak GPU memory beside the paper's 14.95 min / 24 GB (RTX 4090) and the
#      memory plan's prediction;
#   3. the speed benchmark's block (the paper's Table 5 setting, 2:4 on the sparse kernels) and toy,
#      and the block quantized by every scheme the GPU runs (int8, float8 from 8.9, int4, 2:4 then
#      int8 dynamic);
#   4. with two or more GPUs, the sharded solve's seconds on 1 vs 2 GPUs (NCCL,
#      experiments/bench_sharded_solve.py: 8 full-width SD3-Medium blocks).
# It needs the environment (`make install`) and CUDA; it downloads nothing. Not part of CI.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PY:-.venv/bin/python}"
export HF_HUB_OFFLINE=1 WANDB_MODE=disabled

if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "gpu-check: no CUDA device here; nothing to check" >&2
    exit 1
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true

start=$SECONDS
"$PY" -m pytest -m gpu -q -p no:cacheprovider
echo "gpu-check: gpu tier in $((SECONDS - start)) s"

start=$SECONDS
"$PY" experiments/bench_prune.py sd3-medium --prompts 100 --steps 25 --resolution 512 \
    --t5-tokens 256 --batch-size 4 --packages 4 --dtype float16 --device cuda
echo "gpu-check: paper-setting benchmark in $((SECONDS - start)) s"

start=$SECONDS
"$PY" experiments/bench_speed.py --parts block quantized toy --repeats 10
echo "gpu-check: speed benchmark (block: 2:4 on sparse kernels, quantized; toy) in $((SECONDS - start)) s"

gpus=$("$PY" -c "import torch; print(torch.cuda.device_count())")
if [ "$gpus" -ge 2 ]; then
    start=$SECONDS
    "$PY" experiments/bench_sharded_solve.py --device cuda --blocks 8 --repeats 3
    echo "gpu-check: 2-GPU sharded solve in $((SECONDS - start)) s"
else
    echo "gpu-check: one GPU; the 2-process solve ratio needs two (not measured)"
fi
