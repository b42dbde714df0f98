"""Batched self-generation (LLM-QAT): a first token drawn from the vocabulary, a few greedy
tokens, then temperature / top-k / top-p sampling, with the model's KV cache.

Every random draw of sequence `i` comes from its own generator seeded from (seed, i), so a
sequence does not depend on which others share its batch or on where a run was resumed; the
batch shape only changes floating-point rounding (runs that form the same batches, as a
resumed run does, are bit-identical).
"""
from __future__ import annotations

import hashlib
import inspect
from dataclasses import dataclass

import torch

from lowbit.errors import ConfigError
from lowbit.methods.data_gen.config import SamplingConfig


def sequence_generator(seed: int, index: int) -> torch.Generator:
    """A CPU generator for sequence `index`, independent of every other index."""
    digest = hashlib.sha256(f"lowbit-generate:{seed}:{index}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)


def first_token_ids(tokenizer, vocab_size: int) -> torch.Tensor:
    """Ids a sequence may start with: the model's vocabulary minus special tokens (BOS/EOS/pad,
    Gemma's <unused*>, image markers...) and ids the tokenizer does not know."""
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    special.update(i for i, t in getattr(tokenizer, "added_tokens_decoder", {}).items() if t.special)
    n = min(vocab_size, len(tokenizer))
    keep = torch.ones(n, dtype=torch.bool)
    keep[[i for i in special if i < n]] = False
    ids = keep.nonzero().squeeze(1)
    if ids.numel() == 0:
        raise ConfigError("the tokenizer has no non-special token to start a sequence with")
    return ids


def sample_next(logits: torch.Tensor, u: torch.Tensor, temperature: float = 1.0, top_k: int = 0,
                top_p: float = 1.0) -> torch.Tensor:
    """One token per row from softmax(logits / temperature) restricted to the top-k ids and to the
    smallest set whose probability reaches top_p, by inverting the CDF at u in [0, 1) — one
    uniform per row, so each row's draw depends on its own generator only."""
    z = logits.float() / temperature
    if 0 < top_k < z.shape[-1]:
        vals, ids = z.topk(top_k, dim=-1)            # sorted, largest first
    else:
        vals, ids = z.sort(dim=-1, descending=True)
    probs = torch.softmax(vals, dim=-1)
    if top_p < 1.0:
        # keep a token if the mass of the tokens ranked above it is still below top_p (keeps >= 1)
        probs = probs * ((probs.cumsum(-1) - probs) < top_p)
    cdf = probs.cumsum(-1)
    pick = torch.searchsorted(cdf, (u.to(cdf.device, cdf.dtype) * cdf[:, -1])[:, None], right=True)
    last_kept = (probs > 0).sum(-1, keepdim=True) - 1  # rounding at u*total == total must not pick a dropped id
    return ids.gather(1, torch.minimum(pick, last_kept)).squeeze(1)


def draw_starts(indices: list[int], s: SamplingConfig, first_ids: torch.Tensor):
    """(per-sequence generators, first tokens, number of greedy tokens) for `indices`."""
    gens = [sequence_generator(s.seed, i) for i in indices]
    if s.first_token == "every_id":  # LLM-QAT's sweep: sequence i starts with the i-th allowed id (cycling)
        first = first_ids[torch.tensor(indices) % first_ids.numel()]
    else:
        first = torch.stack([first_ids[torch.randint(first_ids.numel(), (), generator=g)] for g in gens])
    n_greedy = torch.tensor([int(torch.randint(s.greedy_min, s.greedy_max + 1, (), generator=g)) for g in gens])
    return gens, first, n_greedy


@dataclass
class Generated:
    index: int
    ids: list[int]                               # first token .. last (EOS included if hit); BOS not stored
    topk_values: torch.Tensor | None = None      # [positions, k] fp16 teacher logits, position j predicts x[j+1]
    topk_indices: torch.Tensor | None = None     # [positions, k] int32 token ids


def _cache_name(model) -> str:
    """The KV-cache argument/output name: `cache` from transformers 5.24 (where `past_key_values` is
    deprecated, to be removed in 5.40), `past_key_values` before."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


@torch.no_grad()
def generate_batch(model, indices: list[int], s: SamplingConfig, first_ids: torch.Tensor, bos_id: int | None,
                   eos_id: int | None, topk: int = 0) -> list[Generated]:
    """Generate the sequences `indices` together (one forward per position, KV cache).

    Sequences are conditioned on BOS when `s.add_bos` and bos_id is set. With topk > 0 the
    teacher's top-k logits are kept for every position of [BOS] + ids except the last.
    """
    device = next(model.parameters()).device
    gens, first, n_greedy = draw_starts(indices, s, first_ids)
    prefix = [bos_id] if s.add_bos and bos_id is not None else []
    x = torch.cat([torch.tensor(prefix, dtype=torch.long).expand(len(indices), -1), first[:, None]], 1).to(device)
    kv = _cache_name(model)
    out = model(input_ids=x, use_cache=True, logits_to_keep=0 if topk else 1)
    cache, logits = out[kv], out.logits
    kept_v, kept_i = [], []

    def keep_topk(lg):
        v, i = lg.topk(topk, dim=-1)
        kept_v.append(v.to("cpu", torch.float16))
        kept_i.append(i.to("cpu", torch.int32))

    if topk:
        keep_topk(logits)
    tokens = [first.to(device)]
    n_greedy = n_greedy.to(device)
    done = torch.zeros(len(indices), dtype=torch.bool, device=device)
    for step in range(1, s.max_len):
        last = logits[:, -1]
        greedy = step <= n_greedy
        nxt = last.argmax(-1)
        sampled = (~greedy).nonzero().squeeze(1).tolist()
        if sampled:
            u = torch.stack([torch.rand((), generator=gens[r]) for r in sampled])
            nxt[sampled] = sample_next(last[sampled], u, s.temperature, s.top_k, s.top_p)
        tokens.append(nxt)
        if s.stop_at_eos and eos_id is not None:
            done |= nxt == eos_id
        if step == s.max_len - 1 or bool(done.all()):
            break
        out = model(input_ids=nxt[:, None], use_cache=True, **{kv: cache})
        cache, logits = out[kv], out.logits
        if topk:
            keep_topk(logits)
    ids = torch.stack(tokens, 1).cpu()
    if topk:
        vals, idxs = torch.cat(kept_v, 1), torch.cat(kept_i, 1)      # [B, positions, k]
    results = []
    for r, index in enumerate(indices):
        row = ids[r].tolist()
        if s.stop_at_eos and eos_id is not None and eos_id in row:
            row = row[:row.index(eos_id) + 1]
        g = Generated(index, row)
        if topk:
            n_pos = len(prefix) + len(row) - 1
            g.topk_values, g.topk_indices = vals[r, :n_pos].clone(), idxs[r, :n_pos].clone()
        results.append(g)
    return results
