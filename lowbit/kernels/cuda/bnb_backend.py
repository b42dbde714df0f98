"""CUDA ops through bitsandbytes' kernels, for GPUs where lowbit's CUDA extension cannot be built.

The common pip-only CUDA install has no nvcc, so `torch.utils.cpp_extension` cannot compile our kernels;
bitsandbytes ships compiled CUDA kernels, and our 4-bit bytes are its bytes, so the `lowbit::` ops can run
on them instead of the pure-torch reference. The absmax of a double-quant state is decoded to fp32 first
(our reference math, a few KB per weight) and handed to bitsandbytes as a plain absmax.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from lowbit.format.codes import code_4bit
from lowbit.kernels.ops import _absmax_fp32


def _state(absmax, nested_absmax, nested_code, offset, blocksize, quant_type, shape, dtype, device):
    from bitsandbytes.functional import QuantState
    return QuantState(absmax=_absmax_fp32(absmax, nested_absmax, nested_code, offset), shape=torch.Size(shape),
                      code=code_4bit(quant_type, device), blocksize=blocksize, quant_type=quant_type, dtype=dtype)


def dequantize(packed, absmax, nested_absmax, nested_code, offset, blocksize, quant_type, shape, dtype):
    from bitsandbytes.functional import dequantize_4bit
    qs = _state(absmax, nested_absmax, nested_code, offset, blocksize, quant_type, shape, dtype, packed.device)
    return dequantize_4bit(packed, qs)


def dequantize_into(packed, absmax, nested_absmax, nested_code, offset, blocksize, quant_type, shape, out):
    out.copy_(dequantize(packed, absmax, nested_absmax, nested_code, offset, blocksize, quant_type, shape, out.dtype))


def quantize(w, blocksize, quant_type):
    from bitsandbytes.functional import quantize_4bit
    packed, qs = quantize_4bit(w, blocksize=blocksize, quant_type=quant_type, compress_statistics=False)
    return packed, qs.absmax.float()


def gemv(x, packed, absmax, nested_absmax, nested_code, offset, blocksize, quant_type, shape):
    import bitsandbytes as bnb
    qs = _state(absmax, nested_absmax, nested_code, offset, blocksize, quant_type, shape, x.dtype, x.device)
    if x.numel() == x.shape[-1]:  # one row: bitsandbytes' fused 4-bit GEMV
        return bnb.matmul_4bit(x, packed.t(), qs)
    from bitsandbytes.functional import dequantize_4bit
    return F.linear(x, dequantize_4bit(packed, qs))


def matmul_dx(grad, packed, absmax, nested_absmax, nested_code, offset, blocksize, quant_type, shape):
    return grad @ dequantize(packed, absmax, nested_absmax, nested_code, offset, blocksize, quant_type, shape,
                             grad.dtype)


def register() -> bool:
    """Register the ops above for the CUDA key; False (and nothing registered) without bitsandbytes' CUDA."""
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        return False
    impl = {"dequantize_4bit": dequantize, "dequantize_4bit_into": dequantize_into, "quantize_4bit": quantize,
            "gemv_4bit": gemv, "matmul_4bit_dx": matmul_dx}
    for name, fn in impl.items():
        torch.library.impl(f"lowbit::{name}", "CUDA")(fn)
    return True
