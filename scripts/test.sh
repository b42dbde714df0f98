#!/usr/bin/env bash
# The test command: set up .venv, fetch the demo model/corpus for the few real-model tests,
# lint (ruff), compile-check the CUDA kernels with nvcc (when installed), run the whole suite
# (the layer/import-cycle contract is a test: tests/test_architecture.py).
#   bash scripts/test.sh            # everything, slow tests included (what CI runs)
#   bash scripts/test.sh -m "not slow"   # extra args go to pytest
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
.venv/bin/ruff check lowbit tests scripts train.py
.venv/bin/python scripts/prepare_model.py
.venv/bin/python scripts/prepare_model.py --model smollm2-135m
.venv/bin/python scripts/prepare_data.py
if command -v nvcc >/dev/null 2>&1; then
  bash scripts/check_cuda_compile.sh
else
  echo "nvcc not found: skipping the CUDA compile check"
fi
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-$HOME/.cache/lowbit/torch_extensions}"
exec .venv/bin/python -m pytest -q -p no:cacheprovider --durations=15 "$@"
