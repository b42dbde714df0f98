"""Small nn.Module idioms used across the package, defined once."""
from __future__ import annotations

from torch import nn


def set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """Replace the submodule at dotted `name` with `new`."""
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, new)


def unwrap_peft(model: nn.Module) -> nn.Module:
    """The transformers model inside a peft wrapper (the model itself when it is not wrapped)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def matches_module(name: str, patterns) -> bool:
    """True when module `name` is, or sits inside, a module named by one of `patterns`.

    A pattern is a dotted name matched on whole components anywhere in the path: "lm_head" matches
    "lm_head" and "lm_head.base_layer" (peft's wrapper), "mlp.down_proj" matches
    "model.layers.3.mlp.down_proj", and "head" matches neither. This is the one rule for
    skip_modules (loading, export), LoRA's exclusions and QAT's exclude list.
    """
    path = f".{name}."
    return any(f".{p.strip('.')}." in path for p in patterns)
