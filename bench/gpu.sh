#!/usr/bin/env bash
# On a GPU machine (under 5 minutes): MFU of a training step for the published VisualBERT and ViLBERT sizes, bf16,
# batches tiled from the embedded corpus. Goal: >= 40 % MFU for BERT-base-sized models on an H100/H200-class GPU.
set -euo pipefail
cd "$(dirname "$0")/.."
export WANDB_MODE=disabled
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
echo "| model | device | batch | params | positions | step | throughput | MFU |"
echo "|---|---|---|---|---|---|---|---|"
for model in visual_bert vilbert; do
  for batch in 64 128; do
    timeout 150 python bench/mfu.py --model "$model" --device cuda --precision bf16 --batch "$batch" --steps 20 --warmup 5
  done
done
