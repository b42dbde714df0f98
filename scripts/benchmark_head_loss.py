"""The frozen head's loss + d(loss)/dh for one token chunk: whole-vocabulary softmax in memory (the form before
`ce_and_grad_h`, the anchor) vs the tiled online-softmax pass, side by side in one process.

    .venv/bin/python scripts/benchmark_head_loss.py [--tokens 256] [--vocab 262144] [--hidden 640] [--tiles 1024 4096 8192]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _bench import machine_info, markdown_table, median_ms, write_results  # noqa: E402


def dense(h, w, y):
    """Logits of the whole vocabulary, then max, subtract, exp, sum, divide over them in memory."""
    logits = h @ w.t()
    picked = logits.gather(1, y[:, None]).squeeze(1)
    top = logits.amax(dim=-1, keepdim=True)
    g = logits.sub_(top).exp_()
    denom = g.sum(dim=-1, keepdim=True)
    loss = (top.squeeze(1) + denom.squeeze(1).log() - picked).sum()
    g.div_(denom)
    g[torch.arange(y.numel()), y] -= 1
    return loss, g @ w


def main() -> int:
    from lowbit.recipes.loss import ce_and_grad_h
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--vocab", type=int, default=262144)
    ap.add_argument("--hidden", type=int, default=640)
    ap.add_argument("--tiles", type=int, nargs="*", default=[1024, 4096, 8192])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", default="outputs/bench/head_loss")
    a = ap.parse_args()
    g = torch.Generator().manual_seed(0)
    w = torch.randn(a.vocab, a.hidden, generator=g) * 0.03
    h = torch.randn(a.tokens, a.hidden, generator=g)
    y = torch.randint(0, a.vocab, (a.tokens,), generator=g)
    loss0, gh0 = dense(h, w, y)
    rows = [{"form": "dense (anchor)", "ms": median_ms(lambda: dense(h, w, y), a.repeats, 1, cold=False),
             "vs dense": 1.0, "max rel d(loss)/dh diff": 0.0}]
    for t in a.tiles:
        loss, gh = ce_and_grad_h(h, w, y, tile=t)
        ms = median_ms(lambda t=t: ce_and_grad_h(h, w, y, tile=t), a.repeats, 1, cold=False)
        rows.append({"form": f"tiled, {t} rows", "ms": ms, "vs dense": ms / rows[0]["ms"],
                     "max rel d(loss)/dh diff": ((gh - gh0).abs().max() / gh0.abs().max()).item(),
                     "rel loss diff": abs((loss - loss0) / loss0).item()})
    write_results(rows, a.out, {**machine_info(), "settings": vars(a)})
    print(markdown_table(rows, ["form", "ms", "vs dense", "max rel d(loss)/dh diff"]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
