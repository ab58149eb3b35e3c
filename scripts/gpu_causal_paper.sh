#!/usr/bin/env bash
# The paper's budget with SmolLM2-135M-Instruct on one CUDA GPU (issue 18 item 7), written like
# the CPU profile (benchmarks/quality_causal.py): all 300 items per client (240 trained on, 60 as
# the validation slice), 20 rounds, 10 epochs per phase, batch 64, lr 3e-4, every test item (200
# per task), beam 4 / 80 new tokens, bf16. One seed; FedIT, FedDPA-T, FedDPA-F and Local.
#   bash scripts/gpu_causal_paper.sh            # needs `make setup` and a CUDA build of torch
# Results: benchmarks/results/quality-causal-gpu.{json,md}. CI never runs this.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
"$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA device: this script is for a GPU machine')"
start=$(date +%s)
cd benchmarks
"../$PY" quality_causal.py --seeds 0 --work ../runs/quality-causal-gpu --out results \
  --name quality-causal-gpu --test-per-task 200 \
  --set model.device=cuda --set model.dtype=bfloat16 --set model.max_length=256 \
  --set data.max_train_per_client=null --set data.validation_fraction=0.2 \
  --set federation.rounds=20 --set train.epochs=10 --set train.local_epochs=10 \
  --set train.finetune_epochs=10 --set train.batch_size=64 --set train.micro_batch_size=64 \
  --set train.lr=0.0003 --set eval.num_beams=4 --set eval.max_new_tokens=80 \
  --set eval.batch_size=64
echo "wall: $(( $(date +%s) - start )) s"
