"""QLoRA training-step speed and memory: lowbit vs transformers + bitsandbytes + peft.

Same model (Gemma-3-270M), same LoRA (r=16, alpha=32, all-linear), NF4 + double quant,
batch 4 x 256 tokens of Shakespeare, bf16 compute, gradient checkpointing, AdamW.
Each side runs in its own subprocess (its peak RSS is its own), one after the other in
one invocation, `--repeats` times interleaved; medians are reported.

Baseline = what the transformers/peft docs do: BitsAndBytesConfig(nf4, double quant, bf16
compute) + prepare_model_for_kbit_training + get_peft_model, loss from model(labels=...).
lowbit = lowbit.models.load_model + add_lora + the trainer's chunked loss.

    .venv/bin/python scripts/benchmark_train.py [--steps 6] [--repeats 2] [--out outputs/bench/train.json]
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

SIDES = ("transformers_bnb_peft", "lowbit")


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
    t0 = time.perf_counter()
    if side == "lowbit":
        from lowbit.models import load_model
        from lowbit.modules.lora import add_lora, prepare_for_kbit_training
        from lowbit.recipes.loss import causal_lm_loss
        model, tok = load_model(a.model, compute_dtype="bfloat16", progress=False)
        prepare_for_kbit_training(model, gradient_checkpointing=True)
        model = add_lora(model, r=16, alpha=32, dropout=0.05, target_modules="all-linear")

        def loss_fn(x):
            return causal_lm_loss(model, input_ids=x, labels=x)
    else:
        from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
        from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig
        cfg = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                 bnb_4bit_compute_dtype=torch.bfloat16)
        model = AutoModelForCausalLM.from_pretrained(a.model, quantization_config=cfg, dtype=torch.bfloat16)
        tok = AutoTokenizer.from_pretrained(a.model)
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True)
        model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules="all-linear",
                                                 task_type="CAUSAL_LM"))

        def loss_fn(x):
            return model(input_ids=x, labels=x).loss
    load_s = time.perf_counter() - t0
    load_rss = _rss_mb()
    x = _batch(tok, a.batch, a.seq, Path(a.data))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    model.train()
    times, losses = [], []
    for step in range(a.steps + 1):  # step 0 is warm-up
        t = time.perf_counter()
        loss = loss_fn(x)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step:
            times.append(time.perf_counter() - t)
        losses.append(round(loss.item(), 4))
    step_s = statistics.median(times)
    return {"side": side, "load_s": round(load_s, 2), "step_s": round(step_s, 3),
            "tokens_per_s": round(a.batch * a.seq / step_s, 1), "peak_rss_mb": round(_rss_mb(), 1),
            "rss_after_load_mb": round(load_rss, 1), "losses": losses}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=".cache/models/gemma-3-270m")
    ap.add_argument("--data", default="data/shakespeare/train.txt")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--out", default="outputs/bench/train.json")
    ap.add_argument("--worker", choices=SIDES)
    a = ap.parse_args()
    if a.worker:
        print(json.dumps(worker(a.worker, a)))
        return
    runs = []
    base = [sys.executable, __file__, "--model", a.model, "--data", a.data, "--batch", str(a.batch), "--seq",
            str(a.seq), "--steps", str(a.steps)]
    for r in range(a.repeats):
        for side in SIDES:
            p = subprocess.run(base + ["--worker", side], capture_output=True, text=True)
            if p.returncode:
                raise SystemExit(f"error: {side} worker failed:\n{p.stderr[-3000:]}")
            runs.append(json.loads(p.stdout.strip().splitlines()[-1]))
            print(runs[-1], flush=True)
    summary = {}
    for side in SIDES:
        rs = [r for r in runs if r["side"] == side]
        summary[side] = {k: statistics.median(r[k] for r in rs)
                         for k in ("tokens_per_s", "peak_rss_mb", "load_s", "step_s")}
    b, o = summary["transformers_bnb_peft"], summary["lowbit"]
    ratios = {"speedup": round(o["tokens_per_s"] / b["tokens_per_s"], 2),
              "peak_rss_ratio": round(o["peak_rss_mb"] / b["peak_rss_mb"], 2)}
    from lowbit.utils.io import write_json
    write_json(a.out, {"settings": vars(a), "runs": runs, "summary": summary, "ratios": ratios})
    print("\n| side | tokens/s | step s | peak RSS MB | load s |\n|---|---|---|---|---|")
    for side in SIDES:
        s = summary[side]
        print(f"| {side} | {s['tokens_per_s']} | {s['step_s']} | {s['peak_rss_mb']} | {s['load_s']} |")
    print(f"\nlowbit / baseline: {ratios['speedup']}x tokens/s, {ratios['peak_rss_ratio']}x peak RSS")


if __name__ == "__main__":
    main()
