"""`lowbit estimate`: peak training memory per device, broken down, from a model config alone.

    lowbit estimate --model .cache/models/gemma-3-270m --seq 512 --batch 4
    lowbit estimate --model llama-65b --seq 512 --batch 1 --method qlora --optimizer paged_adamw_8bit
    lowbit estimate --model llama-3-70b --world-size 8 --zero-stage 3 --method full --json
    lowbit estimate --model qwen3-30b-a3b --seq 1024      # MoE: all experts resident, top-k active per token
"""
from __future__ import annotations

import argparse
import json
import sys

from lowbit.errors import LowbitError
from lowbit.estimate.memory import (
    CONFIG_PRESETS,
    DTYPE_BYTES,
    METHODS,
    OPTIMIZERS,
    PRESETS,
    ModelShape,
    Setup,
    estimate,
    report,
)


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="lowbit estimate", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True,
                    help=f"HF model folder, config.json, or a preset: {', '.join([*PRESETS, *CONFIG_PRESETS])}")
    ap.add_argument("--seq", type=int, default=512, help="tokens per sequence")
    ap.add_argument("--batch", type=int, default=1, help="sequences per device per micro-step")
    ap.add_argument("--method", choices=METHODS, default="qlora")
    ap.add_argument("--optimizer", choices=OPTIMIZERS, default="adamw_torch")
    ap.add_argument("--gradient-checkpointing", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--world-size", type=int, default=1)
    ap.add_argument("--zero-stage", type=int, choices=(0, 1, 2, 3), default=0,
                    help="0 = DDP; 1/2/3 = DeepSpeed ZeRO stage (3 also stands for FSDP full sharding)")
    ap.add_argument("--offload", choices=("none", "optimizer", "optimizer+params"), default="none")
    ap.add_argument("--lora-r", type=int, default=16)
    ap.add_argument("--lora-dropout", type=float, default=0.0)
    ap.add_argument("--target-modules", default=None, help="comma-separated; default: all linear layers")
    ap.add_argument("--compute-dtype", choices=tuple(DTYPE_BYTES), default="bfloat16")
    ap.add_argument("--adapter-dtype", choices=tuple(DTYPE_BYTES), default="float32",
                    help="LoRA weight dtype (lowbit trains them in float32)")
    ap.add_argument("--experts-lora", action=argparse.BooleanOptionalAction, default=True,
                    help="MoE models: LoRA on the experts too (needs --lora-dropout 0)")
    ap.add_argument("--loss-chunk-tokens", type=int, default=256)
    ap.add_argument("--runtime-gib", type=float, default=0.0,
                    help="per-process baseline to add (CUDA context + allocator, or the CPU runtime)")
    ap.add_argument("--json", action="store_true", help="print the breakdown as JSON (bytes)")
    return ap


def main(argv: list[str] | None = None) -> int:
    a = _parser().parse_args(argv)
    try:
        shape = ModelShape.load(a.model)
        kw = {} if a.target_modules is None else {"target_modules": [t.strip() for t in a.target_modules.split(",")]}
        s = Setup(seq=a.seq, batch=a.batch, method=a.method, optimizer=a.optimizer,
                  gradient_checkpointing=a.gradient_checkpointing, world_size=a.world_size, zero_stage=a.zero_stage,
                  offload=a.offload, lora_r=a.lora_r, lora_dropout=a.lora_dropout, compute_dtype=a.compute_dtype,
                  adapter_dtype=a.adapter_dtype, experts_lora=a.experts_lora,
                  loss_chunk_tokens=a.loss_chunk_tokens, runtime_bytes=int(a.runtime_gib * 2**30), **kw)
        if a.json:
            print(json.dumps(estimate(shape, s), indent=2))
        else:
            print(report(shape, s, a.model))
    except LowbitError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
