"""Kernel entry points used by the modules. This version runs the pure-torch reference;
the op catalog (CPU C++ / CUDA backends) replaces the bodies, not the signatures."""
from __future__ import annotations

import torch

from ..format import Quantized4bit, dequantize_reference, quantize


def dequantize_4bit(q: Quantized4bit, dtype: torch.dtype) -> torch.Tensor:
    return dequantize_reference(q, dtype)


def quantize_4bit(w: torch.Tensor, blocksize: int = 64, double_quant: bool = True, quant_type: str = "nf4") -> Quantized4bit:
    return quantize(w, blocksize, double_quant, quant_type)


class _MatMul4bit(torch.autograd.Function):
    # The dequantized weight is not saved for backward: it is rebuilt, trading compute for
    # the memory QLoRA exists to save.
    @staticmethod
    def forward(ctx, x, q, bias):
        ctx.q = q
        w = dequantize_4bit(q, x.dtype)
        return torch.nn.functional.linear(x, w, bias)

    @staticmethod
    def backward(ctx, grad_out):
        grad_x = grad_out @ dequantize_4bit(ctx.q, grad_out.dtype) if ctx.needs_input_grad[0] else None
        grad_bias = grad_out.reshape(-1, grad_out.shape[-1]).sum(0) if ctx.needs_input_grad[2] else None
        return grad_x, None, grad_bias


def matmul_4bit(x: torch.Tensor, q: Quantized4bit, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x @ deq(W).T + bias, differentiable in x (and bias); W is frozen."""
    return _MatMul4bit.apply(x, q, bias)
