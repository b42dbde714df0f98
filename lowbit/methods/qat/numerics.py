"""Quantize → dequantize arithmetic shared by fake quant (training) and convert (deployment).

Both paths call `quantize_rows` with the same inputs, so a converted model reproduces the
fake-quantized forward bit for bit. Everything runs in fp32; a tensor is viewed as rows that
each share one scale (see `as_rows`).
"""
from __future__ import annotations

import torch

from lowbit.errors import ConfigError
from lowbit.format import intn
from lowbit.methods.qat.config import QuantizerConfig

FP_MAX = {"fp8_e4m3": 448.0, "fp8_e5m2": 57344.0, "fp4_e2m1": 6.0}
FP8_DTYPES = {"fp8_e4m3": torch.float8_e4m3fn, "fp8_e5m2": torch.float8_e5m2}
# E2M1 magnitudes by 3-bit code (exp<<1 | mantissa); the 4th bit is the sign
FP4_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)


class _StraightThrough(torch.autograd.Function):
    """Forward returns the rounded value exactly; backward passes the gradient to the unrounded one."""

    @staticmethod
    def forward(ctx, x, rounded):
        return rounded

    @staticmethod
    def backward(ctx, g):
        return g, None


class _GradScale(torch.autograd.Function):
    """Identity forward, gradient × g backward (LSQ's step-size gradient scale)."""

    @staticmethod
    def forward(ctx, x, g: float):
        ctx.g = g
        return x

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.g, None


def straight_through(x: torch.Tensor, rounded: torch.Tensor) -> torch.Tensor:
    return _StraightThrough.apply(x, rounded) if x.requires_grad else rounded


def grad_scale(x: torch.Tensor, g: float) -> torch.Tensor:
    return _GradScale.apply(x, g) if x.requires_grad else x


def int_range(cfg: QuantizerConfig) -> tuple[int, int]:
    return intn.int_range(cfg.bits, cfg.symmetric)


def levels(cfg: QuantizerConfig) -> float:
    """Largest magnitude on the quantized grid (LSQ's Q_P; the float formats' max)."""
    return float(int_range(cfg)[1]) if cfg.dtype == "int" else FP_MAX[cfg.dtype]


def as_rows(x: torch.Tensor, cfg: QuantizerConfig) -> torch.Tensor:
    """View x as [rows, cols]; each row shares one scale.

    per_tensor: one row. per_channel (weights [out, in]) / per_token (activations [..., d]):
    one row per output channel / per token (for post-RoPE keys/values [b, heads, t, d]: per
    token and head). per_group: consecutive groups of group_size along the last dim."""
    if cfg.granularity == "per_tensor":
        return x.reshape(1, -1)
    if cfg.granularity == "per_group":
        if x.shape[-1] % cfg.group_size:
            raise ConfigError(f"group_size {cfg.group_size} does not divide the last dimension {x.shape[-1]} of a "
                              f"{tuple(x.shape)} tensor; choose a group_size that divides it")
        return x.reshape(-1, cfg.group_size)
    return x.reshape(-1, x.shape[-1])


def minmax_qparams(rows: torch.Tensor, cfg: QuantizerConfig) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(scale [r, 1], zero point [r, 1] or None) covering each row's range (fp32)."""
    if cfg.symmetric:
        return intn.symmetric_scale(rows, levels(cfg)), None
    return intn.asymmetric_qparams(rows, cfg.bits)


def _round_fp4(v: torch.Tensor) -> torch.Tensor:
    table = torch.tensor(FP4_VALUES, device=v.device)
    mids = (table[1:] + table[:-1]) / 2
    return torch.sign(v) * table[torch.bucketize(v.abs(), mids)]


def quantize_rows(rows: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None,
                  cfg: QuantizerConfig, clip_grad: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """(q, dequantized) for fp32 rows. q holds grid values as floats: integer levels (zero point
    included) for int, the representable fp8/fp4 values for the float formats. Rounding is
    straight-through. clip_grad: values beyond the range get no gradient (LSQ, static ranges);
    off for MinMax, whose range holds every value (up to float rounding at the edge)."""
    v = rows / scale
    if cfg.dtype == "int":
        lo, hi = int_range(cfg)
        if zero is not None:
            v = v + zero
    else:
        hi = FP_MAX[cfg.dtype]
        lo = -hi
    vc = v.clamp(lo, hi)
    if cfg.dtype == "int":
        rounded = torch.round(vc)
    else:
        rounded = vc.to(FP8_DTYPES[cfg.dtype]).float() if cfg.dtype in FP8_DTYPES else _round_fp4(vc)
    q = straight_through(vc if clip_grad else v, rounded)
    return q, ((q - zero) if zero is not None else q) * scale


def dequantize_rows(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None) -> torch.Tensor:
    """The deployment side of `quantize_rows` (same fp32 operations, so equal bit for bit)."""
    return intn.dequantize_int(q, scale, zero)


# -- storage: codes as small unsigned integers, 4-bit ones packed two per byte ------------------

def code_bits(cfg: QuantizerConfig) -> int:
    return 8 if cfg.dtype in FP8_DTYPES else 4 if cfg.dtype in ("fp4_e2m1", "nf4") else cfg.bits


def encode(q: torch.Tensor, cfg: QuantizerConfig) -> torch.Tensor:
    """Grid values → stored codes (float8 tensor for fp8; uint8, two nibbles per byte for ≤ 4 bits)."""
    if cfg.dtype in FP8_DTYPES:
        return q.to(FP8_DTYPES[cfg.dtype])
    if cfg.dtype == "int":
        u = (q - int_range(cfg)[0]).to(torch.uint8)
    else:  # fp4: sign bit | magnitude index
        table = torch.tensor(FP4_VALUES, device=q.device)
        idx = (q.abs().unsqueeze(-1) == table).float().argmax(-1).to(torch.uint8)
        u = idx | ((q < 0).to(torch.uint8) << 3)
    if code_bits(cfg) > 4:
        return u
    flat = u.reshape(-1)
    if flat.numel() % 2:
        flat = torch.cat([flat, flat.new_zeros(1)])
    return (flat[0::2] << 4) | flat[1::2]


def decode(codes: torch.Tensor, cfg: QuantizerConfig, shape: tuple[int, ...]) -> torch.Tensor:
    """Stored codes → grid values (fp32), the inverse of `encode`."""
    n = 1
    for s in shape:
        n *= s
    if cfg.dtype in FP8_DTYPES:
        return codes.float().reshape(shape)
    if code_bits(cfg) <= 4:
        u = torch.stack([codes >> 4, codes & 0xF], -1).reshape(-1)[:n]
    else:
        u = codes.reshape(-1)
    if cfg.dtype == "int":
        return (u.float() + int_range(cfg)[0]).reshape(shape)
    table = torch.tensor(FP4_VALUES, device=codes.device)
    mag = table[(u & 0x7).long()]
    return torch.where((u & 0x8) > 0, -mag, mag).reshape(shape)
