"""Learned weight clipping (OmniQuant's LWC, Shao et al. 2024): `range: learned_clip`.

Each row (output channel, or group) quantizes the range γ·[min, max] of its own current weight
instead of [min, max]; γ ∈ [GAMMA_MIN, 1] is learned with a straight-through gradient (rounding
passes the gradient, values clipped away pass it to γ, as in LSQ). Because γ is relative to the
row's range, it keeps tracking the weight while LoRA moves it (an LSQ scale is absolute).

γ starts from a per-row grid search minimizing the weight's quantization error (what GPTQ/AWQ
checkpoints do once, as PTQ), so at step 0 the layer is already the clipped RTN; training then
moves it. γ = γ0 + LR_MULT·δ with δ the parameter (init 0): the run's LoRA learning rate (~5e-4
with Adam) then moves γ at OmniQuant's ~1e-2 per step instead of 20× slower.
"""
from __future__ import annotations

import torch
from torch import nn

from lowbit.methods.qat.config import QuantizerConfig
from lowbit.methods.qat.fake_quant import FakeQuantizer
from lowbit.methods.qat.numerics import as_rows, int_range, levels, quantize_rows, straight_through

GAMMA_MIN, LR_MULT = 0.3, 20.0
GRID = torch.linspace(1.0, 0.5, 21).tolist()
EPS = 1e-8


def clipped_qparams(rows: torch.Tensor, gamma: torch.Tensor, cfg: QuantizerConfig):
    """(scale, zero) for the clipped range; gamma [r, 1] (symmetric) or [r, 2] (asymmetric: max, min factors).
    The row's min/max are constants here (as in `minmax_qparams`); the gradient flows to gamma."""
    r = rows.detach().float()
    if cfg.symmetric:
        return (gamma[:, :1] * r.abs().amax(-1, keepdim=True) / levels(cfg)).clamp_min(EPS), None
    qmin, qmax = int_range(cfg)
    hi = gamma[:, :1] * r.amax(-1, keepdim=True).clamp(min=0)
    lo = gamma[:, 1:2] * r.amin(-1, keepdim=True).clamp(max=0)
    scale = ((hi - lo) / (qmax - qmin)).clamp_min(EPS)
    z = qmin - lo / scale
    return scale, straight_through(z, torch.round(z)).clamp(qmin, qmax)


@torch.no_grad()
def search_gamma(rows: torch.Tensor, cfg: QuantizerConfig, grid=GRID) -> torch.Tensor:
    """Per-row γ from `grid` minimizing the squared quantization error of the rows."""
    rows = rows.float()
    width = 1 if cfg.symmetric else 2
    best_err = torch.full((rows.shape[0], 1), float("inf"))
    best = torch.ones(rows.shape[0], width)
    for g in grid:
        gamma = torch.full((rows.shape[0], width), g)
        scale, zero = clipped_qparams(rows, gamma, cfg)
        _, deq = quantize_rows(rows, scale, zero, cfg)
        err = (deq - rows).pow(2).sum(-1, keepdim=True)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best = torch.where(better, gamma, best)
    return best


class ClippedFakeQuantizer(FakeQuantizer):
    """A weight `FakeQuantizer` whose per-row range is a learned fraction of the row's range."""

    def __init__(self, cfg: QuantizerConfig, role: str, weight: torch.Tensor | None = None,
                 weight_dtype: torch.dtype | None = None):
        super().__init__(cfg, role, weight_dtype=weight_dtype)
        width = 1 if cfg.symmetric else 2
        if weight is not None:
            init = search_gamma(as_rows(weight.detach().float(), cfg), cfg)
        else:  # shapes only (rebuilt from a saved state)
            init = torch.ones(0, width)
        self.register_buffer("clip_init", init)
        self.clip_delta = nn.Parameter(torch.zeros_like(init))

    @property
    def clips(self) -> bool:
        return True

    def gamma(self) -> torch.Tensor:
        return (self.clip_init + LR_MULT * self.clip_delta).clamp(GAMMA_MIN, 1.0)

    def qparams(self, rows: torch.Tensor):
        if self.clip_init.shape[0] != rows.shape[0]:
            raise ValueError(f"learned clipping holds {self.clip_init.shape[0]} rows, the weight has {rows.shape[0]}")
        return clipped_qparams(rows, self.gamma(), self.cfg)
