"""Token batches: the label that no loss reads, and the one collator every dataset uses.

Packed rows (several documents in one row, as `trl.pack_dataset` writes them, with `seq_lengths`)
get position ids that restart at each document and an attention mask that keeps documents
apart: restarting position ids alone does not isolate documents under `sdpa` or `eager`
attention (only FlashAttention's varlen path reads them so), so off FlashAttention the mask is
block-diagonal causal — boolean for sdpa, additive for eager — and a dict per layer type when
the model mixes full and sliding-window layers.
"""
from __future__ import annotations

import torch

IGNORE_INDEX = -100  # labels with this value carry no loss (the convention of torch and transformers)


def _segments(batch: list[dict], L: int) -> torch.Tensor:
    """[B, L] document index per position; padding positions each get their own index."""
    seg = torch.arange(L).repeat(len(batch), 1) + L  # padding: unique ids, never equal to a document's
    for i, b in enumerate(batch):
        lengths = b.get("seq_lengths") or [len(b["input_ids"])]
        seg[i, :sum(lengths)] = torch.repeat_interleave(torch.arange(len(lengths)), torch.as_tensor(lengths))
    return seg


def _positions(batch: list[dict], L: int) -> torch.Tensor:
    pos = torch.zeros(len(batch), L, dtype=torch.long)
    for i, b in enumerate(batch):
        pos[i, :len(b["input_ids"])] = torch.cat([torch.arange(n) for n in b["seq_lengths"]])
    return pos


def packed_attention_mask(seg: torch.Tensor, kind: str, dtype=torch.float32, window: int | None = None):
    """[B, 1, L, L] causal mask that attends only within a document (and, with `window`, only that far back)."""
    L = seg.shape[1]
    idx = torch.arange(L)
    allowed = (seg[:, :, None] == seg[:, None, :]) & (idx[None, :, None] >= idx[None, None, :])
    if window is not None:
        allowed &= (idx[None, :, None] - idx[None, None, :]) < window
    allowed = allowed[:, None]
    if kind == "bool":
        return allowed
    return torch.zeros(allowed.shape, dtype=dtype).masked_fill_(~allowed, torch.finfo(dtype).min)


class MaskSpec:
    """How a model wants a packed batch's mask: from its config's attention implementation and layer types."""

    def __init__(self, config=None):
        impl = getattr(config, "_attn_implementation", None) or "sdpa"
        self.varlen = impl.startswith("flash") or impl == "flex_attention"  # position ids are enough there
        self.kind = "float" if impl == "eager" else "bool"
        self.dtype = getattr(config, "dtype", None) or torch.float32
        if isinstance(self.dtype, str):
            self.dtype = getattr(torch, self.dtype)
        layer_types = set(getattr(config, "layer_types", None) or ())
        self.window = getattr(config, "sliding_window", None) if "sliding_attention" in layer_types else None

    def build(self, seg: torch.Tensor):
        full = packed_attention_mask(seg, self.kind, self.dtype)
        if self.window is None:
            return full
        return {"full_attention": full,
                "sliding_attention": packed_attention_mask(seg, self.kind, self.dtype, self.window)}


def collate(batch: list[dict], pad_id: int, mask: MaskSpec | None = None) -> dict:
    """Right-pad examples to the longest: input_ids with `pad_id`, labels with IGNORE_INDEX, an
    attention mask; the teacher's stored top-k logits, when present, get zero rows for padding
    (their labels are IGNORE_INDEX, so no loss reads them). Packed rows also get restarting
    position ids, document-isolating masks and no label on each document's first token."""
    L = max(len(b["input_ids"]) for b in batch)
    ids = torch.full((len(batch), L), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), L), IGNORE_INDEX, dtype=torch.long)
    attn = torch.zeros((len(batch), L), dtype=torch.long)
    out = {"input_ids": ids, "labels": labels, "attention_mask": attn}
    topk = "topk_values" in batch[0]
    if topk:
        k = batch[0]["topk_values"].shape[-1]
        out["topk_values"] = torch.zeros((len(batch), L - 1, k), dtype=batch[0]["topk_values"].dtype)
        out["topk_indices"] = torch.zeros((len(batch), L - 1, k), dtype=torch.int32)
    for i, b in enumerate(batch):
        n = len(b["input_ids"])
        ids[i, :n] = torch.as_tensor(b["input_ids"])
        labels[i, :n] = torch.as_tensor(b["labels"])
        attn[i, :n] = 1
        if topk:
            out["topk_values"][i, :n - 1] = b["topk_values"]
            out["topk_indices"][i, :n - 1] = b["topk_indices"]
    if "seq_lengths" in batch[0]:
        out["position_ids"] = _positions(batch, L)
        labels[out["position_ids"] == 0] = IGNORE_INDEX  # a document's first token is not predicted from the last one
        mask = mask or MaskSpec()
        if not mask.varlen:
            out["attention_mask"] = mask.build(_segments(batch, L))
    return out


class Collator:
    """`collate` with the pad id (and the model's mask needs) bound: the `data_collator` HF Trainer takes."""

    def __init__(self, pad_id: int, model_config=None):
        self.pad_id = pad_id
        self.mask = MaskSpec(model_config)

    def __call__(self, batch: list[dict]) -> dict:
        return collate(batch, self.pad_id, self.mask)
