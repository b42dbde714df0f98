"""Kernel entry points used by the modules, dispatching through the `lowbit::` op catalog
(ops.py). The CPU C++ backend is compiled on first use (cached); CUDA registers itself on
machines with CUDA torch; everything else runs the pure-torch reference."""
from __future__ import annotations

import torch

from lowbit.format import Quantized4bit
from lowbit.format.blockwise import check_blocksize, check_quant_type, check_weight_dtype
from lowbit.format.codes import code_4bit
from lowbit.format.tensor import double_quantize
from lowbit.kernels import ops
from lowbit.kernels.ops import state_args

GEMV_MAX_ROWS = 16
_READY = {}


def ensure_backends() -> dict:
    """Register the compiled backends once; returns which are active."""
    if not _READY:
        from lowbit.kernels.cpu import build as cpu_build
        _READY["cpu"] = cpu_build.load()
        _READY["cuda"] = False
        if torch.cuda.is_available():
            from lowbit.kernels.cuda import build as cuda_build
            _READY["cuda"] = cuda_build.load()
    return _READY


def dequantize_4bit(q: Quantized4bit, dtype: torch.dtype) -> torch.Tensor:
    ensure_backends()
    return torch.ops.lowbit.dequantize_4bit(*state_args(q), dtype)


def quantize_4bit(w: torch.Tensor, blocksize: int = 64, double_quant: bool = True, quant_type: str = "nf4") -> Quantized4bit:
    check_blocksize(blocksize)
    check_quant_type(quant_type)
    check_weight_dtype(w)
    ensure_backends()
    packed, absmax = torch.ops.lowbit.quantize_4bit(w, blocksize, quant_type)
    q = Quantized4bit(packed=packed, absmax=absmax, shape=tuple(w.shape), dtype=w.dtype, blocksize=blocksize,
                      quant_type=quant_type, code=code_4bit(quant_type, w.device))
    return double_quantize(q) if double_quant else q


_WORKSPACE: dict = {}


def dequantize_to_workspace(q: Quantized4bit, dtype: torch.dtype) -> torch.Tensor:
    """Dequantize into a reused buffer (CPU): a fresh multi-MB tensor per layer and step
    costs more in page faults than the dequantization itself. The result is only valid
    until the next call, so it is used at once and never saved for backward."""
    if q.device.type != "cpu":
        return torch.ops.lowbit.dequantize_4bit(*state_args(q), dtype)
    n = q.numel
    buf = _WORKSPACE.get(dtype)
    if buf is None or buf.numel() < n:
        buf = _WORKSPACE[dtype] = torch.empty(n, dtype=dtype)
    w = buf[:n].view(q.shape)
    torch.ops.lowbit.dequantize_4bit_into(*state_args(q), w)
    return w


class _MatMul4bit(torch.autograd.Function):
    # The dequantized weight is not saved for backward: it is rebuilt there, trading compute
    # for the memory QLoRA exists to save.
    @staticmethod
    def forward(ctx, x, q, bias):
        ctx.q = q
        rows = x.numel() // x.shape[-1]
        if rows <= GEMV_MAX_ROWS:
            y = torch.ops.lowbit.gemv_4bit(x, *state_args(q))
            return y if bias is None else y + bias
        return torch.nn.functional.linear(x, dequantize_to_workspace(q, x.dtype), bias)

    @staticmethod
    def backward(ctx, grad_out):
        grad_x = (grad_out @ dequantize_to_workspace(ctx.q, grad_out.dtype) if ctx.q.device.type == "cpu"
                  else torch.ops.lowbit.matmul_4bit_dx(grad_out, *state_args(ctx.q))) if ctx.needs_input_grad[0] else None
        grad_bias = grad_out.reshape(-1, grad_out.shape[-1]).sum(0) if ctx.needs_input_grad[2] else None
        return grad_x, None, grad_bias


def matmul_4bit(x: torch.Tensor, q: Quantized4bit, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x @ deq(W).T + bias, differentiable in x (and bias); W is frozen."""
    ensure_backends()
    return _MatMul4bit.apply(x, q, bias)


__all__ = ["GEMV_MAX_ROWS", "dequantize_4bit", "ensure_backends", "matmul_4bit", "ops", "quantize_4bit"]
