"""`train.py` / `lowbit train`: --config FILE [key=value ...]."""
from __future__ import annotations

import argparse
import sys

from ..errors import LowbitError


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="lowbit train", description="QLoRA fine-tune from a YAML config")
    ap.add_argument("--config", required=True, help="YAML config (see configs/)")
    ap.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.max_steps=10 lora.r=8")
    a = ap.parse_args(argv)
    try:
        from .config import load_config
        from .trainer import run
        run(load_config(a.config, a.overrides))
    except LowbitError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0
