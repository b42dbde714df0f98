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


FILTER_BLOCK = 256  # vocabulary rows per block of the filtered d(loss)/dh matmul


def filtered_grad_h(g: torch.Tensor, weight: torch.Tensor, y: torch.Tensor, eps: float,
                    block: int = FILTER_BLOCK) -> tuple[torch.Tensor, float]:
    """g @ weight, skipping each (token, vocabulary block) whose |g| entries are all below eps
    (Cut Cross-Entropy's gradient filter); the block holding a token's label is always kept.

    Returns (d(loss)/dh rows, fraction of (token, block) pairs skipped). The error is at most
    eps · (skipped entries) · max|W| per element; measured on Gemma-3-270M it is far above
    fp32 rounding at CCE's 2^-12 (BENCHMARKS.md "QLoRA training step at fp32 compute"), so it is opt-in."""
    t, v = g.shape
    nb = -(-v // block)
    big = g.abs() >= eps
    if v % block:
        big = torch.nn.functional.pad(big, (0, nb * block - v))
    keep = big.view(t, nb, block).any(-1)
    keep[torch.arange(t, device=g.device), y // block] = True
    out = torch.zeros(t, weight.shape[1], dtype=weight.dtype, device=weight.device)
    rows_kept = keep.sum(0).tolist()
    for b in (i for i, n in enumerate(rows_kept) if n):
        sl = slice(b * block, min(v, (b + 1) * block))
        if rows_kept[b] == t:
            out.addmm_(g[:, sl], weight[sl])
        else:
            rows = keep[:, b].nonzero().squeeze(1)
            out.index_add_(0, rows, g[rows, sl] @ weight[sl])
    return out, 1 - sum(rows_kept) / (t * nb)


FILTER_STATS = {"skipped": 0.0, "chunks": 0}  # running skip rate of the filter (for benchmarks)


def _filtered_chunk(h, weight, y, softcap, eps):
    """The dense form (whole-vocabulary softmax in memory), which the gradient filter needs to see."""
    logits = (h @ weight.t()).float()
    if softcap:
        t = torch.tanh(logits.div_(softcap))
        logits = t * softcap
    picked = logits.gather(1, y[:, None]).squeeze(1)
    top = logits.amax(dim=-1, keepdim=True)
    g = logits.sub_(top).exp_()
    denom = g.sum(dim=-1, keepdim=True)
    loss = (top.squeeze(1) + denom.squeeze(1).log() - picked).sum()
    g.div_(denom)                                        # softmax; dCE/dlogits = softmax - onehot
    g[torch.arange(y.numel(), device=g.device), y] -= 1
    if softcap:
        g *= 1 - t * t
    gh, skipped = filtered_grad_h(g.to(weight.dtype), weight, y, eps)
    FILTER_STATS["skipped"] += skipped
    FILTER_STATS["chunks"] += 1
    return loss, gh


VOCAB_TILE = 4096  # vocabulary rows per tile of the frozen head's fused loss + gradient (tokens x tile stays in cache)


def ce_and_grad_h(h: torch.Tensor, weight: torch.Tensor, y: torch.Tensor, softcap: float | None = None,
                  tile: int = VOCAB_TILE) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of CE over the rows of h @ W.T, its gradient w.r.t. h) in one pass over vocabulary tiles.

    Online softmax (as flash attention): each tile's logits are exponentiated against the running row max
    while still in cache, and the gradient's Σ_v p_v W_v is accumulated unnormalized and rescaled when the
    max moves, so the [tokens, vocab] logits never go out to memory and pass over it five more times. The
    label's −W_y term is added at the end. Same two matmuls as the dense form; sums in another order."""
    n = y.numel()
    f32 = dict(dtype=torch.float32, device=h.device)
    m, s = torch.full((n, 1), -math.inf, **f32), torch.zeros((n, 1), **f32)
    acc, picked, dcap = torch.zeros((n, h.shape[1]), **f32), torch.zeros(n, **f32), torch.ones(n, **f32)
    fused = h.dtype == weight.dtype == torch.float32
    for v0 in range(0, weight.shape[0], tile):
        wt = weight[v0:v0 + tile]
        z = (h @ wt.t()).float()
        if softcap:
            t = torch.tanh(z.div_(softcap))
            z = t * softcap
        rows = ((y >= v0) & (y < v0 + wt.shape[0])).nonzero().squeeze(1)
        if rows.numel():  # the label's logit, as the matmul computed it
            picked[rows] = z[rows, y[rows] - v0]
            if softcap:
                dcap[rows] = 1 - t[rows, y[rows] - v0] ** 2
        m_new = torch.maximum(m, z.amax(dim=1, keepdim=True))
        e = z.sub_(m_new).exp_()
        rescale = (m - m_new).exp_()
        s.mul_(rescale).add_(e.sum(dim=1, keepdim=True))
        if softcap:
            e.mul_(1 - t * t)                            # d(softcap*tanh(z/softcap))/dz
        acc.mul_(rescale)
        if fused:
            acc.addmm_(e, wt)
        else:
            acc += (e.to(weight.dtype) @ wt).float()
        m = m_new
    loss = (m.squeeze(1) + s.squeeze(1).log() - picked).sum()
    return loss, acc.div_(s).sub_(weight[y].float() * dcap[:, None])


class _FrozenHeadCE(torch.autograd.Function):
    """sum of CE over rows of h @ W.T (W frozen); d(loss)/dh precomputed chunk by chunk."""

    @staticmethod
    def forward(ctx, h, weight, y, softcap, chunk_tokens, grad_filter=0.0):
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        grad_h = torch.empty_like(h)
        for i in range(0, y.numel(), chunk_tokens):
            hc, yc = h[i:i + chunk_tokens], y[i:i + chunk_tokens]
            if grad_filter:
                loss, gh = _filtered_chunk(hc, weight, yc, softcap, grad_filter)
            else:
                loss, gh = ce_and_grad_h(hc, weight, yc, softcap)
            total += loss
            grad_h[i:i + chunk_tokens] = gh.to(h.dtype)
        ctx.save_for_backward(grad_h)
        return total

    @staticmethod
    def backward(ctx, grad_total):
        (grad_h,) = ctx.saved_tensors
        return grad_h * grad_total.to(grad_h.dtype), None, None, None, None, None


def decoder_and_head(model, input_ids, attention_mask=None, position_ids=None, output_hidden_states=False):
    """(decoder output, final hidden states in the head's dtype, lm_head weight, logit softcap)."""
    base = unwrap_peft(model)
    out = base.get_decoder()(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                             use_cache=False, output_hidden_states=output_hidden_states)
    w = base.get_output_embeddings().weight
    # an fp32 residual stream (keep_residual_in_fp32) meets a half-precision head as in HF's forward
    return out, out.last_hidden_state.to(w.dtype), w, getattr(base.config, "final_logit_softcapping", None)


def hidden_and_head(model, input_ids, attention_mask=None, position_ids=None):
    """Final hidden states from the decoder (in the head's dtype), the lm_head weight, the logit softcap."""
    return decoder_and_head(model, input_ids, attention_mask, position_ids)[1:]


def nll_sum(model, input_ids, labels, attention_mask=None, chunk_tokens: int = 256,
            position_ids=None, grad_filter: float = 0.0) -> tuple[torch.Tensor, int]:
    """(sum of next-token negative log-likelihoods over labelled positions, their count).

    grad_filter > 0 (frozen head only): skip d(loss)/dh blocks whose softmax entries are all below it."""
    h, w, softcap = hidden_and_head(model, input_ids, attention_mask, position_ids)
    y = labels[:, 1:].reshape(-1)
    h = h[:, :-1].reshape(-1, h.shape[-1])
    keep = y != IGNORE_INDEX
    h, y = h[keep], y[keep]
    if torch.is_grad_enabled() and h.requires_grad and not w.requires_grad:
        return _FrozenHeadCE.apply(h, w, y, softcap, chunk_tokens, grad_filter), int(y.numel())
    total = h.new_zeros((), dtype=torch.float32)
    for i in range(0, y.numel(), chunk_tokens):
        hc, yc = h[i:i + chunk_tokens], y[i:i + chunk_tokens]
        if torch.is_grad_enabled() and h.requires_grad:
            total = total + checkpoint(_chunk_nll, hc, w, yc, softcap, use_reentrant=False)
        else:
            total = total + _chunk_nll(hc, w, yc, softcap)
    return total, int(y.numel())


def causal_lm_loss(model, input_ids, labels, attention_mask=None, chunk_tokens: int = 256,
                   position_ids=None, grad_filter: float = 0.0) -> torch.Tensor:
    """Mean next-token cross entropy (fp32), equal to HF's `model(labels=...).loss`."""
    total, n = nll_sum(model, input_ids, labels, attention_mask, chunk_tokens, position_ids, grad_filter)
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
