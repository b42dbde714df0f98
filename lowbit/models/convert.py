"""Adopt a transformers + BitsAndBytesConfig NF4/FP4 model as lowbit `Linear4bit` layers.

The packed bytes and quant state are taken as they are: no requantization, so the
weights are bit-identical. bitsandbytes' CPU inference repack is undone first.
"""
from __future__ import annotations

import torch
from torch import nn

from lowbit.format import Quantized4bit
from lowbit.modules.linear4bit import Linear4bit
from lowbit.utils.modules import set_module


def from_bnb_model(model: nn.Module, compute_dtype: torch.dtype | None = None) -> nn.Module:
    import bitsandbytes as bnb
    from bitsandbytes.nn.modules import _convert_weight_packed_for_cpu_inverse

    n = 0
    for name, mod in list(model.named_modules()):
        if not isinstance(mod, bnb.nn.Linear4bit):
            continue
        w, qs = mod.weight.data, mod.weight.quant_state
        if getattr(qs, "packing_format_for_cpu", False):
            w, qs = _convert_weight_packed_for_cpu_inverse(w, qs)
        q = Quantized4bit.from_bnb(w, qs)
        new = Linear4bit(q, mod.bias, compute_dtype or mod.compute_dtype or torch.bfloat16)
        set_module(model, name, new)
        n += 1
    if n == 0:
        raise ValueError("no bitsandbytes Linear4bit layer found: load the model with BitsAndBytesConfig(load_in_4bit=True)")
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer.remove_quantization_config(model)
    return model
