"""`QuantizedLinear`: the deployment form of a fake-quantized linear — packed codes + scales."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lowbit.methods.qat.config import QuantizerConfig
from lowbit.methods.qat.numerics import FP8_DTYPES, code_bits, decode, dequantize_rows, encode


class QuantizedLinear(nn.Module):
    """Stores codes (uint8, two 4-bit codes per byte; float8 for fp8), fp32 scales and zero
    points, and dequantizes with the same fp32 arithmetic fake quant used in training."""

    def __init__(self, in_features: int, out_features: int, cfg: QuantizerConfig, n_rows: int,
                 bias: bool = False, compute_dtype: torch.dtype = torch.bfloat16):
        super().__init__()
        self.in_features, self.out_features, self.cfg, self.compute_dtype = in_features, out_features, cfg, compute_dtype
        self.n_rows = n_rows
        n = in_features * out_features
        codes = torch.zeros(n if encode_bytes(cfg) == 1 else (n + 1) // 2,
                            dtype=torch.uint8 if cfg.dtype[:3] != "fp8" else _fp8(cfg))
        self.register_buffer("codes", codes)
        self.register_buffer("scale", torch.ones(n_rows, 1))
        self.register_buffer("zero", None if cfg.symmetric else torch.zeros(n_rows, 1))
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=compute_dtype), requires_grad=False) if bias else None
        self.lowbit_input_fq = self.lowbit_output_fq = None
        self.lowbit_rotation = None  # a rotate.Rotation when the codes are those of W·Rᵀ (input rotated online)

    @classmethod
    def from_quantized(cls, q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, cfg: QuantizerConfig,
                       shape: tuple[int, int], bias: torch.Tensor | None, compute_dtype: torch.dtype):
        out_f, in_f = shape
        m = cls(in_f, out_f, cfg, scale.shape[0], bias is not None, compute_dtype)
        m.codes = encode(q, cfg)
        m.scale = scale.float()
        m.zero = None if zero is None else zero.float()
        if bias is not None:
            m.bias.data.copy_(bias.detach().to(compute_dtype))
        return m

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        q = decode(self.codes, self.cfg, (self.n_rows, self.in_features * self.out_features // self.n_rows))
        w = dequantize_rows(q, self.scale, self.zero).reshape(self.out_features, self.in_features)
        return w.to(dtype or self.compute_dtype)

    lowbit_casts_input = True  # as QATLinearMixin: the quantizers see compute_dtype inputs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        cd, x_dtype = self.compute_dtype, x.dtype
        x = x.to(cd)
        if self.lowbit_rotation is not None:
            x = self.lowbit_rotation(x)
        if self.lowbit_input_fq is not None:
            x = self.lowbit_input_fq(x)
        y = F.linear(x, self.dequantize(cd), None if self.bias is None else self.bias.to(cd))
        return (self.lowbit_output_fq(y) if self.lowbit_output_fq is not None else y).to(x_dtype)

    def extra_repr(self) -> str:
        c = self.cfg
        fmt = f"int{c.bits}" if c.dtype == "int" else c.dtype
        return (f"in_features={self.in_features}, out_features={self.out_features}, {fmt} "
                f"{'sym' if c.symmetric else 'asym'} {c.granularity}, bias={self.bias is not None}")


def encode_bytes(cfg: QuantizerConfig) -> int:
    return 1 if code_bits(cfg) > 4 else 0


def _fp8(cfg: QuantizerConfig) -> torch.dtype:
    return FP8_DTYPES[cfg.dtype]
