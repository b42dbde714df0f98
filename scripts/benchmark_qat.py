"""QAT quality on Gemma-3-270M: held-out Hamlet perplexity, PTQ gap recovered, merge-aware export.

One invocation, everything side by side, same data, same training budget:
  * bf16, and round-to-nearest PTQ (prepare → convert, no training) for each scheme;
  * a LoRA fine-tune without QAT (bf16), then PTQ of that fine-tuned model per scheme;
  * QAT + LoRA per scheme (the trainer's qat section), converted model = the trained one;
  * on an NF4 base: a plain QLoRA fine-tune merged + requantized to NF4 (naive) vs merge-aware
    QAT (qat.scheme=nf4) exported the same way: fraction of the fine-tune's gain that survives.

Gap recovered = (ppl_PTQ − ppl_QAT) / (ppl_PTQ − ppl_bf16), against the fine-tuned bf16 model and its PTQ
(the fair comparison: both saw the same data) and, for reference, against the original model.

    .venv/bin/python scripts/benchmark_qat.py [--steps 40] [--batch 4] [--seq 256] [--lr 2e-4] [--eval-blocks 24]
                                              [--out outputs/bench/qat] [--skip-merge] [--schemes ...]
Measured numbers go to <out>/results.json as they come; rerunning with the same settings resumes.
"""
from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
CONFIG = "configs/qlora/gemma3-270m-qat.yaml"
SCHEMES = ("w4a16-g128", "w4a8kv8", "w4a8kv4")


def _cfg(a, out: str, *extra):
    from lowbit.recipes.config import load_config
    return load_config(CONFIG, [f"model.path={a.model}", f"train.output_dir={a.out}/{out}", f"train.max_steps={a.steps}",
                                f"data.max_eval_blocks={a.eval_blocks}", f"data.max_seq_len={a.seq}",
                                f"train.batch_size={a.batch}", "eval.before=false", "train.report_to=[jsonl]",
                                "train.overwrite_output=true", f"train.lr={a.lr}", "train.save_steps=0",
                                "train.gradient_checkpointing=false", *extra])


def _eval_set(a):
    from lowbit.recipes.data import build_datasets
    from lowbit.utils.batching import Collator
    cfg = _cfg(a, "eval")
    tok = _tok(a)
    _, ev = build_datasets(tok, cfg.data, cfg.train.seed)
    return ev, Collator(tok.pad_token_id)


def _tok(a):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(a.model)


def _ppl(model, ev, desc):
    from lowbit.recipes.loss import perplexity
    ppl = perplexity(model, ev[0], ev[1], 4, 256, desc)
    print(f"  {desc}: {ppl:.3f}", flush=True)
    return ppl


def _model(a, four_bit=False, adapter=None):
    from lowbit.models import load_model
    from lowbit.modules.lora import load_adapter
    m, _ = load_model(a.model, load_in_4bit=four_bit, compute_dtype="auto", progress=False)
    return load_adapter(m, adapter) if adapter else m


class Results(dict):
    """Numbers saved to <out>/results.json as they are measured; a rerun with the same settings skips them."""

    def __init__(self, path: Path, settings: dict):
        self.path = path
        old = json.loads(path.read_text()) if path.exists() else {}
        super().__init__(old if old.get("settings") == settings else {"settings": settings})

    def get_or(self, key, fn):
        if key not in self:
            from lowbit.utils.io import write_json
            self[key] = fn()
            write_json(self.path, dict(self))
        return self[key]


def _ptq(a, ev, res, load, tag):
    import lowbit.methods.qat as qat
    model = None
    for s in SCHEMES:
        if f"{tag} PTQ {s}" not in res:
            model = model or load()
        res.get_or(f"{tag} PTQ {s}", lambda: _ppl(qat.prepare(model, s), ev, f"{tag} PTQ {s}"))
        if model is not None:
            qat.unprepare(model)


def _train(a, out, *extra, make_cfg=None):
    from lowbit.recipes import run
    t0 = time.perf_counter()
    m = run((make_cfg or _cfg)(a, out, *extra))
    gc.collect()
    print(f"  {out}: eval ppl {m['eval_ppl_after']:.3f} ({time.perf_counter() - t0:.0f} s)", flush=True)
    return m["eval_ppl_after"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=".cache/models/gemma-3-270m")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--lr", type=float, default=2e-4)
    ap.add_argument("--eval-blocks", type=int, default=24)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--out", default="outputs/bench/qat")
    ap.add_argument("--skip-merge", action="store_true")
    ap.add_argument("--schemes", nargs="*", default=list(SCHEMES), choices=SCHEMES, help="QAT runs to do now")
    a = ap.parse_args()
    from _bench import machine_info, markdown_table, write_results

    import lowbit.methods.qat as qat
    ev = _eval_set(a)
    Path(a.out).mkdir(parents=True, exist_ok=True)
    res = Results(Path(a.out) / "results.json", {"steps": a.steps, "lr": a.lr, "eval_blocks": a.eval_blocks,
                                                 "batch": a.batch, "seq": a.seq})
    t_start = time.perf_counter()
    res.get_or("bf16", lambda: _ppl(_model(a), ev, "bf16"))
    _ptq(a, ev, res, lambda: _model(a), "base")
    res.get_or("ft", lambda: _train(a, "ft", "qat.scheme="))  # LoRA fine-tune, bf16, no QAT
    _ptq(a, ev, res, lambda: _model(a, adapter=f"{a.out}/ft/adapter"), "fine-tuned")
    for s in a.schemes:
        res.get_or(f"QAT {s}", lambda: _train(a, f"qat-{s}", f"qat.scheme={s}"))
    if not a.skip_merge:
        four = ["model.quant.load_in_4bit=true"]
        res.get_or("nf4", lambda: _ppl(_model(a, four_bit=True), ev, "NF4 base"))
        res.get_or("naive_trained", lambda: _train(a, "qlora-naive", *four, "qat.scheme="))
        res.get_or("naive_exported", lambda: _ppl(
            _model(a, four_bit=True, adapter=f"{a.out}/qlora-naive/adapter").merge_and_unload(), ev,
            "naive merge → NF4"))
        res.get_or("aware_trained", lambda: _train(a, "qlora-aware", *four, "qat.scheme=nf4"))
        res.get_or("aware_exported", lambda: _ppl(qat.load_quantized(f"{a.out}/qlora-aware/quantized"), ev,
                                                  "merge-aware → NF4"))
    res["total_s_this_invocation"] = time.perf_counter() - t_start

    rows = []
    for s in [s for s in SCHEMES if f"QAT {s}" in res]:
        ptq, ptq0, q = res[f"fine-tuned PTQ {s}"], res[f"base PTQ {s}"], res[f"QAT {s}"]
        rows.append({"scheme": s, "bf16 (orig)": res["bf16"], "PTQ (orig)": ptq0, "bf16 fine-tuned": res["ft"],
                     "PTQ of fine-tuned": ptq, "QAT": q,
                     "gap recovered vs fine-tuned": (ptq - q) / (ptq - res["ft"]),
                     "gap recovered vs orig": (ptq0 - q) / (ptq0 - res["bf16"])})
    merge_rows = []
    if "aware_exported" in res:
        for name, tr, ex in (("naive QLoRA merge", res["naive_trained"], res["naive_exported"]),
                             ("merge-aware QAT (nf4)", res["aware_trained"], res["aware_exported"])):
            merge_rows.append({"method": name, "NF4 base": res["nf4"], "trained": tr, "exported NF4": ex,
                               "gain surviving export": (res["nf4"] - ex) / (res["nf4"] - tr)})
    Path(a.out).mkdir(parents=True, exist_ok=True)
    if rows:
        write_results(rows, Path(a.out) / "qat", {**machine_info(), **res})
    if merge_rows:
        write_results(merge_rows, Path(a.out) / "qat_merge", {**machine_info(), **res})
    if rows:
        print(markdown_table(rows, list(rows[0])))
    if merge_rows:
        print(markdown_table(merge_rows, list(merge_rows[0])))
    if rows:
        _plot(rows, Path(a.out) / "qat.png")
    print(json.dumps(res, indent=1))
    return 0


def _plot(rows, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 3.6))
    x = range(len(rows))
    for i, (key, label) in enumerate((("bf16 fine-tuned", "bf16 fine-tuned"), ("PTQ of fine-tuned", "RTN PTQ"),
                                      ("QAT", "QAT + LoRA"))):
        ax.bar([j + (i - 1) * 0.27 for j in x], [r[key] for r in rows], 0.27, label=label)
    ax.set_xticks(list(x), [r["scheme"] for r in rows])
    ax.set_ylabel("Hamlet perplexity (lower is better)")
    ax.set_title("Gemma-3-270M: QAT vs round-to-nearest PTQ, same training budget")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    raise SystemExit(main())
