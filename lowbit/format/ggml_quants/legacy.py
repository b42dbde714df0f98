"""Q8_0, Q4_0 and Q5_0: one scale per block of 32 (llama.cpp's legacy quants)."""
from __future__ import annotations

import numpy as np
import torch

from lowbit.format.ggml_quants.common import (
    _F32,
    QK8_0,
    _cdiv,
    _check_finite,
    _first_absmax,
    _pack_bits,
    _put_f16,
    _seqsum,
    _sqrtf,
    make_qx_quants,
)

_ROUNDF_HALF = float(np.nextafter(np.float32(0.5), np.float32(0)))


def _quantize_q8_0(x: torch.Tensor, qw, out: torch.Tensor):
    b = x.reshape(-1, QK8_0)
    amax = b.abs().amax(-1)
    _check_finite(amax)
    d = amax / 127.0
    idv = torch.where(d != 0, _cdiv(1.0, d), torch.zeros_like(d))
    x0 = b * idv[:, None]
    # roundf (half away from zero) == trunc(x + copysign(0.49999997f, x)) for |x| < 2**23; the cast truncates
    x0 += torch.full_like(x0, _ROUNDF_HALF).copysign_(x0)
    out[:, 2:] = x0.to(torch.int8).view(torch.uint8)
    _put_f16(out, 0, d)


def _quantize_q4_0_or_q5_0(x: torch.Tensor, qw: torch.Tensor | None, out: torch.Tensor, bits: int):
    rows, n = x.shape
    half = 1 << (bits - 1)  # 8 or 16
    b = x.reshape(-1, 32)
    B = b.shape[0]
    if qw is None:  # quantize_row_q{4,5}_0_ref
        amax, mx = _first_absmax(b)
        _check_finite(amax)
        d = mx / float(-half)
        idv = torch.where(d != 0, _cdiv(1.0, d), torch.zeros_like(d))
        # the two halves of each block go to separate contiguous arrays: the nibble packing pairs value j with j+16
        v = torch.empty(2, B, 16, dtype=_F32)
        torch.mul(b.view(B, 2, 16).transpose(0, 1), idv[None, :, None], out=v)
        v += half + 0.5
        with np.errstate(invalid="ignore"):  # 1/d overflows for subnormal d: inf/nan casts like x86 C (to 0)
            L = v.numpy().astype(np.uint8)  # (int8_t)(x0 + half + 0.5f): a positive value, truncated
        np.minimum(L, np.uint8(2 * half - 1), out=L)  # MIN(nmax, ...)
        lo, hi = L[0], L[1]
    else:  # quantize_row_q{4,5}_0_impl
        _check_finite(x.amax(-1), x.amin(-1))
        sum_x2 = _seqsum((x * x).t())  # per row, over the whole row
        sigma2 = sum_x2 / float(n)
        xt = b.t().contiguous()
        qwt = qw.expand(rows, n).reshape(-1, 32).t()
        sig = sigma2.repeat_interleave(n // 32)[None, :]
        d, L = make_qx_quants(xt, half, qwt * _sqrtf(sig + xt * xt))
        L = L.to(torch.uint8).numpy()  # (32, B), position-major
        lo, hi = L[:16].T, L[16:].T
    o = out.numpy()
    with np.errstate(over="ignore"):  # |d| > 65504 becomes inf, as GGML_FP32_TO_FP16 (round to nearest even)
        o[:, 0:2] = d.numpy().astype(np.float16).view(np.uint8).reshape(B, 2)
    u8 = np.uint8
    if bits == 4:
        np.bitwise_or(lo, hi * u8(16), out=o[:, 2:])
    else:  # qh: the little-endian uint32 whose bit j is value j's 5th bit
        o[:, 2:4] = _pack_bits(lo >= 16)
        o[:, 4:6] = _pack_bits(hi >= 16)
        np.bitwise_or(lo & u8(0xF), (hi & u8(0xF)) * u8(16), out=o[:, 6:])
