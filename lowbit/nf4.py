"""Public NF4/FP4 entry points: `quantize(w, ...)` and `dequantize(q, dtype=None)`."""
from __future__ import annotations

import torch

from lowbit.format import Quantized4bit, quantize
from lowbit.kernels import dequantize_4bit

__all__ = ["Quantized4bit", "dequantize", "quantize"]


def dequantize(q: Quantized4bit, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Decode to `dtype` (default: the dtype the weight had when quantized), fastest backend available."""
    return dequantize_4bit(q, dtype or q.dtype)
