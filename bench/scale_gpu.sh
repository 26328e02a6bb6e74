#!/usr/bin/env bash
# bench/scale.py on a GPU machine: layer-wise vs in-memory `come compress --device cuda`.
# Peak host RSS comes from wait4 as on CPU; peak GPU memory (torch.cuda.max_memory_allocated)
# is read from each run's come_plan.json. No RLIMIT_AS runs: CUDA reserves far more virtual
# address space than any cap below the weights. Extra arguments go to bench/scale.py, e.g.
#   bash bench/scale_gpu.sh --layers 60          # ~3B parameters
set -euo pipefail
cd "$(dirname "$0")/.."
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
python bench/scale.py --device cuda --dtype bfloat16 --nsamples 32 --seqlen 512 --cap-fraction 0 \
    --results bench/results/scale_gpu "$@"
