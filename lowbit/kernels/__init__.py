"""Kernel entry points. Until the op catalog lands these call the pure-torch reference."""
from __future__ import annotations

import torch

from ..format import Quantized4bit, dequantize_reference


def dequantize_4bit(q: Quantized4bit, dtype: torch.dtype) -> torch.Tensor:
    return dequantize_reference(q, dtype)
