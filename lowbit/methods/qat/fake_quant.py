"""`FakeQuantizer`: quantize → dequantize in the forward, straight-through in the backward."""
from __future__ import annotations

import math

import torch
from torch import nn

from lowbit import kernels
from lowbit.errors import ConfigError
from lowbit.methods.qat.config import QuantizerConfig
from lowbit.methods.qat.gguf import RoundtripCache
from lowbit.methods.qat.numerics import as_rows, grad_scale, levels, minmax_qparams, quantize_rows, straight_through


class FakeQuantizer(nn.Module):
    """Built from a `QuantizerConfig`. `role` is "weight", "activation" or "kv".

    Ranges: MinMax from the tensor itself (dynamic), a static range observed during
    `lowbit.methods.qat.calibrate` (activations, dynamic: false), or a learned LSQ scale (`scale`
    parameter; its gradient is scaled by 1/sqrt(n·Q_P) as in Esser et al. 2020).
    Identity while disabled or before `start_step` (see `lowbit.methods.qat.set_step`)."""

    def __init__(self, cfg: QuantizerConfig, role: str, weight: torch.Tensor | None = None,
                 weight_dtype: torch.dtype | None = None):
        super().__init__()
        self.cfg, self.role = cfg, role
        self.step = 0
        self.observing = False
        self.weight_dtype = weight_dtype  # nf4: the dtype the deployment format quantizes from
        self.gguf_cache = self.gguf_layout = None  # gguf: the last rounding; the file's layout of this tensor
        if cfg.range == "learned":
            if weight is not None:
                init, _ = minmax_qparams(as_rows(weight.detach().float(), cfg), cfg)
            else:
                init = torch.ones(1, 1)
            self.scale = nn.Parameter(init)
            self.register_buffer("initialized", torch.tensor(weight is not None))
        elif role != "weight" and not cfg.dynamic:
            self.register_buffer("lo", torch.tensor(float("inf")))
            self.register_buffer("hi", torch.tensor(float("-inf")))

    @classmethod
    def from_config(cls, cfg: QuantizerConfig, role: str, **kw) -> "FakeQuantizer":
        return cls(cfg, role, **kw)

    @property
    def clips(self) -> bool:
        """Learned and static ranges clip (no gradient beyond them); MinMax covers the tensor."""
        return self.cfg.range == "learned" or hasattr(self, "lo")

    @property
    def active(self) -> bool:
        return self.cfg.enabled and self.step >= self.cfg.start_step

    def qparams(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        cfg = self.cfg
        if cfg.range == "learned":
            if not bool(self.initialized):  # activations: first batch's MinMax, then learned
                with torch.no_grad():
                    self.scale.copy_(minmax_qparams(rows, cfg)[0].amax().reshape(1, 1))
                    self.initialized.fill_(True)
            return grad_scale(self.scale, 1.0 / math.sqrt(rows.shape[-1] * levels(cfg))).abs().clamp_min(1e-12), None
        if hasattr(self, "lo"):
            if self.observing:
                with torch.no_grad():
                    self.lo.copy_(torch.minimum(self.lo, rows.min()))
                    self.hi.copy_(torch.maximum(self.hi, rows.max()))
            if not torch.isfinite(self.lo):
                raise ConfigError("a static activation range was never calibrated: run lowbit.methods.qat.calibrate(model, "
                                  "batches) first, or set dynamic: true")
            return minmax_qparams(torch.stack([self.lo, self.hi]).reshape(1, 2), cfg)
        return minmax_qparams(rows, cfg)

    def forward(self, x: torch.Tensor, out_dtype: torch.dtype | None = None) -> torch.Tensor:
        out_dtype = out_dtype or x.dtype
        if not self.active:
            return x.to(out_dtype)
        if self.cfg.dtype == "nf4":
            return straight_through(x.to(out_dtype), nf4_roundtrip(x, self.cfg, self.weight_dtype, out_dtype))
        if self.cfg.dtype == "gguf":  # llama.cpp's bytes for this tensor, decoded (lowbit.methods.qat.gguf)
            if self.gguf_cache is None:
                self.gguf_cache = RoundtripCache()
            return straight_through(x.to(out_dtype), self.gguf_cache(x, self.cfg.ggml_type, self.gguf_layout)
                                    .to(out_dtype))
        rows = as_rows(x.float(), self.cfg)
        scale, zero = self.qparams(rows)
        _, deq = quantize_rows(rows, scale, zero, self.cfg, clip_grad=self.clips)
        return deq.reshape(x.shape).to(out_dtype)

    @torch.no_grad()
    def quantize(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(grid values [rows, cols], scale, zero) exactly as `forward` computes them."""
        rows = as_rows(x.float(), self.cfg)
        scale, zero = self.qparams(rows)
        q, _ = quantize_rows(rows, scale, zero, self.cfg)
        return q, scale.detach().clone(), None if zero is None else zero.clone()

    def extra_repr(self) -> str:
        c = self.cfg
        bits = f"int{c.bits}" if c.dtype == "int" else f"gguf {c.ggml_type}" if c.dtype == "gguf" else c.dtype
        return (f"{self.role}: {bits} {'sym' if c.symmetric else 'asym'} {c.granularity}"
                f"{f' g{c.group_size}' if c.granularity == 'per_group' else ''} {c.range}"
                f"{'' if c.dynamic or self.role == 'weight' else ' static'}, enabled={c.enabled}, "
                f"start_step={c.start_step}")


def nf4_roundtrip(w: torch.Tensor, cfg: QuantizerConfig, weight_dtype: torch.dtype | None,
                  out_dtype: torch.dtype) -> torch.Tensor:
    """deq(quant(w)) in bitsandbytes' NF4 format — what a 4-bit merge/export of w stores."""
    return kernels.dequantize_4bit(nf4_quantize(w, cfg, weight_dtype), out_dtype)


def nf4_quantize(w: torch.Tensor, cfg: QuantizerConfig, weight_dtype: torch.dtype | None):
    """Quantize from fp32 — as `Linear4bit.set_weight` and `lowbit export --format bnb4` do — and
    record the layer's original dtype in the quant state."""
    import dataclasses

    q = kernels.quantize_4bit(w.detach().float().contiguous(), cfg.group_size, cfg.double_quant, "nf4")
    return dataclasses.replace(q, dtype=weight_dtype or w.dtype)
