"""The `lowbit::` op catalog: schemas, fake (meta) impls, and the pure-torch reference
registered as the default (CompositeExplicitAutograd) kernel. Device backends register
beside it: `cpu/` (C++, TORCH_LIBRARY_IMPL CPU) and `cuda/` (when CUDA torch is present).
"""
from __future__ import annotations

import math

import torch

from lowbit.format.blockwise import dequantize_4bit_values, dequantize_blockwise_8bit, quantize_4bit_packed
from lowbit.format.tensor import Quantized4bit

_STATE = "Tensor packed, Tensor absmax, Tensor? nested_absmax, Tensor? nested_code, Tensor? offset, " \
         "int blocksize, str quant_type, int[] shape"
SCHEMAS = {
    "dequantize_4bit": f"dequantize_4bit({_STATE}, ScalarType dtype) -> Tensor",
    "dequantize_4bit_into": f"dequantize_4bit_into({_STATE}, Tensor(a!) out) -> ()",
    "quantize_4bit": "quantize_4bit(Tensor w, int blocksize, str quant_type) -> (Tensor, Tensor)",
    "gemv_4bit": f"gemv_4bit(Tensor x, {_STATE}) -> Tensor",
    "matmul_4bit_dx": f"matmul_4bit_dx(Tensor grad, {_STATE}) -> Tensor",
}
lib = torch.library.Library("lowbit", "DEF")
for _schema in SCHEMAS.values():
    lib.define(_schema)


def _absmax_fp32(absmax, nested_absmax, nested_code, offset, nested_blocksize=256):
    if absmax.dtype != torch.uint8:
        return absmax.float()
    return dequantize_blockwise_8bit(absmax, nested_absmax, nested_blocksize, nested_code) + offset


def state_args(q: Quantized4bit) -> tuple:
    """A `Quantized4bit` as the op arguments (packed ... shape)."""
    return (q.codes_u8(), q.absmax, q.nested_absmax, q.nested_code, q.offset, q.blocksize, q.quant_type,
            list(q.shape))


# -- reference (default) kernels -----------------------------------------------------------
@torch.library.impl(lib, "dequantize_4bit", "CompositeExplicitAutograd")
def _dequantize_ref(packed, absmax, nested_absmax, nested_code, offset, blocksize, quant_type, shape, dtype):
    am = _absmax_fp32(absmax, nested_absmax, nested_code, offset)
    return dequantize_4bit_values(packed, am, shape, dtype, blocksize, quant_type)


@torch.library.impl(lib, "dequantize_4bit_into", "CompositeExplicitAutograd")
def _dequantize_into_ref(packed, absmax, nested_absmax, nested_code, offset, blocksize, quant_type, shape, out):
    out.copy_(_dequantize_ref(packed, absmax, nested_absmax, nested_code, offset, blocksize, quant_type, shape,
                              out.dtype).reshape(out.shape))


@torch.library.impl(lib, "quantize_4bit", "CompositeExplicitAutograd")
def _quantize_ref(w, blocksize, quant_type):
    return quantize_4bit_packed(w, blocksize, quant_type)


@torch.library.impl(lib, "gemv_4bit", "CompositeExplicitAutograd")
def _gemv_ref(x, packed, absmax, nested_absmax, nested_code, offset, blocksize, quant_type, shape):
    w = torch.ops.lowbit.dequantize_4bit(packed, absmax, nested_absmax, nested_code, offset, blocksize, quant_type,
                                         shape, x.dtype)
    return x @ w.t()


@torch.library.impl(lib, "matmul_4bit_dx", "CompositeExplicitAutograd")
def _dx_ref(grad, packed, absmax, nested_absmax, nested_code, offset, blocksize, quant_type, shape):
    w = torch.ops.lowbit.dequantize_4bit(packed, absmax, nested_absmax, nested_code, offset, blocksize, quant_type,
                                         shape, grad.dtype)
    return grad @ w


# -- fake (meta) kernels: shapes only, so torch.compile can trace through ------------------
@torch.library.register_fake("lowbit::dequantize_4bit")
def _dequantize_fake(packed, absmax, nested_absmax, nested_code, offset, blocksize, quant_type, shape, dtype):
    torch._check(packed.numel() * packed.element_size() * 2 >= math.prod(shape))
    return packed.new_empty(shape, dtype=dtype)


@torch.library.register_fake("lowbit::dequantize_4bit_into")
def _dequantize_into_fake(packed, absmax, nested_absmax, nested_code, offset, blocksize, quant_type, shape, out):
    return None


@torch.library.register_fake("lowbit::quantize_4bit")
def _quantize_fake(w, blocksize, quant_type):
    n = w.numel()
    return w.new_empty(((n + 1) // 2, 1), dtype=torch.uint8), w.new_empty((-(-n // blocksize),), dtype=torch.float32)


@torch.library.register_fake("lowbit::gemv_4bit")
def _gemv_fake(x, packed, absmax, nested_absmax, nested_code, offset, blocksize, quant_type, shape):
    return x.new_empty((*x.shape[:-1], shape[0]))


@torch.library.register_fake("lowbit::matmul_4bit_dx")
def _dx_fake(grad, packed, absmax, nested_absmax, nested_code, offset, blocksize, quant_type, shape):
    return grad.new_empty((*grad.shape[:-1], shape[1]))
