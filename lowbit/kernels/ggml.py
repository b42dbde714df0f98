"""GGUF block quantization (Q4_0, Q5_0, Q8_0, Q4_K, Q5_K, Q6_K) on the fastest backend at hand.

``quantize_ggml(rows, qtype, quant_weights=None)`` returns the bytes of ``lowbit.format.ggml_quants.quantize``,
which are llama.cpp's ``quantize_<type>``: the C++ CPU kernels (``torch.ops.lowbit_cpu.ggml_quantize``, in
``cpu/ggml_quant*.cpp``) when the CPU backend is built, else (or with ``LOWBIT_KERNELS=reference``) the pure-torch
reference. Both take fp32/bf16/fp16 rows and quantize their exact fp32 values.
"""
from __future__ import annotations

import numpy as np
import torch

from lowbit.format import ggml_quants
from lowbit.format.ggml_quants import SUPPORTED_TYPES, row_bytes

__all__ = ["COVERED", "backend", "quantize_ggml"]

COVERED = frozenset(SUPPORTED_TYPES)  # every type, with and without quant_weights
_IN_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def backend() -> str:
    """"cpp" when the C++ quantizers will run (with ``torch.ops.lowbit_cpu.ggml_isa()`` naming the vector path),
    else "reference"."""
    from lowbit.kernels import ensure_backends
    return "cpp" if ensure_backends()["cpu"] else "reference"


def _rows(w) -> torch.Tensor:
    if not isinstance(w, torch.Tensor):
        w = torch.as_tensor(np.asarray(w))
    w = w.detach().to("cpu")
    if w.ndim == 1:
        w = w[None]
    w = w.reshape(-1, w.shape[-1])
    return w if w.dtype in _IN_DTYPES else w.float()


def _weights(quant_weights, rows: int, n: int) -> torch.Tensor | None:
    """imatrix -> (groups, n) float32: one row for all rows, or one per equal group of rows (experts)."""
    if quant_weights is None:
        return None
    qw = _rows(quant_weights).float().contiguous()
    if qw.shape[-1] != n or rows % qw.shape[0]:
        raise ValueError(f"quant_weights of shape {tuple(qw.shape)} do not fit {rows} rows of {n}")
    if qw.numel() and not bool(torch.isfinite(qw).all()):
        raise ValueError("ggml quantization needs finite values (found inf/nan)")
    return qw


def quantize_ggml(rows, qtype: str, quant_weights=None) -> torch.Tensor:
    """``rows`` (rows x n, or one row) in the ggml block layout of ``qtype``: a (rows, row_bytes) uint8 tensor,
    byte-identical to llama.cpp (``.numpy().tobytes()`` is the GGUF tensor data). ``quant_weights``: an
    importance-matrix row of length n, or one such row per equal group of rows."""
    qt = qtype.upper()
    if qt not in COVERED or backend() != "cpp":
        return ggml_quants.quantize(rows, qtype, quant_weights)
    x = _rows(rows)
    n = x.shape[-1]
    row_bytes(qt, n)  # a row length the type cannot take: the reference's ValueError
    return torch.ops.lowbit_cpu.ggml_quantize(x, qt, _weights(quant_weights, x.shape[0], n))
