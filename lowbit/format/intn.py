"""Uniform integer grids: the one definition of symmetric and asymmetric (zero-point) intN.

A tensor is viewed as rows that each share a scale. Asymmetric ranges always contain 0 (so
padding and exact zeros stay exact), with an integer zero point as in torchao / GPTQ
checkpoints; QAT's fake quant and convert, and LoftQ's intN bases, all quantize with these.
"""
from __future__ import annotations

import torch

EPS = 1e-12  # smallest scale: an all-zero row decodes to zeros instead of dividing by zero


def int_range(bits: int, symmetric: bool) -> tuple[int, int]:
    if symmetric:
        return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    return 0, 2 ** bits - 1


def symmetric_scale(rows: torch.Tensor, qmax: float) -> torch.Tensor:
    """[r, 1] fp32 scale mapping each row's largest magnitude to `qmax`."""
    return (rows.detach().float().abs().amax(-1, keepdim=True) / qmax).clamp_min(EPS)


def asymmetric_qparams(rows: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale [r, 1], integer zero point [r, 1]) covering each row's range extended to include 0 (fp32)."""
    rows = rows.detach().float()
    qmin, qmax = int_range(bits, symmetric=False)
    lo = rows.amin(-1, keepdim=True).clamp(max=0)
    hi = rows.amax(-1, keepdim=True).clamp(min=0)
    scale = ((hi - lo) / (qmax - qmin)).clamp_min(EPS)
    zero = (qmin - torch.round(lo / scale)).clamp(qmin, qmax)
    return scale, zero


def quantize_int(rows: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, bits: int) -> torch.Tensor:
    """Integer levels (as floats) of fp32 rows: round(x / scale + zero) clamped to the grid."""
    lo, hi = int_range(bits, symmetric=zero is None)
    v = rows / scale
    if zero is not None:
        v = v + zero
    return torch.round(v.clamp(lo, hi))


def dequantize_int(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None) -> torch.Tensor:
    return ((q - zero) if zero is not None else q) * scale
