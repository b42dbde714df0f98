"""Token batches: the label that no loss reads, and the one collator every dataset uses."""
from __future__ import annotations

import torch

IGNORE_INDEX = -100  # labels with this value carry no loss (the convention of torch and transformers)


def collate(batch: list[dict], pad_id: int) -> dict:
    """Right-pad examples to the longest: input_ids with `pad_id`, labels with IGNORE_INDEX, an
    attention mask; the teacher's stored top-k logits, when present, get zero rows for padding
    (their labels are IGNORE_INDEX, so no loss reads them)."""
    L = max(len(b["input_ids"]) for b in batch)
    ids = torch.full((len(batch), L), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), L), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(batch), L), dtype=torch.long)
    out = {"input_ids": ids, "labels": labels, "attention_mask": mask}
    topk = "topk_values" in batch[0]
    if topk:
        k = batch[0]["topk_values"].shape[-1]
        out["topk_values"] = torch.zeros((len(batch), L - 1, k), dtype=batch[0]["topk_values"].dtype)
        out["topk_indices"] = torch.zeros((len(batch), L - 1, k), dtype=torch.int32)
    for i, b in enumerate(batch):
        n = len(b["input_ids"])
        ids[i, :n] = torch.as_tensor(b["input_ids"])
        labels[i, :n] = torch.as_tensor(b["labels"])
        mask[i, :n] = 1
        if topk:
            out["topk_values"][i, :n - 1] = b["topk_values"]
            out["topk_indices"][i, :n - 1] = b["topk_indices"]
    return out


class Collator:
    """`collate` with the pad id bound: the `data_collator` HF Trainer takes."""

    def __init__(self, pad_id: int):
        self.pad_id = pad_id

    def __call__(self, batch: list[dict]) -> dict:
        return collate(batch, self.pad_id)
