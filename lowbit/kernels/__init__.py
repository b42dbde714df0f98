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


def dequantize_to_workspace(q: Quantized4bit, dtype: torch.dtype, extra_rows: torch.Tensor | None = None) -> torch.Tensor:
    """Dequantize into a reused buffer (CPU): a fresh multi-MB tensor per layer and step
    costs more in page faults than the dequantization itself. The result is only valid
    until the next call, so it is used at once and never saved for backward.
    `extra_rows` ([r, in]) are copied below the weight: one matmul then serves both."""
    if q.device.type != "cpu":
        return torch.ops.lowbit.dequantize_4bit(*state_args(q), dtype)
    n = q.numel
    extra = 0 if extra_rows is None else extra_rows.numel()
    buf = _WORKSPACE.get(dtype)
    if buf is None or buf.numel() < n + extra:
        buf = _WORKSPACE[dtype] = torch.empty(n + extra, dtype=dtype)
    w = buf[:n].view(q.shape)
    torch.ops.lowbit.dequantize_4bit_into(*state_args(q), w)
    if extra_rows is None:
        return w
    buf[n:n + extra].view(extra_rows.shape).copy_(extra_rows)
    return buf[:n + extra].view(q.shape[0] + extra_rows.shape[0], q.shape[1])


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


class _LoraMatMul4bit(torch.autograd.Function):
    """x @ deq(W).T + bias + s * (x*mask) @ A.T @ B.T in one autograd node (W frozen; A, B trainable).

    What peft's unfused LoRA costs on top of the base matmul is mostly passes over activations:
    a dropout copy per adapter (kept for backward), the scaled product, the sum, and a second sum
    in backward. Here the sum is the matmul's own accumulation (addmm, beta=1), dropout is a bool
    mask (its 1/(1-p) folded into s), and without dropout the adapter's A rides in the base
    matmul: x @ [W; A].T, one pass over x. Only for same-dtype x and adapters (fp32 compute):
    with bf16 compute the adapters stay fp32 as in peft, so there is nothing to fuse."""

    @staticmethod
    def forward(ctx, x, q, bias, lora_a, lora_b, scale, mask):
        out = q.shape[0]
        x2 = x.reshape(-1, x.shape[-1])
        xd = x2 if mask is None else x2 * mask.reshape(x2.shape)
        if mask is None:
            yu = torch.nn.functional.linear(x2, dequantize_to_workspace(q, x.dtype, lora_a))
            y, u = yu[:, :out], yu[:, out:]
        else:
            y, u = torch.nn.functional.linear(x2, dequantize_to_workspace(q, x.dtype)), xd @ lora_a.t()
        if bias is not None:
            y = y + bias
        # written into a tensor of the output's own shape: a returned view would forbid in-place ops on it
        res = torch.empty(*x.shape[:-1], out, dtype=y.dtype, device=y.device)
        torch.addmm(y, u, lora_b.t(), alpha=scale, out=res.view(-1, out))
        ctx.q, ctx.scale = q, scale
        ctx.save_for_backward(x, mask, lora_a, lora_b, u.contiguous())
        return res

    @staticmethod
    def backward(ctx, grad):
        x, mask, lora_a, lora_b, u = ctx.saved_tensors
        g = grad.reshape(-1, grad.shape[-1])
        x2 = x.reshape(-1, x.shape[-1])
        grad_u = (g @ lora_b).mul_(ctx.scale)
        grad_b = (g.t() @ u).mul_(ctx.scale) if ctx.needs_input_grad[4] else None
        grad_a = None
        if ctx.needs_input_grad[3]:
            grad_a = grad_u.t() @ (x2 if mask is None else x2 * mask.reshape(x2.shape))
        grad_x = None
        if ctx.needs_input_grad[0]:
            if mask is None:  # [g | grad_u] @ [W; A] as two accumulating matmuls: no concatenated copy
                grad_x = g @ dequantize_to_workspace(ctx.q, g.dtype)
                grad_x.addmm_(grad_u, lora_a)
            else:
                grad_x = (g @ dequantize_to_workspace(ctx.q, g.dtype)).addcmul_(grad_u @ lora_a, mask.reshape(x2.shape))
            grad_x = grad_x.view(x.shape)
        grad_bias = g.sum(0) if ctx.needs_input_grad[2] else None
        return grad_x, None, grad_bias, grad_a, grad_b, None, None


def lora_fusable(x: torch.Tensor, q: Quantized4bit, lora_a: torch.Tensor) -> bool:
    """Whether `lora_matmul_4bit` applies: CPU, same dtype for x and the adapters, more rows than the gemv path."""
    return (x.device.type == "cpu" and q.device.type == "cpu" and x.dtype == lora_a.dtype
            and x.numel() // x.shape[-1] > GEMV_MAX_ROWS)


def lora_matmul_4bit(x: torch.Tensor, q: Quantized4bit, bias: torch.Tensor | None, lora_a: torch.Tensor,
                     lora_b: torch.Tensor, scale: float, mask: torch.Tensor | None = None) -> torch.Tensor:
    """x @ deq(W).T + bias + scale * ((x * mask) @ A.T) @ B.T (mask: bool dropout keep-mask or None);
    call only where `lora_fusable`."""
    ensure_backends()
    return _LoraMatMul4bit.apply(x, q, bias, lora_a, lora_b, scale, mask)


__all__ = ["GEMV_MAX_ROWS", "dequantize_4bit", "ensure_backends", "lora_fusable", "lora_matmul_4bit", "matmul_4bit",
           "ops", "quantize_4bit"]
