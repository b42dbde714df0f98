"""The 4-bit and 8-bit code books, value for value the ones bitsandbytes uses.

NF4 is the QLoRA normal-float table; FP4 is bitsandbytes' e2m1 layout (bit-pattern
order, bias 2, normalised to [-1, 1]); the dynamic map is the signed 8-bit tree code
used for double-quantizing absmax values.
"""
from __future__ import annotations

import functools

import torch

NF4_VALUES = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)
# In bit-pattern order (index = 4-bit code); scaled by 1/12 below, as bitsandbytes does.
# Index 8 (sign bit set, magnitude 0) is +0.0, as in bitsandbytes' quant_map: serialized states stay byte-identical.
_FP4_RAW = (0.0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0, 0.0, -0.0625, -8.0, -12.0, -4.0, -6.0, -2.0, -3.0)

QUANT_TYPES = ("nf4", "fp4")
BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
NESTED_BLOCKSIZE = 256


@functools.lru_cache(maxsize=None)
def _code_cpu(quant_type: str) -> torch.Tensor:
    if quant_type == "nf4":
        t = torch.tensor(NF4_VALUES, dtype=torch.float32)
    elif quant_type == "fp4":
        t = torch.tensor(_FP4_RAW, dtype=torch.float32)
        t.div_(t.abs().max())
    else:
        raise ValueError(f"quant_type must be one of {QUANT_TYPES}, got {quant_type!r}")
    return t


def code_4bit(quant_type: str, device: torch.device | str | None = None) -> torch.Tensor:
    """The 16-entry fp32 code book indexed by 4-bit code."""
    t = _code_cpu(quant_type)
    return t if device is None or torch.device(device) == t.device else t.to(device)


@functools.lru_cache(maxsize=None)
def _quantize_bounds_cpu(quant_type: str) -> tuple[torch.Tensor, torch.Tensor]:
    code = _code_cpu(quant_type)
    order = torch.argsort(code)
    mids = (code[order[:-1]] + code[order[1:]]) / 2
    return mids, order


def quantize_bounds(quant_type: str, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Decision boundaries (midpoints of the sorted code book) and the sorted→code index map."""
    mids, order = _quantize_bounds_cpu(quant_type)
    if device is not None and torch.device(device) != mids.device:
        return mids.to(device), order.to(device)
    return mids, order


@functools.lru_cache(maxsize=None)
def _dynamic_map_cpu(signed: bool = True, max_exponent_bits: int = 7, total_bits: int = 8) -> torch.Tensor:
    # Dettmers' dynamic tree quantization map (arXiv:1511.04561), built the way
    # bitsandbytes.functional.create_dynamic_map builds it so the floats match bit for bit.
    data: list[float] = []
    non_sign_bits = total_bits - 1
    additional_items = 2 ** (non_sign_bits - max_exponent_bits) - 1
    i = 0
    for i in range(max_exponent_bits):
        n_frac = int(2 ** (i + non_sign_bits - max_exponent_bits) + 1 if signed
                     else 2 ** (i + non_sign_bits - max_exponent_bits + 1) + 1)
        bounds = torch.linspace(0.1, 1, n_frac, dtype=torch.float32)
        means = (bounds[:-1] + bounds[1:]) / 2.0
        data += ((10 ** (-(max_exponent_bits - 1) + i)) * means).tolist()
        if signed:
            data += (-(10 ** (-(max_exponent_bits - 1) + i)) * means).tolist()
    if additional_items > 0:
        bounds = torch.linspace(0.1, 1, additional_items + 1, dtype=torch.float32)
        means = (bounds[:-1] + bounds[1:]) / 2.0
        data += ((10 ** (-(max_exponent_bits - 1) + i)) * means).tolist()
        if signed:
            data += (-(10 ** (-(max_exponent_bits - 1) + i)) * means).tolist()
    data += [0, 1.0]
    data += [0] * (256 - len(data))
    data.sort()
    return torch.tensor(data, dtype=torch.float32)


def dynamic_map(device=None) -> torch.Tensor:
    """The signed 8-bit dynamic map (256 sorted fp32 values) used for nested absmax."""
    t = _dynamic_map_cpu()
    return t if device is None or torch.device(device) == t.device else t.to(device)
