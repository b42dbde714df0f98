"""`lowbit merge ...` and `lowbit export --format ...`: bad input prints one `error: ...` line, exit 2."""
from __future__ import annotations

import argparse
import json
import sys

from lowbit.errors import LowbitError
from lowbit.export.formats import FORMATS, export, export_bnb4
from lowbit.export.gguf_writer import GGUF_TYPES
from lowbit.export.merge import merge


def _merge_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="lowbit merge", description="Merge LoRA adapters into the dequantized 4-bit "
                                 "base they were trained on → HF checkpoint (optionally requantized to NF4).")
    ap.add_argument("adapter", help="lowbit run folder (adapter/ + lowbit_run.json) or peft adapter folder")
    ap.add_argument("out", help="output folder")
    ap.add_argument("--base", help="base HF model folder (default: the one recorded at training time)")
    ap.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    ap.add_argument("--requantize", choices=("nf4", "fp4"), help="write a bitsandbytes 4-bit checkpoint instead")
    ap.add_argument("--blocksize", type=int, default=64)
    ap.add_argument("--no-double-quant", action="store_true")
    ap.add_argument("--overwrite", action="store_true", help="replace an existing output")
    ap.add_argument("--no-verify", action="store_true", help="skip reloading the output and comparing logits")
    return ap


def _export_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="lowbit export", description="Export an adapter (merged against its 4-bit "
                                 "base) or a dense model folder as peft / merged HF / bitsandbytes 4-bit / GGUF.")
    ap.add_argument("source", help="lowbit run folder, peft adapter folder, or (bnb4/gguf) a dense HF model folder")
    ap.add_argument("out", help="output folder (a .gguf file for --format gguf)")
    ap.add_argument("--format", required=True, choices=FORMATS)
    ap.add_argument("--gguf-type", default="F16", choices=GGUF_TYPES,
                    help="llama.cpp file type; per-tensor types follow llama-quantize's rules")
    ap.add_argument("--imatrix", help="gguf: llama-imatrix output (GGUF or .dat) weighing the k-quants' errors")
    ap.add_argument("--calibration", help="gguf: text file to compute the importance matrix from (as llama-imatrix)")
    ap.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"),
                    help="merged: output dtype")
    ap.add_argument("--base", help="base HF model folder (default: the one recorded at training time)")
    ap.add_argument("--overwrite", action="store_true", help="replace an existing output")
    ap.add_argument("--no-verify", action="store_true", help="skip loading the output back")
    return ap


def _print_report(rep: dict) -> None:
    print(json.dumps({k: v for k, v in rep.items() if k != "per_layer"}, indent=2, default=str))


def merge_main(argv: list[str]) -> int:
    a = _merge_parser().parse_args(argv)
    if a.requantize:
        rep = export_bnb4(a.adapter, a.out, base=a.base, overwrite=a.overwrite, verify=not a.no_verify,
                          quant_type=a.requantize, blocksize=a.blocksize, double_quant=not a.no_double_quant)
    else:
        rep = merge(a.adapter, a.out, base=a.base, dtype=a.dtype, overwrite=a.overwrite, verify=not a.no_verify)
    _print_report(rep)
    return 0


def export_main(argv: list[str]) -> int:
    a = _export_parser().parse_args(argv)
    rep = export(a.source, a.out, a.format, base=a.base, gguf_type=a.gguf_type, dtype=a.dtype,
                 overwrite=a.overwrite, verify=not a.no_verify, imatrix=a.imatrix, calibration=a.calibration)
    _print_report(rep)
    return 0


def main(argv: list[str] | None = None) -> int:
    """argv starts with the subcommand: ['merge', ...] or ['export', ...]."""
    argv = sys.argv[1:] if argv is None else list(argv)
    cmds = {"merge": merge_main, "export": export_main}
    if not argv or argv[0] not in cmds:
        print("usage: lowbit {merge,export} ...", file=sys.stderr)
        return 2
    try:
        return cmds[argv[0]](argv[1:])
    except (LowbitError, FileExistsError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
