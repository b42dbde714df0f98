"""Base-weight quantizers LoftQ alternates with: NF4/FP4 (the exact training format) and uniform intN.

Each quantizer maps a dense weight to `(state, dequantized fp32 weight)`. For NF4/FP4 the state is
the `Quantized4bit` the 4-bit base will hold (same bytes `Linear4bit` would hold after loading),
so the LoRA start LoftQ computes is matched to exactly the weights training sees.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from lowbit import kernels
from lowbit.errors import ConfigError
from lowbit.format import BLOCKSIZES, Quantized4bit, intn

UNIFORM_BITS = {"int2": 2, "int3": 3, "int4": 4, "int8": 8}
QUANT_TYPES = ("nf4", "fp4", *UNIFORM_BITS)


@dataclass
class UniformQuantized:
    """Asymmetric intN per group of `group_size` along the input dimension (`lowbit.format.intn`'s rule)."""

    codes: torch.Tensor     # uint8, same shape as the weight
    scale: torch.Tensor     # fp32 (rows, groups)
    zero: torch.Tensor      # fp32 (rows, groups): the integer zero point
    bits: int
    group_size: int
    dtype: torch.dtype

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        rows, cols = self.codes.shape
        g = self.codes.float().reshape(-1, self.group_size)
        w = intn.dequantize_int(g, self.scale.reshape(-1, 1), self.zero.reshape(-1, 1))
        return w.reshape(rows, cols).to(dtype or self.dtype)


def quantize_uniform(w: torch.Tensor, bits: int, group_size: int) -> UniformQuantized:
    if w.dim() != 2 or w.shape[1] % group_size:
        raise ConfigError(f"uniform int{bits} quantization needs a 2-D weight whose row length is a multiple of the "
                          f"group size; got shape {tuple(w.shape)} with group size {group_size} — pick a blocksize "
                          f"that divides {w.shape[-1]}")
    rows, cols = w.shape
    g = w.float().reshape(-1, group_size)
    scale, zero = intn.asymmetric_qparams(g, bits)
    codes = intn.quantize_int(g, scale, zero, bits).to(torch.uint8)
    return UniformQuantized(codes.reshape(rows, cols), scale.reshape(rows, -1), zero.reshape(rows, -1), bits,
                            group_size, w.dtype)


@dataclass(frozen=True)
class BaseQuantizer:
    quant_type: str = "nf4"
    blocksize: int = 64
    double_quant: bool = True

    def __post_init__(self):
        if self.quant_type not in QUANT_TYPES:
            raise ConfigError(f"quant_type {self.quant_type!r} is not supported for LoftQ; choose one of "
                              f"{', '.join(QUANT_TYPES)}")
        if self.quant_type in ("nf4", "fp4") and self.blocksize not in BLOCKSIZES:
            raise ConfigError(f"blocksize {self.blocksize} is not a bitsandbytes blocksize; choose one of "
                              f"{', '.join(map(str, BLOCKSIZES))}")

    @property
    def is_4bit_format(self) -> bool:
        return self.quant_type in ("nf4", "fp4")

    def __call__(self, w: torch.Tensor) -> tuple[Quantized4bit | UniformQuantized, torch.Tensor]:
        """(state, dequantized weight in fp32). `w` is already in the dtype the base is stored from."""
        if self.is_4bit_format:
            q = kernels.quantize_4bit(w, self.blocksize, self.double_quant, self.quant_type)
            return q, kernels.dequantize_4bit(q, torch.float32)
        uq = quantize_uniform(w, UNIFORM_BITS[self.quant_type], self.blocksize)
        return uq, uq.dequantize(torch.float32)
