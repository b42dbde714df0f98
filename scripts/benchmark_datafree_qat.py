"""Data-free QAT w4a8kv8 on Gemma-3-270M: Hadamard rotations and learned weight clipping, side by side.

One invocation, one teacher, one set of self-generated tokens, one training budget for every student:
  * PTQ (no training): round-to-nearest w4a8kv8, + rotation, + MSE-searched clipping, both; w4a8kv4 (+ both);
  * data-free QAT + LoRA (KL to the online full-precision teacher on its own generations) for the
    baseline, + rotation, + learned clipping, rotation + learned clipping, and w4a8kv4 with the best recipe;
    every student is scored as its converted model reloaded with load_quantized;
  * KD steps/s of the QAT loop with and without the rotations (interleaved, same process).

Gap recovered = (ppl_RTN − ppl) / (ppl_RTN − ppl_teacher) against the plain RTN of the same scheme, on
held-out Hamlet and on a second held-out text of another author (--second-eval). Nothing trains on either.

    .venv/bin/python scripts/benchmark_datafree_qat.py [--data outputs/datafree/gen256] [--steps 64] [--batch 4]
        [--seq 128] [--lr 5e-4] [--eval-blocks 16] [--seed 0] [--out outputs/bench/datafree_qat] [--runs ...]
Numbers go to <out>/results.json as they are measured; rerunning with the same settings resumes.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import benchmark_llm_qat as llm  # noqa: E402  (its distill config; benchmark_qat's harness)
from benchmark_qat import Results, _model, _ppl, _train  # noqa: E402

# name → qat.scheme: a preset, or a dict written to <out>/schemes/<name>.yaml for the recipe
SCHEMES = {
    "w4a8kv8": "w4a8kv8",
    "w4a8kv8-rot": "w4a8kv8-rot",
    "w4a8kv8-clip": {"preset": "w4a8kv8", "weight": {"range": "learned_clip"}},
    "w4a8kv8-rot-lsq": {"preset": "w4a8kv8-rot", "weight": {"range": "learned"}},
    "w4a8kv8-rot-clip": "w4a8kv8-rot-clip",
    "w4a8kv4": "w4a8kv4",
    "w4a8kv4-rot-clip": "w4a8kv4-rot-clip",
}
PTQ = ("w4a8kv8", "w4a8kv8-rot", "w4a8kv8-rot-clip", "w4a8kv4", "w4a8kv4-rot-clip", "w4a8kv8-clip")
RUNS = ("w4a8kv8-rot-clip", "w4a8kv8", "w4a8kv8-rot", "w4a8kv8-clip", "w4a8kv4-rot-clip")
EXTRA_RUNS = ("w4a8kv8-rot-lsq", "w4a8kv4")
SPEED = ("w4a8kv8", "w4a8kv8-rot", "w4a8kv8-rot-clip")


def _scheme(a, name: str) -> str:
    s = SCHEMES[name]
    if isinstance(s, str):
        return s
    import yaml
    path = Path(a.out) / "schemes" / f"{name}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"# written by scripts/benchmark_datafree_qat.py\n{yaml.safe_dump({'qat': s})}")
    return str(path)


def _train_args(a, *extra):
    return [f"data.train_files=[{a.data}]", f"train.seed={a.seed}", *extra]


def _eval_sets(a, tok):
    from lowbit.recipes.data import build_datasets
    from lowbit.utils.batching import Collator
    sets = {}
    for key, path in (("hamlet", "data/shakespeare/heldout_hamlet.txt"), ("second", a.second_eval)):
        if path and Path(path).exists():
            _, ev = build_datasets(tok, llm._cfg(a, "eval", *_train_args(a, f"data.eval_files=[{path}]")).data, 0)
            sets[key] = (ev, Collator(tok.pad_token_id))
        elif key == "second":
            print(f"second held-out text {path!r} not found: Hamlet only", flush=True)
    return sets


def _score(a, model, desc) -> dict:
    return {k: _ppl(model, ev, f"{desc} [{k}]") for k, ev in a.evs.items()}


def _ptq(a, res, teacher_box):
    import lowbit.methods.qat as qat
    for name in PTQ:
        if f"PTQ {name}" in res:
            continue
        teacher = teacher_box[0] = teacher_box[0] or _model(a)
        res.get_or(f"PTQ {name}", lambda: _score(a, qat.prepare(teacher, qat.resolve(_scheme(a, name))), f"PTQ {name}"))
        qat.unprepare(teacher)


def _run(a, name: str) -> dict:
    """Train one data-free student; score the trained (fake-quant) model's Hamlet ppl as the recipe reports
    it, and the converted model reloaded from disk on every held-out text."""
    import lowbit.methods.qat as qat
    t0 = time.process_time()
    trained = _train(a, f"df-{name}", *_train_args(a, f"qat.scheme={_scheme(a, name)}"), make_cfg=llm._cfg)
    cpu = time.process_time() - t0
    run = json.loads((Path(a.out) / f"df-{name}" / "lowbit_run.json").read_text())["metrics"]
    out = {"trained hamlet": trained, "train_runtime_s": run.get("train_runtime_s"), "process_cpu_s": cpu,
           "steps": run.get("train_steps")}
    out.update(_score(a, qat.load_quantized(Path(a.out) / f"df-{name}" / "quantized"), f"df-{name} converted"))
    return out


def _speed(a) -> dict:
    """Seconds per KD step (forward + backward, student QAT + LoRA, online teacher) per scheme, interleaved
    so that load changes hit every scheme alike; wall and process CPU time. --speed-batch sequences of --seq
    tokens (the optimizer step, a few ms for LoRA, is left out)."""
    import torch

    import lowbit.methods.qat as qat
    from lowbit.modules.lora import add_lora
    from lowbit.recipes.distill import distill_loss
    torch.manual_seed(a.seed)
    teacher = _model(a)
    # one student, re-prepared per scheme (prepare itself is not timed): one model's memory, not one per scheme
    student = add_lora(_model(a), r=16, alpha=32, dropout=0.0, target_modules="all-linear")
    ev, collate = a.evs["hamlet"]
    b = collate(ev[:a.speed_batch])
    wall = {s: [] for s in SPEED}
    cpu = {s: [] for s in SPEED}
    for r in range(a.speed_rounds + 1):  # round 0 warms up
        for s in SPEED:
            m = qat.prepare(student, qat.resolve(_scheme(a, s)))
            m.train()
            t, c = time.perf_counter(), time.process_time()
            distill_loss(m, b["input_ids"], b["labels"], b["attention_mask"], teacher=teacher).backward()
            m.zero_grad(set_to_none=True)
            if r:
                wall[s].append(time.perf_counter() - t)
                cpu[s].append(time.process_time() - c)
            qat.unprepare(m)
    base = statistics.median(wall[SPEED[0]])
    return {s: {"s_per_step": statistics.median(wall[s]), "steps_per_s": 1 / statistics.median(wall[s]),
                "cpu_s_per_step": statistics.median(cpu[s]), "wall_vs_baseline": statistics.median(wall[s]) / base,
                "tokens_per_step": int(b["input_ids"].numel())} for s in SPEED}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=".cache/models/gemma-3-270m")
    ap.add_argument("--data", default="outputs/datafree/gen256", help="lowbit generate output (the teacher's text)")
    ap.add_argument("--second-eval", default="data/milton/heldout_areopagitica.txt")
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=128, help="training sequence length (= the generated length)")
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--eval-blocks", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="outputs/bench/datafree_qat")
    ap.add_argument("--runs", nargs="*", default=list(RUNS), choices=RUNS + EXTRA_RUNS, help="students to train now")
    ap.add_argument("--parts", nargs="*", default=["ptq", "qat", "speed"], choices=["ptq", "qat", "speed"],
                    help="what to measure now (teacher and RTN always: every gap is against them)")
    ap.add_argument("--speed-batch", type=int, default=1)
    ap.add_argument("--speed-rounds", type=int, default=2)
    ap.add_argument("--plot", default="docs/datafree_w4a8.png")
    a = ap.parse_args()
    a.gen_len = a.seq  # benchmark_llm_qat's config builder names it so
    from _bench import machine_info, markdown_table, write_results
    from transformers import AutoTokenizer

    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    res = Results(out / "results.json", {k: getattr(a, k) for k in ("model", "data", "second_eval", "steps", "batch",
                                                                     "seq", "lr", "eval_blocks", "seed")})
    t_start = time.perf_counter()
    a.evs = _eval_sets(a, AutoTokenizer.from_pretrained(a.model))
    teacher_box = [None]
    if "teacher" not in res:
        teacher_box[0] = _model(a)
    res.get_or("teacher", lambda: _score(a, teacher_box[0], "teacher (full precision)"))
    if "ptq" in a.parts:
        _ptq(a, res, teacher_box)
    teacher_box.clear()
    for name in a.runs if "qat" in a.parts else ():
        res.get_or(f"QAT {name}", lambda: _run(a, name))
    if "speed" in a.parts:
        res.get_or("speed", lambda: _speed(a))
    res["total_s_this_invocation"] = time.perf_counter() - t_start

    rows = _rows(res, a)
    if not rows:
        return 0
    write_results(rows, out / "datafree_qat", {**machine_info(), **res})
    print(markdown_table(rows, list(rows[0])))
    if "speed" in res:
        print(json.dumps(res["speed"], indent=1))
    _plot(rows, Path(a.plot), a)
    return 0


def _rows(res: dict, a) -> list[dict]:
    rows = []
    for kind, prefix in (("PTQ", "PTQ"), ("data-free QAT + LoRA", "QAT")):
        for name in SCHEMES:
            r = res.get(f"{prefix} {name}")
            if r is None:
                continue
            base = res.get(f"PTQ {name.split('-')[0]}")  # the plain RTN of the scheme
            row = {"method": kind, "scheme": name}
            for k in a.evs:
                row[f"ppl {k}"] = r[k]
                row[f"gap recovered {k}"] = (base[k] - r[k]) / (base[k] - res["teacher"][k]) if base else None
            if prefix == "QAT":
                row["trained = converted (hamlet)"] = abs(r["trained hamlet"] - r["hamlet"]) < 1e-6 * r["hamlet"]
                row["train steps/s"] = r["steps"] / r["train_runtime_s"] if r.get("train_runtime_s") else None
            rows.append(row)
    return rows


def _plot(rows, path: Path, a) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    keys = [k for k in ("hamlet", "second") if f"gap recovered {k}" in rows[0]]
    labels = {"hamlet": "Hamlet", "second": Path(a.second_eval).stem.replace("heldout_", "")}
    rows = [r for r in rows if not (r["method"] == "PTQ" and r["scheme"] in ("w4a8kv8", "w4a8kv4"))
            and r[f"gap recovered {keys[0]}"] is not None]
    if not rows:
        return
    fig, ax = plt.subplots(figsize=(9, 4))
    width = 0.8 / len(keys)
    for i, k in enumerate(keys):
        ax.bar([j + (i - (len(keys) - 1) / 2) * width for j in range(len(rows))],
               [100 * r[f"gap recovered {k}"] for r in rows], width, label=f"held-out {labels[k]}")
    ax.axhline(70, color="k", ls="--", lw=1, label="target 70 %")
    ax.axhline(0, color="k", lw=0.5)
    ax.set_xticks(range(len(rows)), [f"{'PTQ' if r['method'] == 'PTQ' else 'QAT'}\n{r['scheme']}" for r in rows],
                  fontsize=7)
    ax.set_ylabel("RTN perplexity gap recovered (%)")
    ax.set_title(f"Gemma-3-270M, data-free ({a.steps}×{a.batch}×{a.seq} self-generated tokens), vs RTN of the scheme",
                 fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    raise SystemExit(main())
