#!/usr/bin/env bash
# On a machine with a CUDA GPU (and a CUDA torch in .venv): build lowbit's CUDA extension (or fall back to
# bitsandbytes' kernels, saying so), check every op against the reference and bitsandbytes, time the kernels,
# and run the QLoRA step benchmark vs transformers+bitsandbytes+peft. Results: outputs/gpu_check.json,
# outputs/bench/train.json, and a table on stdout.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-$HOME/.cache/lowbit/torch_extensions}"
.venv/bin/python scripts/prepare_model.py
.venv/bin/python scripts/prepare_data.py
# Build lowbit's CUDA extension first, through the same build path and cache directory that
# gpu_check.py then loads it from (for this GPU's arch), so a build error shows the compiler's
# message, not only load()'s one-line warning; gpu_check.py then reports the fallback it used.
if command -v nvcc >/dev/null 2>&1; then
  LOWBIT_CUDA_PYTHON=.venv/bin/python bash scripts/check_cuda_binding.sh ||
    echo "lowbit's CUDA extension did not build (above): gpu_check.py runs on the fallback backend"
else
  echo "nvcc not found: lowbit's CUDA extension cannot be built; gpu_check.py uses bitsandbytes' kernels"
fi
.venv/bin/python scripts/gpu_check.py
LOWBIT_CUDA_BACKEND=bitsandbytes .venv/bin/python scripts/gpu_check.py outputs/gpu_check_bnb_backend.json
.venv/bin/python scripts/benchmark_train.py --out outputs/bench/train_gpu.json
