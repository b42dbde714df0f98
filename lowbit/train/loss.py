"""Causal-LM loss computed in token chunks, so a 262k vocabulary never materializes
[batch, seq, vocab] fp32 logits: each chunk's logits are made, reduced, and recomputed
in backward (checkpointed) instead of stored."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

IGNORE = -100


def _unwrap(model):
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _chunk_nll(h: torch.Tensor, weight: torch.Tensor, y: torch.Tensor, softcap: float | None) -> torch.Tensor:
    logits = (h @ weight.t()).float()
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    return F.cross_entropy(logits, y, reduction="sum")


def hidden_and_head(model, input_ids, attention_mask=None):
    """Final hidden states from the decoder, and the lm_head weight."""
    base = _unwrap(model)
    out = base.get_decoder()(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    return out.last_hidden_state, base.get_output_embeddings().weight, getattr(base.config, "final_logit_softcapping",
                                                                                None)


def nll_sum(model, input_ids, labels, attention_mask=None, chunk_tokens: int = 256) -> tuple[torch.Tensor, int]:
    """(sum of next-token negative log-likelihoods over labelled positions, their count)."""
    h, w, softcap = hidden_and_head(model, input_ids, attention_mask)
    y = labels[:, 1:].reshape(-1)
    h = h[:, :-1].reshape(-1, h.shape[-1])
    keep = y != IGNORE
    h, y = h[keep], y[keep]
    total = h.new_zeros((), dtype=torch.float32)
    for i in range(0, y.numel(), chunk_tokens):
        hc, yc = h[i:i + chunk_tokens], y[i:i + chunk_tokens]
        if torch.is_grad_enabled() and h.requires_grad:
            total = total + checkpoint(_chunk_nll, hc, w, yc, softcap, use_reentrant=False)
        else:
            total = total + _chunk_nll(hc, w, yc, softcap)
    return total, int(y.numel())


def causal_lm_loss(model, input_ids, labels, attention_mask=None, chunk_tokens: int = 256) -> torch.Tensor:
    """Mean next-token cross entropy (fp32), equal to HF's `model(labels=...).loss`."""
    total, n = nll_sum(model, input_ids, labels, attention_mask, chunk_tokens)
    return total / max(n, 1)


@torch.no_grad()
def perplexity(model, examples: list[dict], collate, batch_size: int = 4, chunk_tokens: int = 256,
               desc: str = "eval") -> float:
    from tqdm.auto import tqdm
    was_training = model.training
    model.eval()
    nll, n = 0.0, 0
    device = next(model.parameters()).device
    for i in tqdm(range(0, len(examples), batch_size), desc=desc, leave=False):
        b = {k: v.to(device) for k, v in collate(examples[i:i + batch_size]).items()}
        s, c = nll_sum(model, b["input_ids"], b["labels"], b["attention_mask"], chunk_tokens)
        nll += s.item()
        n += c
    model.train(was_training)
    return math.exp(nll / max(n, 1))
