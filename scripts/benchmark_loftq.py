"""LoftQ benchmark on Gemma-3-270M: held-out Hamlet perplexity of the bf16 model, the NF4 base
(zero-init QLoRA = the base alone) and the NF4 base + LoftQ-initialized LoRA (no training), plus
LoftQ's init time, peak RSS and per-layer weight errors. Each method runs in its own subprocess
so its peak RSS is its own. Writes JSON + PNG under outputs/bench/.

    .venv/bin/python scripts/benchmark_loftq.py [--r 16 --alpha 32 --iters 5 --svd lowrank]
        [--eval-tokens 16384] [--out outputs/bench/loftq.json]
"""
from __future__ import annotations

import argparse
import json
import math
import resource
import subprocess
import sys
import time
from pathlib import Path

METHODS = ("bf16", "nf4", "nf4_loftq")


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _eval_ids(tok, path: str, n_tokens: int, seq: int):
    import torch
    ids = tok(Path(path).read_text(), add_special_tokens=False).input_ids[: n_tokens]
    n = len(ids) // seq
    if n == 0:
        raise SystemExit(f"error: {path} has fewer than {seq} tokens")
    x = torch.tensor(ids[: n * seq]).view(n, seq)
    bos = torch.full((n, 1), tok.bos_token_id)
    return torch.cat([bos, x], 1)  # each window starts with BOS, as the model was trained


def perplexity(model, ids, desc: str) -> float:
    import torch
    from tqdm.auto import tqdm

    from lowbit.train.loss import nll_sum
    nll, n = 0.0, 0
    with torch.no_grad():
        for row in tqdm(ids, desc=desc, unit="window"):
            x = row[None]
            labels = x.clone()
            labels[:, 0] = -100  # the BOS is not predicted
            s, c = nll_sum(model, x, labels, None, 512)
            nll += s.item()
            n += c
    return math.exp(nll / n)


def worker(method: str, a) -> dict:
    import torch
    torch.manual_seed(0)
    import transformers  # noqa: F401

    import lowbit.export.loftq  # noqa: F401
    import lowbit.models  # noqa: F401
    base_rss = _rss_mb()
    out: dict = {"method": method}
    t0 = time.perf_counter()
    if method == "bf16":
        from transformers import AutoModelForCausalLM, AutoTokenizer
        model = AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.bfloat16).to(torch.float32).eval()
        tok = AutoTokenizer.from_pretrained(a.model)
    elif method == "nf4":
        from lowbit.models import load_model
        model, tok = load_model(a.model, compute_dtype="float32", blocksize=a.blocksize, progress=False)
    else:
        from lowbit.export.loftq import loftq_init
        model, tok, res = loftq_init(a.model, r=a.r, alpha=a.alpha, dropout=0.0, iters=a.iters, svd=a.svd,
                                     blocksize=a.blocksize, compute_dtype="float32")
        out["loftq"] = res.report()
        out["loftq_init_s"] = round(res.seconds, 2)
        model.eval()
    out["load_s"] = round(time.perf_counter() - t0, 2)
    out["peak_rss_after_load_mb"] = round(_rss_mb(), 1)
    out["baseline_rss_mb"] = round(base_rss, 1)
    ids = _eval_ids(tok, a.heldout, a.eval_tokens, a.seq)
    out["eval_tokens"] = int(ids.numel() - ids.shape[0])
    t1 = time.perf_counter()
    out["ppl"] = perplexity(model, ids, f"ppl {method}")
    out["eval_s"] = round(time.perf_counter() - t1, 2)
    out["peak_rss_mb"] = round(_rss_mb(), 1)
    return out


def plot(res: dict, png: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    names = [m for m in METHODS if m in res["methods"]]
    ppl = [res["methods"][m]["ppl"] for m in names]
    ax1.bar(names, ppl, color=["tab:gray", "tab:red", "tab:green"][: len(names)])
    for i, v in enumerate(ppl):
        ax1.text(i, v, f"{v:.2f}", ha="center", va="bottom")
    ax1.set_ylim(min(ppl) * 0.95, max(ppl) * 1.03)
    ax1.set_ylabel("held-out Hamlet perplexity")
    ax1.set_title(f"Gemma-3-270M, LoftQ r={res['args']['r']} α={res['args']['alpha']} (no training)")
    lq = res["methods"].get("nf4_loftq", {}).get("loftq")
    if lq:
        z = [l["zero_init_error"] for l in lq["per_layer"]]
        f = [l["loftq_error"] for l in lq["per_layer"]]
        ax2.plot(z, label="NF4, B=0 (zero init)")
        ax2.plot(f, label=f"NF4 + LoftQ (T={lq['iters']})")
        ax2.set_xlabel("Linear layer (load order)")
        ax2.set_ylabel("‖W − deq(Q) − sBA‖ / ‖W‖")
        ax2.legend()
    fig.tight_layout()
    fig.savefig(png, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=".cache/models/gemma-3-270m")
    ap.add_argument("--heldout", default="data/shakespeare/heldout_hamlet.txt")
    ap.add_argument("--r", type=int, default=16)
    ap.add_argument("--alpha", type=float, default=32)
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--svd", choices=("full", "lowrank"), default="lowrank")
    ap.add_argument("--blocksize", type=int, default=64)
    ap.add_argument("--eval-tokens", type=int, default=16384)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--out", default="outputs/bench/loftq.json")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--worker", choices=METHODS)
    a = ap.parse_args()
    if a.worker:
        print("RESULT " + json.dumps(worker(a.worker, a)), flush=True)
        return
    for p in (a.model, a.heldout):
        if not Path(p).exists():
            print(f"error: {p} not found; run scripts/prepare_model.py / scripts/prepare_data.py first", file=sys.stderr)
            sys.exit(2)
    res = {"args": vars(a), "methods": {}}
    passthrough = [x for x in sys.argv[1:]]
    for m in a.methods.split(","):
        proc = subprocess.run([sys.executable, __file__, *passthrough, "--worker", m], stdout=subprocess.PIPE,
                              text=True)
        line = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
        if proc.returncode or not line:
            print(f"error: method {m} failed (exit {proc.returncode})", file=sys.stderr)
            sys.exit(1)
        res["methods"][m] = json.loads(line[-1][7:])
        print(m, {k: v for k, v in res["methods"][m].items() if k != "loftq"}, flush=True)
    ms = res["methods"]
    if all(k in ms for k in METHODS):
        gap = ms["nf4"]["ppl"] - ms["bf16"]["ppl"]
        res["nf4_gap"] = gap
        res["loftq_gap_recovered"] = (ms["nf4"]["ppl"] - ms["nf4_loftq"]["ppl"]) / gap if gap > 0 else None
        print(f"NF4 gap {gap:.4f} ppl; LoftQ recovers {100 * (res['loftq_gap_recovered'] or 0):.1f}%")
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from lowbit.utils.io import write_json
    out = Path(a.out)
    write_json(out, res)
    plot(res, out.with_suffix(".png"))
    print(f"wrote {out} and {out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
