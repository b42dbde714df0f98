"""Checkpoint tensor names → the model's, with transformers' own conversion mapping, one tensor at a time.

transformers 5 renames keys on load (legacy prefixes, `language_model.model.*` of image-text
checkpoints) and fuses per-expert MoE tensors (`experts.3.gate_proj.weight`, ...) into the 3-D
parameters its modules hold; `save_pretrained` reverts that. `from_pretrained` collects every
tensor first; here the pieces of one fused parameter are held only until the last one arrives,
then converted with transformers' ops, so memory stays at the model being built plus one tensor.
"""
from __future__ import annotations

from collections import Counter

import torch
from torch import nn


class CheckpointKeys:
    def __init__(self, model: nn.Module, expected: dict, names: list[str]):
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, WeightRenaming
        self.model, self.expected = model, expected
        self.mapping = get_model_conversion_mapping(model) if hasattr(model, "base_model_prefix") else []
        self.renamings = [m for m in self.mapping if isinstance(m, WeightRenaming)]
        self.converters = [m for m in self.mapping if isinstance(m, WeightConverter)]
        self.by_pattern = {k: c for c in self.converters for k in c.source_patterns}
        self.route: dict[str, tuple[str, str | None]] = {}
        self.needed: Counter = Counter()
        for k in names:
            target, pattern = self.rename(k)
            if target in expected:
                self.route[k] = (target, pattern)
                if pattern is not None:
                    self.needed[target] += 1
        self.pending: dict[str, list] = {}

    def rename(self, key: str) -> tuple[str, str | None]:
        from transformers.core_model_loading import rename_source_key
        prefix = getattr(self.model, "base_model_prefix", None)
        target, pattern = rename_source_key(key, self.renamings, self.converters, prefix, self.expected)
        if target not in self.expected and key in self.expected:  # as transformers: keep a key that already fits
            target, pattern = key, None
        return target, pattern

    def feed(self, key: str, tensor: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
        """The (model key, tensor) pairs this checkpoint tensor completes (none while a fused one is partial)."""
        if key not in self.route:
            return []  # not part of this model (rotary buffers, vision towers transformers drops, mtp heads...)
        target, pattern = self.route[key]
        if pattern is None:
            return [(target, tensor)]
        parts = self.pending.setdefault(target, [])
        parts.append((key, pattern, tensor))
        if len(parts) < self.needed[target]:
            return []
        return self._convert(target, self.pending.pop(target))

    def _convert(self, target: str, parts: list) -> list[tuple[str, torch.Tensor]]:
        from copy import deepcopy

        from transformers.core_model_loading import dot_natural_key
        conv = deepcopy(self.by_pattern[parts[0][1]])
        for key, pattern, tensor in sorted(parts, key=lambda kp: dot_natural_key(kp[0])):  # experts in index order
            conv.add_tensor(target, key, pattern, tensor)
        parts.clear()
        out = conv.convert(target, model=self.model, config=self.model.config)
        return [(k, v[0] if isinstance(v, list) else v) for k, v in out.items()]

    def unfinished(self) -> list[str]:
        return sorted(self.pending)

    def used_conversions(self) -> list:
        """What `save_pretrained` must revert (transformers keeps the same list after from_pretrained)."""
        return [c for c in self.mapping if c.was_used()]
