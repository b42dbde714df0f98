"""QLoRA training-step speed and memory: lowbit vs transformers + bitsandbytes + peft.

Same model (Gemma-3-270M), same LoRA (r=16, alpha=32, dropout 0.05, all-linear), NF4 + double
quant, batch 4 x 256 tokens of Shakespeare, `--compute-dtype` (bf16, or fp32 as on AVX2-only
CPUs), gradient checkpointing, AdamW. Each side runs in its own subprocess (its peak RSS is its
own), one after the other in one invocation, `--repeats` times interleaved; medians are reported.

Baseline = what the transformers/peft docs do: BitsAndBytesConfig(nf4, double quant, compute
dtype) + prepare_model_for_kbit_training (checkpointing every layer) + get_peft_model, loss from
model(labels=...). lowbit = lowbit.models.load_model + add_lora + the trainer's chunked loss,
with its defaults: checkpoint only the layers memory requires (`train.checkpoint_layers: auto`),
fused LoRA forward, no gradient filter. Extra sides: lowbit_ref (every layer checkpointed, peft's
unfused LoRA forward: lowbit before these levers) and lowbit_cce (CCE's 2^-12 gradient filter).

    .venv/bin/python scripts/benchmark_train.py [--compute-dtype fp32] [--steps 6] [--repeats 2]
        [--sides transformers_bnb_peft,lowbit,lowbit_ref] [--out outputs/bench/train.json]
"""
from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

SIDES = ("transformers_bnb_peft", "lowbit", "lowbit_ref", "lowbit_cce")
DTYPES = {"bf16": "bfloat16", "fp32": "float32"}


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _batch(tok, batch: int, seq: int, data: Path):
    import torch
    text = data.read_text() if data.exists() else __import__("lowbit.testing", fromlist=["x"]).sample_text()
    ids = tok(text, add_special_tokens=False).input_ids
    need = batch * (seq - 1)
    if len(ids) < need:
        raise SystemExit(f"error: {data} has {len(ids)} tokens, need {need}")
    rows = [[tok.bos_token_id] + ids[i * (seq - 1):(i + 1) * (seq - 1)] for i in range(batch)]
    return torch.tensor(rows)


def worker(side: str, a) -> dict:
    import torch
    torch.manual_seed(0)
    dtype = DTYPES[a.compute_dtype]
    t0 = time.perf_counter()
    plan = None
    if side.startswith("lowbit"):
        from lowbit.models import load_model
        from lowbit.modules import lora as lora_mod
        from lowbit.modules.lora import add_lora, prepare_for_kbit_training
        from lowbit.recipes.loss import FILTER_STATS, causal_lm_loss
        from lowbit.recipes.trainer import available_memory_bytes, checkpoint_plan
        model, tok = load_model(a.model, compute_dtype=dtype, progress=False)
        layers = None
        if side != "lowbit_ref":  # train.checkpoint_layers: auto, as the trainer resolves it
            plan = checkpoint_plan(model.config.to_dict(), batch=a.batch, seq=a.seq, compute_dtype=dtype, lora_r=16,
                                   lora_dropout=a.lora_dropout, budget_bytes=available_memory_bytes() // 2)
            layers = plan["checkpointed"]
        lora_mod.FUSED["enabled"] = side != "lowbit_ref"
        prepare_for_kbit_training(model, gradient_checkpointing=True, checkpoint_layers=layers)
        model = add_lora(model, r=16, alpha=32, dropout=a.lora_dropout, target_modules="all-linear")
        eps = 2.0 ** -12 if side == "lowbit_cce" else 0.0

        def loss_fn(x):
            return causal_lm_loss(model, input_ids=x, labels=x, grad_filter=eps)
    else:
        from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
        from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig
        cfg = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                 bnb_4bit_compute_dtype=getattr(torch, dtype))
        model = AutoModelForCausalLM.from_pretrained(a.model, quantization_config=cfg, dtype=getattr(torch, dtype))
        tok = AutoTokenizer.from_pretrained(a.model)
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True)
        model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=a.lora_dropout, target_modules="all-linear",
                                                 task_type="CAUSAL_LM"))

        def loss_fn(x):
            return model(input_ids=x, labels=x).loss
    load_s = time.perf_counter() - t0
    load_rss = _rss_mb()
    x = _batch(tok, a.batch, a.seq, Path(a.data))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    model.train()
    times, cpu, losses = [], [], []
    for step in range(a.steps + 1):  # step 0 is warm-up
        t, c = time.perf_counter(), time.process_time()
        loss = loss_fn(x)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step:
            times.append(time.perf_counter() - t)
            cpu.append(time.process_time() - c)
        losses.append(round(loss.item(), 5))
    step_s = statistics.median(times)
    out = {"side": side, "compute_dtype": dtype, "load_s": round(load_s, 2), "step_s": round(step_s, 3),
           "cpu_step_s": round(statistics.median(cpu), 3), "tokens_per_s": round(a.batch * a.seq / step_s, 1),
           "peak_rss_mb": round(_rss_mb(), 1), "rss_after_load_mb": round(load_rss, 1), "losses": losses}
    out["torch_threads"] = torch.get_num_threads()
    if side.startswith("lowbit"):
        from lowbit.kernels.cpu.build import active_isa
        out["cpu_isa"] = active_isa()  # LOWBIT_CPU_ISA=avx2 runs the AVX2-only machines' kernels here
    if plan is not None:
        out["checkpointed_layers"] = f"{plan['checkpointed']}/{plan['layers']}"
    if side == "lowbit_cce":
        out["filter_skip_rate"] = round(FILTER_STATS["skipped"] / max(FILTER_STATS["chunks"], 1), 3)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=".cache/models/gemma-3-270m")
    ap.add_argument("--data", default="data/shakespeare/train.txt")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--compute-dtype", choices=sorted(DTYPES), default="bf16",
                    help="both sides' compute dtype (fp32: what compute_dtype auto picks on AVX2-only CPUs)")
    ap.add_argument("--lora-dropout", type=float, default=0.05,
                    help="0 compares loss curves step for step (dropout masks are drawn differently per side)")
    ap.add_argument("--sides", default="transformers_bnb_peft,lowbit",
                    help=f"comma-separated, in run order; from {', '.join(SIDES)}")
    ap.add_argument("--out", default="outputs/bench/train.json")
    ap.add_argument("--worker", choices=SIDES)
    a = ap.parse_args()
    if a.worker:
        print(json.dumps(worker(a.worker, a)))
        return
    sides = [x.strip() for x in a.sides.split(",") if x.strip()]
    bad = [x for x in sides if x not in SIDES]
    if bad or not sides:
        raise SystemExit(f"error: --sides {a.sides!r}: choose from {', '.join(SIDES)}")
    runs = []
    base = [sys.executable, __file__, "--model", a.model, "--data", a.data, "--batch", str(a.batch), "--seq",
            str(a.seq), "--steps", str(a.steps), "--compute-dtype", a.compute_dtype, "--lora-dropout", str(a.lora_dropout)]
    for r in range(a.repeats):
        for side in sides:
            p = subprocess.run(base + ["--worker", side], capture_output=True, text=True)
            if p.returncode:
                raise SystemExit(f"error: {side} worker failed:\n{p.stderr[-3000:]}")
            runs.append(json.loads(p.stdout.strip().splitlines()[-1]))
            print(runs[-1], flush=True)
    keys = ("tokens_per_s", "step_s", "cpu_step_s", "peak_rss_mb", "load_s")
    summary = {side: {k: statistics.median(r[k] for r in runs if r["side"] == side) for k in keys} for side in sides}
    ref = "transformers_bnb_peft" if "transformers_bnb_peft" in sides else sides[0]
    b = summary[ref]
    ratios = {side: {"speedup": round(s["tokens_per_s"] / b["tokens_per_s"], 2),
                     "cpu_speedup": round(b["cpu_step_s"] / s["cpu_step_s"], 2),
                     "peak_rss_ratio": round(s["peak_rss_mb"] / b["peak_rss_mb"], 2)} for side, s in summary.items()}
    curves = {side: [r["losses"] for r in runs if r["side"] == side][0] for side in sides}
    dloss = {side: round(max(abs(x - y) for x, y in zip(c, curves[sides[0]])), 5) for side, c in curves.items()}
    from lowbit.utils.io import write_json
    write_json(a.out, {"settings": vars(a), "runs": runs, "summary": summary, "ratios": ratios,
                       "max_abs_dloss_vs_first_side": dloss})
    print(f"\ncompute dtype {a.compute_dtype}; ratios against {ref}\n")
    print("| side | tokens/s | step s | CPU s/step | peak RSS MB | load s | speedup | CPU speedup | max abs dloss vs "
          f"{sides[0]} |\n|---|---|---|---|---|---|---|---|---|")
    for side in sides:
        s, q = summary[side], ratios[side]
        print(f"| {side} | {s['tokens_per_s']} | {s['step_s']} | {s['cpu_step_s']} | {s['peak_rss_mb']} | "
              f"{s['load_s']} | {q['speedup']}x | {q['cpu_speedup']}x | {dloss[side]} |")


if __name__ == "__main__":
    main()
