"""`train.py` / `lowbit train`: --config FILE [key=value ...]."""
from __future__ import annotations

import argparse
import sys

from lowbit.errors import LowbitError
from lowbit.recipes.config import load_config
from lowbit.recipes.phases import run


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="lowbit train", description="QLoRA fine-tune from a YAML config")
    ap.add_argument("--config", required=True, help="YAML config (see configs/)")
    ap.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.max_steps=10 lora.r=8")
    a = ap.parse_args(argv)
    try:
        run(load_config(a.config, a.overrides))
    except LowbitError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    _shutdown_distributed()  # only after success: a barrier behind a failed rank would hang the others
    return 0


def _shutdown_distributed() -> None:
    """Tear the process group down before the interpreter does: left to exit, a gloo/DeepSpeed
    worker thread was destroyed while joinable and aborted one rank ("terminate called without an
    active exception", SIGABRT after a finished ZeRO-3 run)."""
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized():
        try:
            dist.barrier()
        finally:
            dist.destroy_process_group()
