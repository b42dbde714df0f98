"""Data-free QAT quality on Gemma-3-270M (LLM-QAT): held-out Hamlet perplexity, PTQ gap recovered.

One invocation, side by side, same student, same loss (KL to the full-precision teacher, online),
same steps × batch × sequence length:
  * teacher (full precision), round-to-nearest NF4 base, RTN PTQ w4a8kv8 / w4a8kv4;
  * data-free NF4 repair: LoRA on the NF4 base distilled on the teacher's own generations;
  * data-free QAT + LoRA for w4a8kv8 and w4a8kv4 (converted model evaluated);
  * the same QAT on real Shakespeare text (Hamlet excluded), for comparison.

Gap recovered = (ppl_RTN − ppl_student) / (ppl_RTN − ppl_teacher). The data-free students never see
Shakespeare; Hamlet is only the evaluation text.

    .venv/bin/python scripts/benchmark_llm_qat.py [--sequences 256] [--gen-len 128] [--steps 64] [--batch 4]
                                                  [--lr 5e-4] [--eval-blocks 16] [--out outputs/bench/llm_qat]
                                                  [--runs df-nf4 df-w4a8kv8 ...]
Numbers go to <out>/results.json as they are measured; rerunning with the same settings resumes.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from benchmark_qat import Results, _ppl, _train  # noqa: E402  (one harness for both QAT benchmarks)

GEN_CONFIG = "configs/llm_qat/generate-gemma3-270m.yaml"
DISTILL_CONFIG = "configs/llm_qat/distill-gemma3-270m-w4a8kv8.yaml"
SCHEMES = ("w4a8kv8", "w4a8kv4")
RUNS = ("df-nf4", *(f"df-{s}" for s in SCHEMES), *(f"real-{s}" for s in SCHEMES))


def _cfg(a, out: str, *extra):
    from lowbit.recipes.config import load_config
    return load_config(DISTILL_CONFIG, [
        f"model.path={a.model}", f"train.output_dir={a.out}/{out}", f"train.max_steps={a.steps}",
        f"train.batch_size={a.batch}", f"train.lr={a.lr}", f"data.max_seq_len={a.gen_len}",
        f"data.max_eval_blocks={a.eval_blocks}", f"data.train_files=[{a.out}/data]", "eval.before=false",
        "train.report_to=[jsonl]", "train.overwrite_output=true", "train.save_steps=0",
        "train.gradient_checkpointing=false", *extra])


def _run(a, name: str) -> float:
    """Train one student; the QAT ones are evaluated as the converted (real low-bit) model."""
    import lowbit.methods.qat as qat
    kind, scheme = name.split("-", 1)
    extra = ["data.format=text", "data.train_files=[data/shakespeare/train.txt]"] if kind == "real" else []
    if scheme == "nf4":
        return _train(a, name, *extra, "qat.scheme=", "model.quant.load_in_4bit=true", make_cfg=_cfg)
    _train(a, name, *extra, f"qat.scheme={scheme}", make_cfg=_cfg)
    return _ppl(qat.load_quantized(f"{a.out}/{name}/quantized"), a.ev, f"{name} converted")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=".cache/models/gemma-3-270m")
    ap.add_argument("--sequences", type=int, default=256)
    ap.add_argument("--gen-len", type=int, default=128, help="generated sequence length = training sequence length")
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--eval-blocks", type=int, default=16)
    ap.add_argument("--out", default="outputs/bench/llm_qat")
    ap.add_argument("--runs", nargs="*", default=list(RUNS), choices=RUNS, help="students to train now")
    a = ap.parse_args()
    from _bench import machine_info, markdown_table, write_results
    from benchmark_qat import _model
    from transformers import AutoTokenizer

    import lowbit.methods.qat as qat
    from lowbit.methods.data_gen.config import load_generate_config
    from lowbit.methods.data_gen.runner import run as generate
    from lowbit.recipes.data import build_datasets
    from lowbit.utils.batching import Collator

    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    res = Results(out / "results.json", {k: getattr(a, k) for k in ("sequences", "gen_len", "steps", "batch", "lr",
                                                                     "eval_blocks")})
    t_start = time.perf_counter()
    # EOS stopping off: every generated sequence is gen_len tokens, so both data sources give the same budget
    gcfg = load_generate_config(GEN_CONFIG, [f"teacher.path={a.model}", f"generate.num_sequences={a.sequences}",
                                             f"generate.max_len={a.gen_len}", "generate.stop_at_eos=false",
                                             f"output.dir={out}/data", "output.topk_logits=0", "output.shard_size=64"])
    res.get_or("generate", lambda: generate(gcfg))
    tok = AutoTokenizer.from_pretrained(a.model)
    _, ev = build_datasets(tok, _cfg(a, "eval").data, 0)
    a.ev = (ev, Collator(tok.pad_token_id))
    res.get_or("teacher", lambda: _ppl(_model(a), a.ev, "teacher (full precision)"))
    res.get_or("RTN nf4", lambda: _ppl(_model(a, four_bit=True), a.ev, "RTN NF4 base"))
    teacher = None
    for s in SCHEMES:
        if f"RTN {s}" not in res:
            teacher = teacher or _model(a)
            res.get_or(f"RTN {s}", lambda t=teacher, s=s: _ppl(qat.prepare(t, s), a.ev, f"RTN PTQ {s}"))
            qat.unprepare(teacher)
    del teacher
    for name in a.runs:
        res.get_or(name, lambda: _run(a, name))
    res["total_s_this_invocation"] = time.perf_counter() - t_start

    tokens = a.steps * a.batch * a.gen_len
    rows = []
    for scheme in ("nf4", *SCHEMES):
        for kind, data in (("df", "self-generated"), ("real", "Shakespeare (no Hamlet)")):
            if f"{kind}-{scheme}" in res:
                rtn, st = res[f"RTN {scheme}"], res[f"{kind}-{scheme}"]
                rows.append({"target": "LoRA on NF4 base" if scheme == "nf4" else f"QAT {scheme}", "training data": data,
                             "train tokens": tokens, "teacher": res["teacher"], "RTN": rtn, "student": st,
                             "gap recovered": (rtn - st) / (rtn - res["teacher"])})
    if rows:
        write_results(rows, out / "llm_qat", {**machine_info(), **res})
        print(markdown_table(rows, list(rows[0])))
        _plot(rows, out / "llm_qat.png")
    print(json.dumps(res, indent=1, default=str))
    return 0


def _plot(rows, path: Path) -> None:
    """Fraction of the RTN gap each student recovers, data-free beside real text, per target."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    targets = list(dict.fromkeys(r["target"] for r in rows))
    fig, ax = plt.subplots(figsize=(7, 3.6))
    for i, data in enumerate(dict.fromkeys(r["training data"] for r in rows)):
        got = {r["target"]: 100 * r["gap recovered"] for r in rows if r["training data"] == data}
        xs = [j + (i - 0.5) * 0.38 for j, t in enumerate(targets) if t in got]
        ax.bar(xs, [got[t] for t in targets if t in got], 0.38, label=data)
    ax.axhline(70, color="k", ls="--", lw=1, label="target 70 %")
    ax.set_xticks(range(len(targets)), targets)
    ax.set_ylabel("RTN perplexity gap recovered (%)")
    ax.set_title(f"Gemma-3-270M, held-out Hamlet, {rows[0]['train tokens']} training tokens")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    raise SystemExit(main())
