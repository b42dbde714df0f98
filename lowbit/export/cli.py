"""`lowbit merge ...`, `lowbit export --format ...` and `lowbit eval-gguf FILE --text TEXT`: bad input prints one
`error: ...` line, exit 2."""
from __future__ import annotations

import argparse
import json
import sys

from lowbit.errors import ConfigError, LowbitError
from lowbit.export.formats import FORMATS, MERGE_INTO, export, export_bnb4
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
    ap.add_argument("--gguf-type", default=None, choices=GGUF_TYPES,
                    help="llama.cpp file type; per-tensor types follow llama-quantize's rules (default: the type a "
                    "GGUF QAT run trained for, else F16)")
    ap.add_argument("--eval", metavar="TEXT", help="gguf: held-out text file; print the perplexity of the written file "
                    "read back (its dequantized weights)")
    _eval_options(ap)
    ap.add_argument("--imatrix", help="gguf: llama-imatrix output (GGUF or .dat) weighing the k-quants' errors")
    ap.add_argument("--calibration", help="gguf: text file to compute the importance matrix from (as llama-imatrix)")
    ap.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"),
                    help="merged: output dtype")
    ap.add_argument("--base", help="base HF model folder (default: the one recorded at training time)")
    ap.add_argument("--merge-into", default="trained", choices=MERGE_INTO,
                    help="gguf/bnb4 from a QLoRA adapter: merge into the 4-bit base it trained on (trained, exact) or "
                    "into the base's original 16-bit weights before re-quantizing (16bit: keeps more of the fine-tune)")
    ap.add_argument("--overwrite", action="store_true", help="replace an existing output")
    ap.add_argument("--no-verify", action="store_true", help="skip loading the output back")
    return ap


def _eval_options(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--seq-len", type=int, default=256, help="eval: tokens per block (BOS first), as training's eval")
    ap.add_argument("--max-blocks", type=int, default=24, help="eval: first N blocks of the text (0: all)")


def _eval_gguf_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="lowbit eval-gguf", description="Perplexity of a GGUF file on a text: the file is "
                                 "read back (transformers' GGUF loader dequantizes every tensor) and scored in fp32.")
    ap.add_argument("gguf", help="a .gguf file (Llama / Mistral / Gemma3 / Qwen as lowbit export writes them)")
    ap.add_argument("--text", required=True, help="plain text file, e.g. data/shakespeare/heldout_hamlet.txt")
    ap.add_argument("--model", help="HF model folder of the same architecture (its config + tokenizer; weights unused): "
                    "the file is decoded by lowbit's own inverse conventions (default: transformers' GGUF loader)")
    _eval_options(ap)
    return ap


def gguf_perplexity(path, text, hf_dir=None, seq_len: int = 256, max_blocks: int | None = 24,
                    batch_size: int = 4) -> float:
    """exp(mean NLL) of `text` under the GGUF file's weights read back, in fp32: BOS-led blocks of `seq_len` tokens,
    the same examples and chunked loss as a training run's held-out eval (data.max_seq_len, max_eval_blocks).
    `hf_dir` (an HF model folder of the same architecture: config + tokenizer) → the file's tensors decoded into
    that architecture by lowbit's inverse conventions; without it transformers' GGUF loader reads the file."""
    from pathlib import Path

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from lowbit.errors import InputError
    from lowbit.export.formats import gguf_reference
    from lowbit.recipes.config import DataConfig
    from lowbit.recipes.data import _eval_config, build_examples
    from lowbit.recipes.loss import perplexity
    from lowbit.utils.batching import Collator
    path, text = Path(path), Path(text)
    for p, what in ((path, "GGUF file"), (text, "eval text")):
        if not p.is_file():
            raise InputError(f"{what} {p} does not exist")
    if hf_dir is not None:
        tok = AutoTokenizer.from_pretrained(hf_dir)
        skeleton = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(hf_dir), dtype=torch.float32)
        model = gguf_reference(skeleton, path)[0].eval()
    else:
        tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    cfg = _eval_config(DataConfig(train_files=[str(text)], eval_files=[str(text)], max_seq_len=seq_len))
    examples = build_examples([str(text)], tok, cfg)[:max_blocks or None]
    if not examples:
        raise InputError(f"{text} gives no eval blocks of {seq_len} tokens")
    return perplexity(model, examples, Collator(tok.pad_token_id, model.config), batch_size, 256, f"eval {path.name}")


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
    if a.eval and a.format != "gguf":
        raise ConfigError("--eval scores a GGUF file; use it with --format gguf")
    rep = export(a.source, a.out, a.format, base=a.base, gguf_type=a.gguf_type, dtype=a.dtype,
                 overwrite=a.overwrite, verify=not a.no_verify, imatrix=a.imatrix, calibration=a.calibration,
                 merge_into=a.merge_into)
    if a.eval:
        rep["eval_text"] = a.eval
        rep["eval_ppl"] = gguf_perplexity(a.out, a.eval, _hf_dir(a.source, a.base), a.seq_len, a.max_blocks)
    _print_report(rep)
    if a.eval:
        print(f"held-out perplexity of {a.out} ({rep['gguf_type']}, read back): {rep['eval_ppl']:.3f}", flush=True)
    return 0


def _hf_dir(source, base=None) -> str | None:
    """An HF folder with the source's architecture and tokenizer: a dense source itself, else the run's base."""
    from pathlib import Path

    from lowbit.methods.qat.gguf import trained_for
    from lowbit.utils.run_record import RunRecord
    p = Path(source)
    found = trained_for(p)
    for d in ([found[0]] if found else []) + [p]:
        if (d / "config.json").exists() and (d / "tokenizer_config.json").exists():
            return str(d)
    if base is not None:
        return str(base)
    run = RunRecord.find(p, p.parent, p / "adapter") if p.is_dir() else None
    return str(run.base_model.path) if run is not None else None


def eval_gguf_main(argv: list[str]) -> int:
    a = _eval_gguf_parser().parse_args(argv)
    ppl = gguf_perplexity(a.gguf, a.text, a.model, a.seq_len, a.max_blocks)
    print(json.dumps({"gguf": a.gguf, "text": a.text, "seq_len": a.seq_len, "max_blocks": a.max_blocks, "ppl": ppl}))
    return 0


def main(argv: list[str] | None = None) -> int:
    """argv starts with the subcommand: ['merge', ...] or ['export', ...]."""
    argv = sys.argv[1:] if argv is None else list(argv)
    cmds = {"merge": merge_main, "export": export_main, "eval-gguf": eval_gguf_main}
    if not argv or argv[0] not in cmds:
        print("usage: lowbit {merge,export,eval-gguf} ...", file=sys.stderr)
        return 2
    try:
        return cmds[argv[0]](argv[1:])
    except (LowbitError, FileExistsError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
