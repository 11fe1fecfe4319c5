#!/usr/bin/env bash
# The paper's main MobileNet run (benchmarks/paper_run.py) with each engine on one GPU: wall time, seconds per round,
# personalisation seconds and peak GPU memory. Goal for the batched engine on an H100/H200: the whole run <= 30 s.
#   bash benchmarks/gpu_paper_run.sh            # full runs (the sequential one takes minutes)
#   ROUNDS=32 bash benchmarks/gpu_paper_run.sh  # shorter
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS="${ROUNDS:-320}"
python -c "import torch; assert torch.cuda.is_available(), 'needs a GPU'; print(torch.cuda.get_device_name())"
for engine in batched inprocess; do
    python benchmarks/paper_run.py --backend "$engine" --rounds "$ROUNDS" | tail -1
done
python benchmarks/paper_run.py --backend inprocess --rounds "$ROUNDS" --memory-format channels_last | tail -1
python benchmarks/paper_run.py --backend batched --rounds "$ROUNDS" --precision bf16-mixed | tail -1
python benchmarks/paper_run.py --backend batched --rounds "$ROUNDS" --compile reduce-overhead | tail -1
python benchmarks/paper_run.py --backend batched --rounds "$ROUNDS" --compile reduce-overhead --precision bf16-mixed | tail -1
python benchmarks/engine.py --clients 10 100 --rounds 5 --epochs 1 --engines sequential channels_last batched compiled floor
