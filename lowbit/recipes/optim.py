"""Optimizers by name. bitsandbytes' paged variants need CUDA unified memory: on CPU they
run as their non-paged twins, and we say so once."""
from __future__ import annotations

import logging

import torch

log = logging.getLogger("lowbit")


def build_optimizer(name: str, params, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    params = [p for p in params if p.requires_grad]
    if name == "adamw_torch":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    import bitsandbytes as bnb
    paged = name.startswith("paged_")
    if paged and not torch.cuda.is_available():
        log.warning("%s: paging needs CUDA; on CPU it is a no-op, running the non-paged optimizer", name)
        paged = False
    if name in ("adamw_8bit", "paged_adamw_8bit"):
        return bnb.optim.AdamW8bit(params, lr=lr, weight_decay=weight_decay, is_paged=paged)
    if name == "paged_adamw_32bit":
        return bnb.optim.AdamW32bit(params, lr=lr, weight_decay=weight_decay, is_paged=paged)
    raise ValueError(f"unknown optimizer {name!r}")
