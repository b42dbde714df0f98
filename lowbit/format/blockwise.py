"""Pure-torch reference for blockwise 4-bit and 8-bit (de)quantization.

This is the contract: every kernel backend must reproduce these bytes and values exactly.
The arithmetic follows bitsandbytes' default backend step for step (multiply by the
reciprocal of absmax for full blocks, divide for the tail block, ties rounded down by
`bucketize`), because byte-identity with bitsandbytes is a project guarantee.
"""
from __future__ import annotations

import functools

import torch

from lowbit.format.codes import BLOCKSIZES, QUANT_TYPES, code_4bit, dynamic_map, quantize_bounds


def check_blocksize(blocksize: int) -> None:
    if blocksize not in BLOCKSIZES:
        raise ValueError(f"invalid blocksize {blocksize!r}: choose one of {', '.join(map(str, BLOCKSIZES))}")


def check_quant_type(quant_type: str) -> None:
    if quant_type not in QUANT_TYPES:
        raise ValueError(f"invalid quant_type {quant_type!r}: choose one of {', '.join(QUANT_TYPES)}")


def check_weight_dtype(w: torch.Tensor) -> None:
    if w.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise TypeError(f"quantize expects a float32/bfloat16/float16 tensor, got {w.dtype}")


def _absmax_and_scaled(flat: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    n = flat.numel()
    rem = n % blocksize
    full = n - rem
    blocks = flat[:full].reshape(-1, blocksize)
    absmax = blocks.abs().max(dim=-1)[0]
    scaled = torch.clamp(blocks * (1.0 / absmax.clamp(min=1e-38).view(-1, 1)), -1, 1).reshape(-1)
    if rem:
        am = flat[full:].abs().max().clamp(min=1e-38)
        absmax = torch.cat([absmax, am.unsqueeze(0)])
        scaled = torch.cat([scaled, torch.clamp(flat[full:] / am, -1, 1)])
    return absmax, scaled


def quantize_4bit_packed(w: torch.Tensor, blocksize: int = 64, quant_type: str = "nf4") -> tuple[torch.Tensor, torch.Tensor]:
    """Blockwise 4-bit quantization → (packed uint8 of shape (ceil(n/2), 1), fp32 absmax per block).

    Two codes per byte, the even element in the high nibble (bitsandbytes' order).
    """
    check_blocksize(blocksize)
    check_quant_type(quant_type)
    flat = w.reshape(-1).float()
    absmax, scaled = _absmax_and_scaled(flat, blocksize)
    if scaled.numel() % 2:
        scaled = torch.nn.functional.pad(scaled, (0, 1))
    bounds, order = quantize_bounds(quant_type, flat.device)
    q = torch.bucketize(scaled, bounds, out_int32=True)
    if quant_type != "nf4":  # NF4's code book is sorted; FP4's is in bit-pattern order
        q = order[q]
    q8 = q.to(torch.uint8)
    packed = ((q8[::2] << 4) | q8[1::2]).unsqueeze(1)
    return packed, absmax


def unpack_codes(packed: torch.Tensor, n: int) -> torch.Tensor:
    """Packed bytes → int64 4-bit codes (first n)."""
    p = packed.reshape(-1).view(torch.uint8)
    out = torch.empty(p.numel() * 2, dtype=torch.int64, device=p.device)
    out[0::2] = p >> 4
    out[1::2] = p & 0xF
    return out[:n]


def dequantize_4bit_values(packed: torch.Tensor, absmax: torch.Tensor, shape, dtype: torch.dtype,
                           blocksize: int = 64, quant_type: str = "nf4") -> torch.Tensor:
    """code[q] * absmax[block] in fp32, then cast once to `dtype` (bitsandbytes' rounding)."""
    n = 1
    for s in shape:
        n *= int(s)
    vals = code_4bit(quant_type, packed.device)[unpack_codes(packed, n)]
    return _scale_blocks(vals, absmax.float(), blocksize).reshape(tuple(shape)).to(dtype)


def _scale_blocks(vals: torch.Tensor, absmax: torch.Tensor, blocksize: int) -> torch.Tensor:
    n = vals.numel()
    rem = n % blocksize
    full = n - rem
    out = torch.empty(n, dtype=torch.float32, device=vals.device)
    out[:full] = (vals[:full].view(-1, blocksize) * absmax[: full // blocksize].view(-1, 1)).reshape(-1)
    if rem:
        out[full:] = vals[full:] * absmax[full // blocksize]
    return out


_LUT_SIZE = 65536


@functools.lru_cache(maxsize=4)
def _nearest_code_lut(code_key: tuple) -> torch.Tensor:
    # bitsandbytes' CPU 8-bit quantizer rounds through a 65536-bin table over [-1, 1]
    # (not exact nearest): we build the same table so the nested-absmax bytes match.
    code = torch.tensor(code_key, dtype=torch.float32)
    mids = 0.5 * (code[:-1] + code[1:])
    grid = -1.0 + (2.0 * torch.arange(_LUT_SIZE, dtype=torch.float32)) / (_LUT_SIZE - 1)
    return torch.searchsorted(mids, grid, right=False).to(torch.uint8)


def quantize_blockwise_8bit(x: torch.Tensor, blocksize: int = 256,
                            code: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """8-bit blockwise quantization with the dynamic map (used for nested absmax).

    Rounding follows bitsandbytes' CPU kernel: scale by 1/absmax, map to one of 65536
    bins, look the code up; an all-zero block stores code 0.
    """
    code = dynamic_map() if code is None else code
    lut = _nearest_code_lut(tuple(code.cpu().tolist())).to(x.device)
    flat = x.reshape(-1).float()
    n = flat.numel()
    nblocks = -(-n // blocksize)
    padded = torch.nn.functional.pad(flat, (0, nblocks * blocksize - n)).view(nblocks, blocksize)
    absmax = padded.abs().max(dim=-1)[0]
    inv = 1.0 / torch.where(absmax == 0, 1.0, absmax)
    v = torch.clamp(padded * inv.view(-1, 1), -1.0, 1.0)
    idx = ((v + 1.0) * 0.5 * (_LUT_SIZE - 1) + 0.5).to(torch.int64)
    q = torch.where((absmax == 0).view(-1, 1), 0, lut[idx]).to(torch.uint8)
    return q.reshape(-1)[:n].reshape(x.shape), absmax


def dequantize_blockwise_8bit(q: torch.Tensor, absmax: torch.Tensor, blocksize: int = 256,
                              code: torch.Tensor | None = None) -> torch.Tensor:
    code = dynamic_map(q.device) if code is None else code
    vals = code[q.reshape(-1).long()]
    return _scale_blocks(vals, absmax.float(), blocksize).reshape(q.shape)
