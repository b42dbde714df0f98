"""Data generation throughput on Gemma-3-270M (CPU; compute dtype "auto": bf16 where the CPU has
native bf16, else fp32): lowbit's batched KV-cache sampler
(`lowbit.methods.data_gen.sampler.generate_batch`, batch 16) vs the same sequences one at a time with
`model.generate`. Same teacher, same settings (greedy 3-5 tokens then temperature 1.0,
top-k 50), same count: every sequence is forced to its full length (no EOS stop), so both
produce exactly n_seqs x max_len tokens.

    .venv/bin/python scripts/benchmark_data_gen.py [--n-seqs 16] [--max-len 64] [--out outputs/bench/data_gen]
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _bench import machine_info, markdown_table, write_results  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=".cache/models/gemma-3-270m")
    ap.add_argument("--n-seqs", type=int, default=16)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--max-len", type=int, default=64, help="tokens per sequence, first token included")
    ap.add_argument("--out", default="outputs/bench/data_gen")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    from transformers import AutoTokenizer

    from lowbit.methods.data_gen.config import SamplingConfig
    from lowbit.methods.data_gen.sampler import draw_starts, first_token_ids, generate_batch
    from lowbit.models.load import load_4bit_weights
    model = load_4bit_weights(a.model, load_in_4bit=False, compute_dtype="auto", progress=False).eval()
    tok = AutoTokenizer.from_pretrained(a.model)
    s = SamplingConfig(max_len=a.max_len, top_k=50, temperature=1.0, stop_at_eos=False, seed=0)
    allowed = first_token_ids(tok, model.config.vocab_size)
    idx = list(range(a.n_seqs))
    generate_batch(model, idx[:2], SamplingConfig(max_len=4, stop_at_eos=False), allowed, tok.bos_token_id,
                   tok.eos_token_id)  # warm-up (allocator, kernels)

    t = time.perf_counter()
    ours = []
    for i in range(0, len(idx), a.batch_size):
        ours += generate_batch(model, idx[i:i + a.batch_size], s, allowed, tok.bos_token_id, tok.eos_token_id)
    t_ours = time.perf_counter() - t
    print(f"lowbit batched: {t_ours:.1f} s", flush=True)
    n_ours = sum(len(g.ids) for g in ours)

    # model.generate, one sequence at a time, from the same [BOS, first token] prompts; its sampler has no
    # per-step greedy prefix, so it samples from step 1 (same cost per token)
    _, first, _ = draw_starts(idx, s, allowed)
    t = time.perf_counter()
    n_hf = 0
    torch.manual_seed(0)
    for f in first.tolist():
        x = torch.tensor([[tok.bos_token_id, f]])
        y = model.generate(x, attention_mask=torch.ones_like(x), do_sample=True, temperature=1.0, top_k=50,
                           top_p=1.0, max_new_tokens=a.max_len - 1, min_new_tokens=a.max_len - 1,
                           pad_token_id=tok.pad_token_id)
        n_hf += y.shape[1] - 1          # BOS not counted, as in ours
    t_hf = time.perf_counter() - t
    assert n_hf == n_ours == a.n_seqs * a.max_len, (n_hf, n_ours)

    rows = [{"method": f"lowbit generate_batch (batch {a.batch_size}, KV cache)", "seqs": a.n_seqs,
             "tokens": n_ours, "seconds": round(t_ours, 2), "tokens_per_s": round(n_ours / t_ours, 1)},
            {"method": "transformers model.generate, one at a time", "seqs": a.n_seqs, "tokens": n_hf,
             "seconds": round(t_hf, 2), "tokens_per_s": round(n_hf / t_hf, 1)}]
    ratio = (n_ours / t_ours) / (n_hf / t_hf)
    meta = {**machine_info(), "model": a.model, "dtype": str(next(model.parameters()).dtype), "max_len": a.max_len,
            "ratio": round(ratio, 2),
            "command": " ".join(["scripts/benchmark_data_gen.py"] + sys.argv[1:])}
    write_results(rows, a.out, meta)
    print(markdown_table(rows, ["method", "seqs", "tokens", "seconds", "tokens_per_s"]))
    print(f"\nbatched / one-at-a-time tokens/s: {ratio:.2f}x (target >= 4x)")


if __name__ == "__main__":
    main()
