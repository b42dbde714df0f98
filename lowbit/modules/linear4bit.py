"""`Linear4bit`: our frozen NF4/FP4 linear layer (not bitsandbytes' Linear4bit).

It subclasses `nn.Linear` so peft, "all-linear" target discovery and HF utilities treat
it as a linear layer, but `weight` holds the packed 4-bit bytes (uint8, or a float
container that FSDP / ZeRO-3 can shard). Its state dict is the bitsandbytes/transformers
4-bit layout, so checkpoints move both ways. There is no inference-time repacking: the
stored bytes are the only copy, so a no_grad forward can never change what merge or
backward sees (the bitsandbytes CPU bug).
"""
from __future__ import annotations

import dataclasses

import torch
from torch import nn

from lowbit import kernels
from lowbit.format import Quantized4bit, quantize

_QUANT_BUFFERS = ("absmax", "quant_map", "offset", "nested_absmax", "nested_quant_map")


class Linear4bit(nn.Linear):
    lowbit_casts_input = True  # computes in compute_dtype, returns the input's dtype (keep_residual_in_fp32)

    def __init__(self, quant: Quantized4bit, bias: torch.Tensor | None = None,
                 compute_dtype: torch.dtype = torch.bfloat16):
        nn.Module.__init__(self)  # skip nn.Linear.__init__: no dense weight is ever allocated
        if len(quant.shape) != 2:
            raise ValueError(f"Linear4bit needs a 2-D weight, got shape {quant.shape}")
        self.out_features, self.in_features = quant.shape
        self.compute_dtype = compute_dtype
        self._set_quant(quant)
        self.bias = None if bias is None else nn.Parameter(bias.detach().to(compute_dtype), requires_grad=False)

    @classmethod
    def from_linear(cls, linear: nn.Linear, blocksize: int = 64, double_quant: bool = True, quant_type: str = "nf4",
                    storage_dtype: torch.dtype = torch.uint8, compute_dtype: torch.dtype = torch.bfloat16) -> "Linear4bit":
        q = kernels.quantize_4bit(linear.weight.detach(), blocksize, double_quant, quant_type)
        if storage_dtype != torch.uint8:
            q = q.with_storage(storage_dtype)
        return cls(q, linear.bias, compute_dtype)

    # -- the packed state lives in a parameter + buffers so .to()/FSDP move it ----------
    def _set_quant(self, q: Quantized4bit) -> None:
        self.weight = nn.Parameter(q.packed, requires_grad=False)
        self._meta = dict(shape=tuple(q.shape), dtype=q.dtype, blocksize=q.blocksize, quant_type=q.quant_type,
                          nested_blocksize=q.nested_blocksize)
        for name, t in zip(_QUANT_BUFFERS, (q.absmax, q.code, q.offset, q.nested_absmax, q.nested_code)):
            self.register_buffer(name, None if t is None else t.reshape(()) if name == "offset" else t, persistent=False)

    @property
    def quant(self) -> Quantized4bit:
        return Quantized4bit(packed=self.weight.data, absmax=self.absmax, code=self.quant_map, offset=self.offset,
                             nested_absmax=self.nested_absmax, nested_code=self.nested_quant_map, **self._meta)

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        return kernels.dequantize_4bit(self.quant, dtype or self.compute_dtype)

    def set_weight(self, w: torch.Tensor) -> None:
        """Requantize from a dense weight with this layer's settings (used by merge/unmerge)."""
        m = self._meta
        # quantize the (fp32) merged weight as given, as the bnb4 export does: no extra rounding to the old dtype
        q = kernels.quantize_4bit(w.detach().contiguous(), m["blocksize"], self.nested_absmax is not None,
                                  m["quant_type"])
        q = dataclasses.replace(q, dtype=m["dtype"])
        storage = self.weight.dtype
        self._set_quant(q if storage == torch.uint8 else q.with_storage(storage))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(self.compute_dtype)
        out = kernels.matmul_4bit(x.to(self.compute_dtype), self.quant, bias)
        return out.to(x.dtype)

    def extra_repr(self) -> str:
        m = self._meta
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"{m['quant_type']}, blocksize={m['blocksize']}, double_quant={self.nested_absmax is not None}, "
                f"compute_dtype={self.compute_dtype}, storage={self.weight.dtype}")

    # -- bitsandbytes/transformers state-dict layout ---------------------------------------
    def _save_to_state_dict(self, destination, prefix, keep_vars):
        q = self.quant
        for k, v in q.state_dict(prefix + "weight").items():
            destination[k] = v if keep_vars else v.detach()
        if self.bias is not None:
            destination[prefix + "bias"] = self.bias if keep_vars else self.bias.detach()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        wkey = prefix + "weight"
        mine = {k: v for k, v in state_dict.items() if k == wkey or k.startswith(wkey + ".")}
        if not mine:
            missing_keys.append(wkey)
        else:
            try:
                q = Quantized4bit.from_state_dict(mine, wkey)
            except (KeyError, ValueError) as e:
                error_msgs.append(f"{wkey}: {e}")
            else:
                if tuple(q.shape) != (self.out_features, self.in_features):
                    error_msgs.append(f"{wkey}: shape {q.shape} != {(self.out_features, self.in_features)}")
                else:
                    self._set_quant(q.to(self.weight.device))
        if prefix + "bias" in state_dict and self.bias is not None:
            self.bias.data.copy_(state_dict[prefix + "bias"])
        elif self.bias is not None:
            missing_keys.append(prefix + "bias")


def quantize_module(linear: nn.Linear, **kw) -> Linear4bit:
    return Linear4bit.from_linear(linear, **kw)


__all__ = ["Linear4bit", "quantize", "quantize_module"]
