"""LoftQ benchmark on Gemma-3-270M: held-out Hamlet perplexity of the bf16 model and of QLoRA started
from the NF4 base with zero-init, weight-space LoftQ and calibrated (activation-aware) LoftQ adapters —
before training (the init alone) and after the same short fine-tune — plus LoftQ's init time and the
peak RSS after load + LoftQ.

Every QLoRA variant is the real trainer (`lowbit.recipes.run`) on the given config with only
`lora.init` / `lora.loftq.*` changed, so all share data, eval blocks, seed and steps; bf16 is scored
on the same eval blocks. Each method runs in its own subprocess (its own peak RSS). Writes JSON +
PNG, and the markdown table to stdout.

    .venv/bin/python scripts/benchmark_loftq.py [--steps 30] [--iters 5] [--calib-samples 16]
        [--config configs/qlora/gemma3-270m-shakespeare.yaml] [--out outputs/bench/loftq.json]
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
METHODS = ("bf16", "zero", "loftq", "loftq_cal")
LABELS = {"bf16": "bf16 (no quantization)", "zero": "NF4, zero-init QLoRA", "loftq": "NF4 + LoftQ (weight space)",
          "loftq_cal": "NF4 + LoftQ (calibrated)"}


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _overrides(method: str, a) -> list[str]:
    out = [*a.set, f"train.max_steps={max(a.steps, 1)}", f"train.output_dir={a.runs}/{method}",
           "train.overwrite_output=true",
           "train.save_steps=0", "train.report_to=[jsonl]", f"lora.loftq.iters={a.iters}", f"lora.loftq.svd={a.svd}"]
    if method == "zero":
        return out + ["lora.init=zero"]
    out.append("lora.init=loftq")
    if method == "loftq_cal":
        out += [f"lora.loftq.calibration={a.calib}", f"lora.loftq.calibration_samples={a.calib_samples}",
                f"lora.loftq.calibration_seq_len={a.calib_seq_len}"]
    return out


def _init_only(method: str, cfg) -> dict:
    """The trainer's steps up to its first eval (load, LoftQ, LoRA) and that eval: the init alone."""
    from lowbit.methods.loftq import apply_loftq
    from lowbit.models import load_model
    from lowbit.modules.lora import add_lora, prepare_for_kbit_training
    from lowbit.recipes.data import build_datasets
    from lowbit.recipes.loftq_init import loftq_for_run
    from lowbit.recipes.loss import perplexity
    from lowbit.utils.batching import Collator
    q, lc = cfg.model.quant, cfg.lora
    model, tok = load_model(cfg.model.path, quant_type=q.quant_type, blocksize=q.blocksize,
                            double_quant=q.double_quant, compute_dtype=q.compute_dtype)
    out: dict = {}
    loftq = None
    if lc.init == "loftq":
        Path(cfg.train.output_dir).mkdir(parents=True, exist_ok=True)
        loftq = loftq_for_run(model, tok, cfg, cfg.train.output_dir)
        out["loftq"] = loftq.record
        out["per_layer"] = loftq.result.report()["per_layer"]
    prepare_for_kbit_training(model, cfg.train.gradient_checkpointing)
    model = add_lora(model, r=lc.r, alpha=lc.alpha, dropout=lc.dropout, target_modules=lc.target_modules,
                     use_rslora=lc.use_rslora)
    if loftq is not None:
        apply_loftq(model, loftq.result)
    _, eval_ex = build_datasets(tok, cfg.data, cfg.train.seed)
    out["ppl_init"] = perplexity(model, eval_ex, Collator(tok.pad_token_id), cfg.eval.batch_size,
                                 cfg.train.loss_chunk_tokens, f"eval {method}")
    return out


def worker(method: str, phase: str, a) -> dict:
    import torch
    torch.set_num_threads(a.threads)

    from lowbit.recipes.config import load_config
    out: dict = {}
    t0 = time.perf_counter()
    cfg = load_config(a.config, _overrides(method if method != "bf16" else "zero", a))
    if method == "bf16":  # the same eval blocks the trainer scores, on the unquantized model
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from lowbit.recipes.data import build_datasets
        from lowbit.recipes.loss import perplexity
        from lowbit.utils.batching import Collator
        tok = AutoTokenizer.from_pretrained(cfg.model.path)
        model = AutoModelForCausalLM.from_pretrained(cfg.model.path, dtype=torch.bfloat16).eval()
        _, eval_ex = build_datasets(tok, cfg.data, cfg.train.seed)
        out["ppl_init"] = perplexity(model, eval_ex, Collator(tok.pad_token_id), cfg.eval.batch_size,
                                     cfg.train.loss_chunk_tokens, "eval bf16")
        out["eval_tokens"] = sum(len(e["labels"]) - 1 for e in eval_ex)  # next-token targets
    elif phase == "init":
        out.update(_init_only(method, cfg))
    else:
        from lowbit.recipes import run
        cfg.eval.before = False  # the init phase measured it, on the same blocks
        m = run(cfg)
        out["ppl_after"] = m["eval_ppl_after"]
        out["train_loss"], out["train_steps"] = m["train_loss"], m["train_steps"]
    out["seconds"] = round(time.perf_counter() - t0, 1)
    out["peak_rss_mb"] = round(_rss_mb(), 1)
    return out


def plot(res: dict, png: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    ms, tr = res["init"], res["train"]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.2))
    names = [m for m in METHODS if m in ms]
    x = range(len(names))
    init = [ms[m]["ppl_init"] for m in names]
    after = [tr.get(m, {}).get("ppl_after") for m in names]
    ax1.bar([i - 0.2 for i in x], init, 0.4, label="init (no training)", color="tab:gray")
    ax1.bar([i + 0.2 for i in x if after[i]], [v for v in after if v], 0.4,
            label=f"after {res['args']['steps']} steps", color="tab:green")
    for i, v in enumerate(init):
        ax1.text(i - 0.2, v, f"{v:.1f}", ha="center", va="bottom", fontsize=8)
    for i, v in enumerate(after):
        if v:
            ax1.text(i + 0.2, v, f"{v:.1f}", ha="center", va="bottom", fontsize=8)
    ax1.set_xticks(list(x), [LABELS[m].replace(" (", "\n(").replace(", ", ",\n") for m in names], fontsize=8)
    ax1.set_ylim(min(init + [v for v in after if v]) * 0.9, max(init) * 1.05)
    ax1.set_ylabel("held-out Hamlet perplexity")
    ax1.legend(fontsize=8)
    ax1.set_title(f"{res['model']}, LoRA r={res['r']}, α={res['alpha']:g}")
    for m, style in (("loftq", "tab:blue"), ("loftq_cal", "tab:orange")):
        layers = ms.get(m, {}).get("per_layer")
        if layers:
            rel = [l["loftq_error"] / l["zero_init_error"] for l in layers]
            ax2.plot(rel, ".", color=style, label=f"{LABELS[m]} ({layers[0]['metric']} error)")
    ax2.axhline(1.0, color="tab:red", lw=1, label="zero init (plain NF4)")
    ax2.set_xlabel("adapted Linear (load order)")
    ax2.set_ylabel("error after LoftQ / error of plain NF4")
    ax2.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(png, dpi=120)


def table(res: dict) -> str:
    ms, tr = res["init"], res["train"]
    gap = ms["zero"]["ppl_init"] - ms["bf16"]["ppl_init"] if {"zero", "bf16"} <= set(ms) else None
    rows = ["| method | ppl, init (no training) | NF4 gap recovered | ppl after "
            f"{res['args']['steps']} steps | LoftQ init time | peak RSS (load + init) | mean layer error "
            "zero-init → LoftQ |", "|---|---|---|---|---|---|---|"]
    for m in METHODS:
        if m not in ms:
            continue
        r = ms[m]
        rec = r.get("loftq") or {}
        rec_gap = (f"{100 * (ms['zero']['ppl_init'] - r['ppl_init']) / gap:.0f} %"
                   if gap and gap > 0 and m != "bf16" else "—")
        after = f"{tr[m]['ppl_after']:.2f}" if tr.get(m, {}).get("ppl_after") else "—"
        t = f"{rec['seconds']:.0f} s" if rec else "—"
        rss = f"{rec['peak_rss_mb']:.0f} MB" if rec else "—"
        err = (f"{rec['mean_zero_init_error']:.4f} → {rec['mean_loftq_error']:.4f} ({rec['metric']})"
               if rec else "—")
        rows.append(f"| {LABELS[m]} | {r['ppl_init']:.2f} | {rec_gap} | {after} | {t} | {rss} | {err} |")
    return "\n".join(rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="configs/qlora/gemma3-270m-shakespeare.yaml")
    ap.add_argument("--steps", type=int, default=30, help="fine-tune steps (0: init only)")
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--svd", choices=("lowrank", "full"), default="lowrank")
    ap.add_argument("--calib", default="data/shakespeare/train.txt", help="calibration text (training data)")
    ap.add_argument("--calib-samples", type=int, default=16)
    ap.add_argument("--calib-seq-len", type=int, default=256)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads per worker (1: on a shared 2-core box 2 threads spin-wait and run slower)")
    ap.add_argument("--runs", default="outputs/bench/loftq_runs")
    ap.add_argument("--out", default="outputs/bench/loftq.json")
    ap.add_argument("--methods", default=",".join(METHODS), help="measured at init (no training)")
    ap.add_argument("--train-methods", default="zero,loftq_cal,loftq", help="fine-tuned for --steps")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="extra config override")
    ap.add_argument("--worker", nargs=2, metavar=("METHOD", "PHASE"))
    a = ap.parse_args()
    sys.path.insert(0, str(ROOT))
    if a.worker:
        print("RESULT " + json.dumps(worker(a.worker[0], a.worker[1], a)), flush=True)
        return
    from lowbit.recipes.config import load_config
    from lowbit.utils.io import write_json
    cfg = load_config(a.config, a.set)
    for p in (cfg.model.path, *cfg.data.eval_files, a.calib):
        if not Path(p).exists():
            sys.exit(f"error: {p} not found; run scripts/prepare_model.py / scripts/prepare_data.py first")
    out = Path(a.out)
    same = ("config", "steps", "iters", "svd", "calib", "calib_samples", "calib_seq_len", "set")
    res = {"args": vars(a), "model": Path(cfg.model.path).name, "r": cfg.lora.r, "alpha": cfg.lora.alpha,
           "init": {}, "train": {}}
    if out.exists():  # resume a partial run: keep what was measured with the same settings
        old = json.loads(out.read_text())
        if all(old["args"].get(k) == getattr(a, k) for k in same):
            res["init"], res["train"] = old.get("init", {}), old.get("train", {})
    todo = [(m, "init") for m in a.methods.split(",") if m] + \
        ([(m, "train") for m in a.train_methods.split(",") if m] if a.steps > 0 else [])
    for m, phase in todo:
        if m in res[phase]:
            continue
        proc = subprocess.run([sys.executable, __file__, *sys.argv[1:], "--worker", m, phase],
                              stdout=subprocess.PIPE, text=True, cwd=ROOT)
        line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
        if proc.returncode or not line:
            sys.exit(f"error: {m} ({phase}) failed (exit {proc.returncode})")
        res[phase][m] = json.loads(line[-1][7:])
        print(m, phase, {k: v for k, v in res[phase][m].items() if k not in ("per_layer", "loftq")}, flush=True)
        write_json(out, res)  # after every step: a long run that stops keeps what it measured
    ms = res["init"]
    if {"zero", "bf16"} <= set(ms):
        gap = ms["zero"]["ppl_init"] - ms["bf16"]["ppl_init"]
        res["gap_recovered"] = {m: (ms["zero"]["ppl_init"] - ms[m]["ppl_init"]) / gap
                                for m in ("loftq", "loftq_cal") if m in ms}
    write_json(out, res)
    plot(res, out.with_suffix(".png"))
    print(table(res))
    print(f"wrote {out} and {out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
