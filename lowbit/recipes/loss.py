"""Causal-LM loss computed in token chunks, so a 262k vocabulary never materializes
[batch, seq, vocab] fp32 logits.

With a frozen lm_head (the QLoRA case) each chunk's gradient w.r.t. the hidden states is
computed in the forward pass, right after its logits, and kept (tokens x hidden, small):
backward is then one multiply, and the vocabulary projection — the largest matmul in a
small-model step — runs twice per step instead of three times. With a trainable lm_head
the chunks are checkpointed and recomputed in backward instead."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from lowbit.utils.batching import IGNORE_INDEX
from lowbit.utils.modules import unwrap_peft


def _chunk_nll(h: torch.Tensor, weight: torch.Tensor, y: torch.Tensor, softcap: float | None) -> torch.Tensor:
    logits = (h @ weight.t()).float()
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    return F.cross_entropy(logits, y, reduction="sum")


class _FrozenHeadCE(torch.autograd.Function):
    """sum of CE over rows of h @ W.T (W frozen); d(loss)/dh precomputed chunk by chunk."""

    @staticmethod
    def forward(ctx, h, weight, y, softcap, chunk_tokens):
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        grad_h = torch.empty_like(h)
        for i in range(0, y.numel(), chunk_tokens):
            hc, yc = h[i:i + chunk_tokens], y[i:i + chunk_tokens]
            logits = (hc @ weight.t()).float()
            if softcap:
                t = torch.tanh(logits.div_(softcap))
                logits = t * softcap
            # one exp pass serves both the loss (log-sum-exp) and its gradient (softmax)
            picked = logits.gather(1, yc[:, None]).squeeze(1)
            top = logits.amax(dim=-1, keepdim=True)
            g = logits.sub_(top).exp_()
            denom = g.sum(dim=-1, keepdim=True)
            total += (top.squeeze(1) + denom.squeeze(1).log() - picked).sum()
            g.div_(denom)                                # softmax; dCE/dlogits = softmax - onehot
            g[torch.arange(yc.numel(), device=g.device), yc] -= 1
            if softcap:
                g *= 1 - t * t                           # d(softcap*tanh(z/softcap))/dz
            grad_h[i:i + chunk_tokens] = (g.to(weight.dtype) @ weight).to(h.dtype)
        ctx.save_for_backward(grad_h)
        return total

    @staticmethod
    def backward(ctx, grad_total):
        (grad_h,) = ctx.saved_tensors
        return grad_h * grad_total.to(grad_h.dtype), None, None, None, None


def hidden_and_head(model, input_ids, attention_mask=None, position_ids=None):
    """Final hidden states from the decoder, and the lm_head weight."""
    base = unwrap_peft(model)
    out = base.get_decoder()(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                             use_cache=False)
    return out.last_hidden_state, base.get_output_embeddings().weight, getattr(base.config, "final_logit_softcapping",
                                                                                None)


def nll_sum(model, input_ids, labels, attention_mask=None, chunk_tokens: int = 256,
            position_ids=None) -> tuple[torch.Tensor, int]:
    """(sum of next-token negative log-likelihoods over labelled positions, their count)."""
    h, w, softcap = hidden_and_head(model, input_ids, attention_mask, position_ids)
    y = labels[:, 1:].reshape(-1)
    h = h[:, :-1].reshape(-1, h.shape[-1])
    keep = y != IGNORE_INDEX
    h, y = h[keep], y[keep]
    if torch.is_grad_enabled() and h.requires_grad and not w.requires_grad:
        return _FrozenHeadCE.apply(h, w, y, softcap, chunk_tokens), int(y.numel())
    total = h.new_zeros((), dtype=torch.float32)
    for i in range(0, y.numel(), chunk_tokens):
        hc, yc = h[i:i + chunk_tokens], y[i:i + chunk_tokens]
        if torch.is_grad_enabled() and h.requires_grad:
            total = total + checkpoint(_chunk_nll, hc, w, yc, softcap, use_reentrant=False)
        else:
            total = total + _chunk_nll(hc, w, yc, softcap)
    return total, int(y.numel())


def causal_lm_loss(model, input_ids, labels, attention_mask=None, chunk_tokens: int = 256,
                   position_ids=None) -> torch.Tensor:
    """Mean next-token cross entropy (fp32), equal to HF's `model(labels=...).loss`."""
    total, n = nll_sum(model, input_ids, labels, attention_mask, chunk_tokens, position_ids)
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
        b = _to(collate(examples[i:i + batch_size]), device)
        s, c = nll_sum(model, b["input_ids"], b["labels"], b["attention_mask"], chunk_tokens, b.get("position_ids"))
        nll += s.item()
        n += c
    model.train(was_training)
    return math.exp(nll / max(n, 1))


def _to(batch: dict, device) -> dict:
    return {k: ({kk: vv.to(device) for kk, vv in v.items()} if isinstance(v, dict) else v.to(device))
            for k, v in batch.items()}
