"""LoftQ on one weight: alternate quantization and a rank-r fit of the residual.

Per weight W, for T iterations (L_0 = 0):
    Q_t = quantize(W - L_{t-1})                  (the exact base quantizer training uses)
    L_t = rank-r SVD of (W - deq(Q_t))
and the adapter is set so that peft's delta s·B·A equals L_t, with s = alpha/r (alpha/sqrt(r)
for rsLoRA): B = U·sqrt(S)/sqrt(s), A = sqrt(S)·Vh/sqrt(s). peft's own LoftQ ignores s (it is
only right for alpha == r) and runs on CUDA only; this works for any alpha, on CPU or GPU.

Calibrated (activation-aware) LoftQ replaces the SVD by one of (W - deq(Q_t))·H^{1/2}, H the
layer's input second moment on calibration text, un-whitened by H^{-1/2}: it minimises the
layer's output error instead of its weight error (see `calibration`).

Errors are ‖W − deq(Q) − s·B·A‖_F / ‖W‖_F (calibrated: ‖(…)·H^{1/2}‖_F / ‖W·H^{1/2}‖_F).
Entry 0 is plain quantization with B = 0 (zero-init QLoRA); the iterate with the lowest error is kept.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from lowbit.errors import ConfigError
from lowbit.methods.loftq.calibration import Whitening, lapack_threads
from lowbit.methods.loftq.quantizers import BaseQuantizer

SVD_METHODS = ("full", "lowrank")


def lora_scaling(r: int, alpha: float, use_rslora: bool = False) -> float:
    """peft's scaling: alpha/r, or alpha/sqrt(r) with rsLoRA."""
    if r <= 0:
        raise ConfigError(f"lora.r must be a positive integer, got {r}")
    return alpha / math.sqrt(r) if use_rslora else alpha / r


def _rank_r(res: torch.Tensor, r: int, svd: str, oversample: int, niter: int):
    if svd == "full":
        U, S, Vh = torch.linalg.svd(res, full_matrices=False)
        return U[:, :r], S[:r], Vh[:r]
    # randomized range finder: ~50x faster than full SVD on a 2048x640 weight at r=16
    q = min(r + oversample, *res.shape)
    U, S, V = torch.svd_lowrank(res, q=q, niter=niter)
    return U[:, :r], S[:r], V[:, :r].T


@dataclass
class LayerReport:
    name: str
    shape: tuple[int, int]
    errors: list[float]          # [zero-init, after iter 1, ..., after iter T]
    best_iter: int
    seconds: float
    metric: str = "weight"       # weight: ‖E‖/‖W‖; activation: ‖E·H^½‖/‖W·H^½‖ (calibrated)

    @property
    def zero_init_error(self) -> float:
        return self.errors[0]

    @property
    def final_error(self) -> float:
        return self.errors[self.best_iter]

    def as_dict(self) -> dict:
        return {"name": self.name, "shape": list(self.shape), "metric": self.metric, "errors": self.errors,
                "best_iter": self.best_iter, "zero_init_error": self.zero_init_error, "loftq_error": self.final_error,
                "seconds": self.seconds}


def loftq_weight(w: torch.Tensor, quantizer: BaseQuantizer, r: int, scaling: float, iters: int = 5,
                 svd: str = "full", oversample: int = 8, niter: int = 4, device=None, whiten: Whitening | None = None):
    """LoftQ on one weight → (quant state, A (r, in) fp32, B (out, r) fp32, errors, best iteration).

    `w` keeps its dtype for quantization (so the base bytes match a plain load of that
    checkpoint); residuals and SVD run in fp32 on `device` (default: w's device).
    With `whiten` (R = H^{1/2} of the layer's inputs) the low-rank step minimises the output
    error ‖(W − deq(Q) − sBA)·R‖ instead of the weight error, and `errors` are in that metric.
    """
    if iters < 1:
        raise ConfigError(f"LoftQ needs at least 1 iteration, got {iters}")
    if svd not in SVD_METHODS:
        raise ConfigError(f"loftq svd {svd!r} unknown; choose one of {', '.join(SVD_METHODS)}")
    if w.dim() != 2:
        raise ConfigError(f"LoftQ works on 2-D Linear weights, got shape {tuple(w.shape)}")
    if r > min(w.shape):
        raise ConfigError(f"lora.r={r} exceeds min(shape)={min(w.shape)} of a {tuple(w.shape)} weight; lower lora.r")
    device = torch.device(device) if device is not None else w.device
    w = w.to(device)
    w32 = w.float()
    R = Rinv = None
    if whiten is not None:
        if whiten.sqrt.shape != (w.shape[1], w.shape[1]):
            raise ConfigError(f"calibration moment of shape {tuple(whiten.sqrt.shape)} does not fit a weight of "
                              f"shape {tuple(w.shape)}")
        R, Rinv = whiten.sqrt.to(device), whiten.inv_sqrt.to(device)
    metric = (lambda e: e) if R is None else (lambda e: e @ R)  # noqa: E731
    norm = metric(w32).norm().clamp_min(1e-30)
    state, deq = quantizer(w)
    errors = [(metric(w32 - deq).norm() / norm).item()]
    best = (state, None, None)
    low = torch.zeros_like(w32)
    for _ in range(iters):
        if len(errors) > 1:  # iteration 1 reuses quantize(W) from the zero-init error above
            state, deq = quantizer((w32 - low).to(w.dtype))
        res = w32 - deq
        m = metric(res)
        with lapack_threads(device):
            U, S, Vh = _rank_r(m, r, svd, oversample, niter)
        if Rinv is not None:
            Vh = Vh @ Rinv  # un-whiten: the rank-r term of res·R, mapped back to weight space
        sq = S.sqrt() / math.sqrt(scaling)  # peft applies s·B·A: each factor carries 1/√s
        B, A = U * sq, sq[:, None] * Vh
        low = scaling * (B @ A)
        errors.append((metric(res - low).norm() / norm).item())
        if errors[-1] <= min(errors[:-1]):
            best = (state, A, B)
    best_iter = min(range(len(errors)), key=errors.__getitem__)
    state, A, B = best
    cpu = lambda t: None if t is None else t.cpu()  # noqa: E731
    if hasattr(state, "to"):
        state = state.to("cpu")
    return state, cpu(A), cpu(B), errors, best_iter


@dataclass
class LoftQResult:
    r: int
    alpha: float
    use_rslora: bool
    scaling: float
    iters: int
    svd: str
    quant_type: str
    blocksize: int
    double_quant: bool
    lora: dict[str, tuple[torch.Tensor, torch.Tensor] | None] = field(default_factory=dict)  # module -> (A, B)
    layers: list[LayerReport] = field(default_factory=list)
    seconds: float = 0.0
    calibration: dict | None = None  # file, samples, seq_len, damp, seconds (activation-aware LoftQ)

    def summary(self) -> dict:
        def rel_sum(key):  # energy-weighted over layers: Σ err² ‖W‖² would need norms; use mean
            return sum(getattr(l, key) for l in self.layers) / max(len(self.layers), 1)
        return {"r": self.r, "alpha": self.alpha, "use_rslora": self.use_rslora, "scaling": self.scaling,
                "iters": self.iters, "svd": self.svd, "quant_type": self.quant_type, "blocksize": self.blocksize,
                "double_quant": self.double_quant, "layers": len(self.layers), "seconds": self.seconds,
                "calibration": self.calibration, "metric": "activation" if self.calibration else "weight",
                "mean_zero_init_error": rel_sum("zero_init_error"), "mean_loftq_error": rel_sum("final_error")}

    def report(self) -> dict:
        return {**self.summary(), "per_layer": [l.as_dict() for l in self.layers]}


def new_result(r, alpha, use_rslora, iters, svd, quantizer) -> LoftQResult:
    return LoftQResult(r=r, alpha=alpha, use_rslora=use_rslora, scaling=lora_scaling(r, alpha, use_rslora),
                       iters=iters, svd=svd, quant_type=quantizer.quant_type, blocksize=quantizer.blocksize,
                       double_quant=quantizer.double_quant)
