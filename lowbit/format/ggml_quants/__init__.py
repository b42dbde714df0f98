"""GGUF block quantizers (Q4_0, Q5_0, Q8_0, Q4_K, Q5_K, Q6_K) that are byte-identical to llama.cpp's ``ggml-quants.c``.

Vectorized over whole tensors (no loop over blocks), float32 throughout, reproducing the C reference bit for bit:

* every accumulation ``s += f(x[i])`` of the C code is a strictly sequential float32 sum (``_seqsum``: numpy's
  reduction over the leading axis of a C-contiguous array, which adds whole rows in order);
* ``nearest_int`` is the 12582912 magic-number trick (round half to even on fp32), emulated exactly;
* ``roundf`` (Q8_0) rounds half away from zero; ``(int8_t)`` casts truncate;
* operations keep the C order: ``w*x[i]*l`` is ``(w*x)*l`` and so on; no fused multiply-add;
* fp16 conversions are round-to-nearest-even (what ``GGML_FP32_TO_FP16`` does);
* ``sqrtf`` is computed in float64 and rounded (torch's float32 sqrt is not always correctly rounded), and
  ``c / tensor`` is written as a tensor division (``Tensor.__rtruediv__`` multiplies by the reciprocal).

``quantize(w, type, quant_weights=None)`` equals ``quantize_<type>(src, dst, nrow, n_per_row, quant_weights)``:
without ``quant_weights`` that is ``quantize_row_<type>_ref``, with them the ``*_impl`` (imatrix) variants
(Q8_0 ignores them, as in llama.cpp). Inputs must be finite. ``dequantize`` equals ``dequantize_row_<type>``.

The wide elementwise passes run in torch; the per-group scalar math and the byte packing run in numpy on views
of the same memory (the same IEEE float32 operations, with far less per-call overhead on small arrays). With
``torch.get_num_threads() > 1`` independent chunks run on that many worker threads.
"""
from __future__ import annotations

import numpy as np
import torch

from lowbit.format.ggml_quants import kquants
from lowbit.format.ggml_quants.common import (
    _F32,
    BLOCK_SIZE,
    QK_K,
    SUPPORTED_TYPES,
    TYPE_SIZE,
    _as_rows,
    _chunks,
    _fp16_to_f32,
    _k4_scale_min,
    _parallel,
    _row_weights,
    row_bytes,
)
from lowbit.format.ggml_quants.legacy import _quantize_q4_0_or_q5_0, _quantize_q8_0


def quantize(w, qtype: str, quant_weights=None, chunk_elems: int | None = None) -> torch.Tensor:
    """Quantize ``w`` (rows x n; fp32/bf16/fp16, quantized from its fp32 values) to the ggml block layout of ``qtype``.

    Returns a (rows, row_bytes) uint8 tensor (``.numpy().tobytes()`` is the GGUF tensor data). ``quant_weights``
    is an importance-matrix row of length n (or one such row per equal group of rows, e.g. per expert).
    """
    qtype = qtype.upper()
    if qtype not in SUPPORTED_TYPES:
        raise ValueError(f"unsupported ggml type {qtype}; supported: {', '.join(SUPPORTED_TYPES)}")
    x = _as_rows(w, check_finite=qtype in ("Q4_K", "Q5_K", "Q6_K"))  # the others check their block maxima
    rows, n = x.shape
    row_bytes(qtype, n)
    qw = _row_weights(quant_weights, rows, n)
    threads = torch.get_num_threads()
    if qtype in ("Q4_K", "Q5_K", "Q6_K"):
        fn = kquants.QUANTIZERS[qtype]
        default_chunk = kquants.CHUNK_ELEMS[qtype][qw is not None]
        parallel = qtype in kquants.PARALLEL_CHUNKS  # Q4_K/Q5_K spread their own work items
    else:
        fn = {"Q8_0": _quantize_q8_0, "Q4_0": lambda xc, q, o: _quantize_q4_0_or_q5_0(xc, q, o, 4),
              "Q5_0": lambda xc, q, o: _quantize_q4_0_or_q5_0(xc, q, o, 5)}[qtype]
        default_chunk = 1 << 18 if qw is None or qtype == "Q8_0" else 1 << 16
        parallel = True
    if parallel and threads > 1:
        # chunks go to worker threads and their ops stay within torch's parallel grain (32768 values): no
        # per-op thread barriers, which stall badly when other processes share the cores
        default_chunk = 1 << 15
    else:
        parallel = False
    out = torch.empty((rows, row_bytes(qtype, n)), dtype=torch.uint8)

    def run(chunk):
        r0, r1 = chunk
        q = None if qw is None else (qw if qw.shape[0] == 1 else qw[r0:r1])
        fn(x[r0:r1], q, out[r0:r1].view(-1, TYPE_SIZE[qtype]))

    chunks = list(_chunks(rows, n, chunk_elems or default_chunk))
    if parallel:
        _parallel(run, chunks)
    else:
        for c in chunks:
            run(c)
    return out


def _as_blocks(data, qtype: str, numel: int) -> torch.Tensor:
    if isinstance(data, (bytes, bytearray, memoryview)):
        data = np.frombuffer(data, dtype=np.uint8)
    if not isinstance(data, torch.Tensor):
        data = torch.from_numpy(np.array(data, copy=True).view(np.uint8).reshape(-1))
    raw = data.detach().to("cpu").contiguous().view(torch.uint8).reshape(-1)
    nblk = numel // BLOCK_SIZE[qtype]
    if numel % BLOCK_SIZE[qtype] or raw.numel() != nblk * TYPE_SIZE[qtype]:
        raise ValueError(f"{qtype}: {raw.numel()} bytes do not hold {numel} values")
    return raw.reshape(nblk, TYPE_SIZE[qtype])


def dequantize(data, qtype: str, shape) -> torch.Tensor:
    """``dequantize_row_<type>`` of raw block bytes into a float32 tensor of ``shape``."""
    qtype = qtype.upper()
    shape = tuple(int(s) for s in shape)
    numel = int(np.prod(shape))
    blk = _as_blocks(data, qtype, numel)
    i32 = torch.int32
    if qtype == "Q8_0":
        d = _fp16_to_f32(blk[:, 0:2])
        y = blk[:, 2:].view(torch.int8).to(_F32) * d
    elif qtype in ("Q4_0", "Q5_0"):
        d = _fp16_to_f32(blk[:, 0:2])
        qs = blk[:, -16:].to(i32)
        q = torch.cat([qs & 0xF, qs >> 4], dim=1)
        if qtype == "Q5_0":
            qh = blk[:, 2:6].to(torch.int64)
            qh = qh[:, 0] | (qh[:, 1] << 8) | (qh[:, 2] << 16) | (qh[:, 3] << 24)
            q = q | ((((qh[:, None] >> torch.arange(32)) & 1) << 4).to(i32))
            y = (q - 16).to(_F32) * d
        else:
            y = (q - 8).to(_F32) * d
    elif qtype in ("Q4_K", "Q5_K"):
        d, dmin = _fp16_to_f32(blk[:, 0:2]), _fp16_to_f32(blk[:, 2:4])
        sc, m = _k4_scale_min(blk[:, 4:16].to(i32))
        d1 = d * sc.to(_F32)  # (B, 8)
        m1 = dmin * m.to(_F32)
        qs = blk[:, -128:].to(i32).reshape(-1, 4, 32)
        q = torch.stack([qs & 0xF, qs >> 4], dim=2).reshape(-1, 8, 32)  # sub-block 2k: low nibbles, 2k+1: high
        if qtype == "Q5_K":
            qh = blk[:, 16:48].to(i32)
            q = q + ((qh[:, None, :] >> torch.arange(8)[None, :, None]) & 1) * 16
        y = d1[:, :, None] * q.to(_F32) - m1[:, :, None]
    elif qtype == "Q6_K":
        ql = blk[:, 0:128].to(i32).reshape(-1, 2, 2, 32)  # (B, half, l/32 of 64, 32)
        qh = blk[:, 128:192].to(i32).reshape(-1, 2, 1, 32)
        sc = blk[:, 192:208].view(torch.int8).to(_F32)
        d = _fp16_to_f32(blk[:, 208:210])
        lo = torch.stack([ql[:, :, 0] & 0xF, ql[:, :, 1] & 0xF, ql[:, :, 0] >> 4, ql[:, :, 1] >> 4], dim=2)
        hi = (qh >> (2 * torch.arange(4)[None, None, :, None])) & 3
        q = ((lo | (hi << 4)) - 32).to(_F32).reshape(-1, 16, 16)  # 16 groups of 16 values in row order
        y = (d * sc)[:, :, None] * q
    else:
        raise ValueError(f"unsupported ggml type {qtype}; supported: {', '.join(SUPPORTED_TYPES)}")
    return y.reshape(shape)


__all__ = ["BLOCK_SIZE", "QK_K", "SUPPORTED_TYPES", "TYPE_SIZE", "dequantize", "quantize", "row_bytes"]
