"""`lowbit generate --config FILE [key=value ...]`: self-generated data for data-free QAT."""
from __future__ import annotations

import argparse
import json
import sys

from lowbit.errors import LowbitError
from lowbit.methods.data_gen.config import load_generate_config
from lowbit.methods.data_gen.runner import run


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="lowbit generate",
                                 description="Generate training sequences from a teacher model (LLM-QAT data)")
    ap.add_argument("--config", required=True, help="YAML config (see configs/llm_qat/)")
    ap.add_argument("overrides", nargs="*", help="key=value overrides, e.g. generate.num_sequences=64 output.dir=x")
    a = ap.parse_args(argv)
    try:
        summary = run(load_generate_config(a.config, a.overrides))
    except LowbitError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(summary))
    return 0
