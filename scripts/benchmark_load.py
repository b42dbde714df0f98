"""Peak memory and time to load Gemma-3-270M: lowbit 4-bit streaming loader vs transformers
(dense bf16, and BitsAndBytesConfig NF4); weights only, no tokenizer. Each method runs in its own subprocess so its
peak RSS is its own; all run side by side in one invocation.

    .venv/bin/python scripts/benchmark_load.py [--model .cache/models/gemma-3-270m] [--out outputs/bench/load.json]
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

METHODS = ("lowbit_nf4", "transformers_bnb_nf4", "transformers_bf16")


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _model_bytes(model) -> int:
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total


def worker(method: str, model_path: str) -> dict:
    import torch
    base_rss = _rss_mb()  # interpreter + torch + transformers imports
    import transformers  # noqa: F401

    import lowbit.models as lm
    base_rss = _rss_mb()
    t0 = time.perf_counter()
    if method == "lowbit_nf4":
        model = lm.load_4bit_weights(model_path, compute_dtype="bfloat16", progress=False)
    elif method == "transformers_bnb_nf4":
        from transformers import AutoModelForCausalLM, BitsAndBytesConfig
        cfg = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                 bnb_4bit_compute_dtype=torch.bfloat16)
        model = AutoModelForCausalLM.from_pretrained(model_path, quantization_config=cfg, dtype=torch.bfloat16)
    else:
        from transformers import AutoModelForCausalLM
        model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.bfloat16)
    load_s = time.perf_counter() - t0
    return {"method": method, "load_s": round(load_s, 2), "peak_rss_mb": round(_rss_mb(), 1),
            "baseline_rss_mb": round(base_rss, 1), "peak_minus_imports_mb": round(_rss_mb() - base_rss, 1),
            "model_mb": round(_model_bytes(model) / 2**20, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=".cache/models/gemma-3-270m")
    ap.add_argument("--out", default="outputs/bench/load.json")
    ap.add_argument("--worker", choices=METHODS)
    a = ap.parse_args()
    if a.worker:
        print(json.dumps(worker(a.worker, a.model)))
        return
    rows = []
    for m in METHODS:
        out = subprocess.run([sys.executable, __file__, "--worker", m, "--model", a.model], capture_output=True,
                             text=True, check=True).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
        print(rows[-1], flush=True)
    from lowbit.utils.io import write_json
    write_json(a.out, {"model": a.model, "rows": rows})
    print("\n| method | load s | model MB | peak RSS MB | peak − imports MB |\n|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['method']} | {r['load_s']} | {r['model_mb']} | {r['peak_rss_mb']} | {r['peak_minus_imports_mb']} |")


if __name__ == "__main__":
    main()
