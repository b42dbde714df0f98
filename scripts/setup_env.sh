#!/usr/bin/env bash
# Create/refresh .venv in the repo root with everything lowbit needs (idempotent).
# torch is pinned to the CPU build first so no dependency can pull a multi-GB CUDA torch;
# on a GPU machine, install your CUDA torch into .venv before running this and it is kept.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip >/dev/null
if ! .venv/bin/python -c "import torch" >/dev/null 2>&1; then
  .venv/bin/python -m pip install -q "torch==2.13.0"
fi
.venv/bin/python -m pip install -q -e ".[dev,demo,deepspeed]"
.venv/bin/python -c "import torch, transformers, peft, bitsandbytes, lowbit; print('lowbit env ready: torch', torch.__version__, 'transformers', transformers.__version__)" 2>&1 | grep -v kernels-community
