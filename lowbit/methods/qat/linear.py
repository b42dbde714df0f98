"""Fake quant on linear layers: plain `nn.Linear`, lowbit `Linear4bit`, and peft LoRA layers.

A prepared layer keeps its class (a subclass is swapped in, as torchao does) and its state-dict
keys, so peft adapters still save and load as usual. With LoRA the weight that is fake-quantized
is the merged one, deq(base) + s·BA — merge-aware QAT: the model trained is the model exported.
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

from lowbit.errors import ConfigError


def is_lora_layer(m: nn.Module) -> bool:
    return hasattr(m, "lora_A") and hasattr(m, "get_base_layer")


def base_linear(m: nn.Module) -> nn.Linear:
    return m.get_base_layer() if is_lora_layer(m) else m


def compute_dtype(m: nn.Module) -> torch.dtype:
    base = base_linear(m)
    return getattr(base, "compute_dtype", None) or base.weight.dtype


def weight_dtype(m: nn.Module) -> torch.dtype:
    """The dtype a 4-bit format quantizes from (a Linear4bit remembers its original dtype)."""
    base = base_linear(m)
    meta = getattr(base, "_meta", None)
    return meta["dtype"] if meta else base.weight.dtype


def effective_weight(m: nn.Module) -> torch.Tensor:
    """fp32 dense weight the layer computes with: deq(base) [+ Σ s·B@A over active adapters].

    The sum is formed exactly as `LoraLinear4bit.merge` forms it, so for an NF4 target the
    standard merge + requantize reproduces the fake-quantized weight bit for bit."""
    base = base_linear(m)
    w = base.dequantize(torch.float32) if hasattr(base, "dequantize") else base.weight.float()
    if is_lora_layer(m) and not m.disable_adapters and not m.merged:
        for name in m.active_adapters:
            if name in m.lora_A:
                w = w + m.get_delta_weight(name).float()
    return w


def check_mergeable(m: nn.Module, name: str) -> None:
    for adapter, drop in m.lora_dropout.items():
        if not isinstance(drop, nn.Identity):
            raise ConfigError(f"{name}: merge-aware QAT fake-quantizes the merged weight deq(W) + s·BA, which LoRA "
                              f"dropout (adapter {adapter!r}) cannot pass through; set lora.dropout: 0")
    if any(getattr(m, "lora_bias", {}).values()) or getattr(m, "use_dora", {}) and any(m.use_dora.values()):
        raise ConfigError(f"{name}: merge-aware QAT supports plain LoRA (no lora_bias, no DoRA)")


class QATLinearMixin:
    """forward = out_fq( F.linear( in_fq(x), w_fq(effective weight) ) ).

    Attributes (None = not quantized): lowbit_weight_fq, lowbit_input_fq, lowbit_output_fq
    (the output one is the pre-RoPE key/value quantizer on k_proj / v_proj)."""

    lowbit_casts_input = True  # the quantizers see compute_dtype inputs whatever the residual stream's dtype

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        fin, fw, fout = self.lowbit_input_fq, self.lowbit_weight_fq, self.lowbit_output_fq
        rot = getattr(self, "lowbit_rotation", None)  # online input rotation: y = (W Rᵀ)(R x), see rotate.py
        cd, x_dtype = compute_dtype(self), x.dtype
        x = x.to(cd)
        if rot is not None:
            x = rot(x)
        if fin is not None:
            x = fin(x)
        if rot is None and (fw is None or not fw.active):
            y = super().forward(x, *args, **kwargs)
        else:
            w = effective_weight(self) if rot is None else rot.layer_weight(self)
            w = fw(w, out_dtype=cd) if fw is not None else w.to(cd)
            bias = base_linear(self).bias
            y = F.linear(x, w, None if bias is None else bias.to(cd))
        return (fout(y) if fout is not None else y).to(x_dtype)


@functools.cache
def qat_class(cls: type) -> type:
    if issubclass(cls, QATLinearMixin):
        return cls
    return type(f"QAT{cls.__name__}", (QATLinearMixin, cls), {"__module__": __name__})


def attach(m: nn.Module, weight_fq=None, input_fq=None, output_fq=None) -> None:
    """Swap in the QAT subclass (idempotent) and set the quantizers given (others kept)."""
    if not isinstance(m, QATLinearMixin):
        m.__class__ = qat_class(type(m))
        m.lowbit_weight_fq = m.lowbit_input_fq = m.lowbit_output_fq = None
    if weight_fq is not None:
        m.lowbit_weight_fq = weight_fq
    if input_fq is not None:
        m.lowbit_input_fq = input_fq
    if output_fq is not None:
        m.lowbit_output_fq = output_fq


def detach(m: nn.Module) -> None:
    """Undo `attach`: the original class, no quantizers."""
    if isinstance(m, QATLinearMixin):
        for a in ("lowbit_weight_fq", "lowbit_input_fq", "lowbit_output_fq", "lowbit_rotation"):
            if hasattr(m, a):
                delattr(m, a)
        m.__class__ = type(m).__mro__[2]
