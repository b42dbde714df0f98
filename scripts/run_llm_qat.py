"""Data-free QAT end to end: generate → distill → convert → evaluate (one command, one report).

    .venv/bin/python scripts/run_llm_qat.py \
        --generate configs/llm_qat/generate-gemma3-270m.yaml \
        --distill configs/llm_qat/distill-gemma3-270m-w4a8kv8.yaml [--gen key=value ...] [--train key=value ...]

1. `lowbit generate` writes the teacher's own sequences (resumable: rerun after a kill);
2. the trainer distils the QAT/QLoRA student from the teacher on them (distill section);
3. the trainer converts and saves the deployment model (<output_dir>/quantized for QAT runs);
4. held-out perplexity of teacher, round-to-nearest PTQ and the distilled student, written to
   <output_dir>/llm_qat_report.json with the fraction of the PTQ gap recovered.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _ppl(model, ex, collate, cfg, desc):
    from lowbit.recipes.loss import perplexity
    p = perplexity(model, ex, collate, cfg.eval.batch_size, cfg.train.loss_chunk_tokens, desc)
    print(f"{desc}: {p:.3f}", flush=True)
    return p


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--generate", required=True)
    ap.add_argument("--distill", required=True)
    ap.add_argument("--gen", nargs="*", default=[], help="overrides for the generate config")
    ap.add_argument("--train", nargs="*", default=[], help="overrides for the distill (training) config")
    a = ap.parse_args(argv)
    from lowbit.errors import LowbitError
    from lowbit.methods.data_gen.config import load_generate_config
    from lowbit.methods.data_gen.runner import run as generate
    from lowbit.models import load_model
    from lowbit.recipes import run as train
    from lowbit.recipes.config import load_config
    from lowbit.recipes.data import build_datasets
    from lowbit.recipes.qat_run import qat_config
    from lowbit.utils.batching import Collator
    from lowbit.utils.io import write_json
    try:
        gcfg = load_generate_config(a.generate, a.gen)
        cfg = load_config(a.distill, [f"data.train_files=[{gcfg.output.dir}]", *a.train])
        print(f"[1/4] generate → {gcfg.output.dir}", flush=True)
        gen = generate(gcfg)
        print(f"[2/4] distill → {cfg.train.output_dir}", flush=True)
        metrics = train(cfg)
        out = Path(cfg.train.output_dir)
        print("[3/4] converted model: " + (str(out / "quantized") if cfg.qat.scheme else "adapter (QLoRA student)"))
        print("[4/4] evaluate", flush=True)
        q = cfg.model.quant
        teacher, tok = load_model(cfg.model.path, load_in_4bit=False, compute_dtype=q.compute_dtype, progress=False)
        _, ev = build_datasets(tok, cfg.data, cfg.train.seed)
        collate = Collator(tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id)
        report = {"generate": gen, "train": metrics, "teacher_ppl": _ppl(teacher, ev, collate, cfg, "teacher")}
        qc = qat_config(cfg)
        if qc is not None:
            import lowbit.methods.qat as qat
            report["ptq_ppl"] = _ppl(qat.convert(qat.prepare(teacher, qc)), ev, collate, cfg, f"RTN PTQ {qc.name}")
            report["student_ppl"] = _ppl(qat.load_quantized(out / "quantized"), ev, collate, cfg, "distilled, converted")
        else:
            del teacher
            base, _ = load_model(cfg.model.path, load_in_4bit=q.load_in_4bit, compute_dtype=q.compute_dtype,
                                 progress=False)
            report["ptq_ppl"] = _ppl(base, ev, collate, cfg, "RTN 4-bit base")
            report["student_ppl"] = metrics.get("eval_ppl_after")
        gap = report["ptq_ppl"] - report["teacher_ppl"]
        report["gap_recovered"] = (report["ptq_ppl"] - report["student_ppl"]) / gap if gap else None
        write_json(out / "llm_qat_report.json", report)
        print(json.dumps({k: v for k, v in report.items() if k != "train" and k != "generate"}, indent=1))
    except LowbitError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
