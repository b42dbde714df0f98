"""Shared numerics of the ggml quantizers: constants, exact float32 helpers, scale searches, bit packing."""
from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

QK_K = 256
QK4_0 = QK5_0 = QK8_0 = 32
K_SCALE_SIZE = 12
GROUP_MAX_EPS = np.float32(1e-15)

# elements per block and bytes per block (ggml_blck_size / ggml_type_size)
BLOCK_SIZE = {"F32": 1, "F16": 1, "BF16": 1, "Q4_0": 32, "Q4_1": 32, "Q5_0": 32, "Q5_1": 32, "Q8_0": 32, "Q8_1": 32,
              "Q2_K": QK_K, "Q3_K": QK_K, "Q4_K": QK_K, "Q5_K": QK_K, "Q6_K": QK_K, "Q8_K": QK_K}
TYPE_SIZE = {"F32": 4, "F16": 2, "BF16": 2, "Q4_0": 18, "Q4_1": 20, "Q5_0": 22, "Q5_1": 24, "Q8_0": 34, "Q8_1": 36,
             "Q2_K": 84, "Q3_K": 110, "Q4_K": 144, "Q5_K": 176, "Q6_K": 210, "Q8_K": 292}
SUPPORTED_TYPES = ("Q4_0", "Q5_0", "Q8_0", "Q4_K", "Q5_K", "Q6_K")

_F32 = torch.float32
_MAGIC = 12582912.0  # 1.5 * 2**23


def row_bytes(qtype: str, n: int) -> int:
    """``ggml_row_size``: bytes of one row of ``n`` values."""
    qtype = qtype.upper()
    if n % BLOCK_SIZE[qtype]:
        raise ValueError(f"{qtype}: row length {n} is not a multiple of {BLOCK_SIZE[qtype]}")
    return n // BLOCK_SIZE[qtype] * TYPE_SIZE[qtype]


# ----------------------------------------------------------------------------------------------- exact C helpers

def _seqsum_loop(t: torch.Tensor) -> torch.Tensor:
    acc = torch.zeros(t.shape[1:], dtype=t.dtype)
    for i in range(t.shape[0]):
        acc += t[i]
    return acc


def _seqsum_numpy(t: torch.Tensor) -> torch.Tensor:
    # numpy reduces a C-contiguous (n, M>=2) array over axis 0 by adding whole rows in order (elementwise adds,
    # no pairwise summation, which it only uses along the contiguous axis)
    a = t.contiguous().numpy().reshape(t.shape[0], -1)
    pad = a.shape[1] < 2
    if pad:
        a = np.concatenate([a, np.zeros_like(a)], axis=1)
    with np.errstate(all="ignore"):
        s = np.add.reduce(a, axis=0)
    return torch.from_numpy(s[:1] if pad else s).reshape(t.shape[1:])


def _seqsum_index_add(t: torch.Tensor) -> torch.Tensor:
    # CPU index_add_ adds the source slices one after the other
    out = torch.zeros((1,) + tuple(t.shape[1:]), dtype=t.dtype)
    out.index_add_(0, torch.zeros(t.shape[0], dtype=torch.long), t)
    return out[0]


def _pick_seqsum():
    """The fastest implementation that sums in order on this build (checked against the plain loop)."""
    g = torch.Generator().manual_seed(0)
    cases = [torch.randn(shape, generator=g) * torch.exp(torch.randn(shape, generator=g) * 4)
             for shape in ((33, 4, 257), (300, 2), (32, 1), (16, 3))]
    for impl in (_seqsum_numpy, _seqsum_index_add):
        if all(torch.equal(impl(t), _seqsum_loop(t)) for t in cases):
            return impl
    return _seqsum_loop


_seqsum_impl = None


def _seqsum(t: torch.Tensor) -> torch.Tensor:
    """Sum over dim 0 in order, in float32 (the C loop ``float s = 0; for (i...) s += t[i];``)."""
    global _seqsum_impl
    if _seqsum_impl is None:
        _seqsum_impl = _pick_seqsum()
    return _seqsum_impl(t)


def _seqsum_impl_is_numpy() -> bool:
    if _seqsum_impl is None:
        _seqsum(torch.zeros(2, 2))
    return _seqsum_impl is _seqsum_numpy


def _seqsum_into(t: torch.Tensor, out: torch.Tensor) -> None:
    """``out[...] = _seqsum(t)`` for a contiguous ``t``, without temporaries when numpy does the sums."""
    if _seqsum_impl is None:
        _seqsum(t[:1])
    if _seqsum_impl is _seqsum_numpy and t.is_contiguous() and out.is_contiguous() and t[0].numel() >= 2:
        with np.errstate(all="ignore"):  # overflow to inf is part of the float32 semantics being reproduced
            np.add.reduce(t.numpy().reshape(t.shape[0], -1), axis=0, out=out.numpy().reshape(-1))
    else:
        out.copy_(_seqsum(t).reshape(out.shape))


def _nearest_int(t: torch.Tensor) -> torch.Tensor:
    """``nearest_int``: exact emulation of the magic-number trick (int32), for any float32 input."""
    bits = (t + _MAGIC).view(torch.int32)
    return (bits & 0x007FFFFF) - 0x00400000


def _cdiv(c, t: torch.Tensor) -> torch.Tensor:
    """``c / t`` as a true division (a Python scalar on the left would be a reciprocal multiply in torch)."""
    return torch.full_like(t, float(c)).div_(t)


def _sqrtf(t: torch.Tensor) -> torch.Tensor:
    """Correctly rounded float32 sqrt (double rounding is exact for sqrt)."""
    return torch.sqrt(t.double()).float()


def _fp16_to_f32(bits: torch.Tensor) -> torch.Tensor:
    return bits.contiguous().view(torch.float16).float()


def _first_absmax(x: torch.Tensor, finite: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """(amax, max): the C loop ``if (amax < fabsf(v)) { amax = fabsf(v); max = v; }`` over the last dim.

    ``finite=False`` allows NaN entries, which that loop never picks.
    """
    if not finite:
        x = torch.where(torch.isnan(x), torch.zeros_like(x), x)
    hi, lo = x.amax(-1), x.amin(-1)
    hn, ln = hi.numpy(), lo.numpy()
    nlo = -ln
    amax = np.maximum(hn, nlo)  # NaN propagates
    mx = np.where(hn > nlo, hn, ln)
    tie = (hn == nlo) & (hn > 0)  # both +a and -a occur: the first one wins
    if tie.any():
        rows = torch.from_numpy(tie.nonzero()[0])
        sub = x[rows]
        mx[tie] = sub.gather(-1, sub.abs().argmax(-1, keepdim=True))[:, 0].numpy()  # argmax: first occurrence
    return torch.from_numpy(amax), torch.from_numpy(np.where(amax > 0, mx, np.float32(0)).astype(np.float32))


def _c_max(x: torch.Tensor, init: float = 0.0) -> torch.Tensor:
    """``m = init; for (i...) m = MAX(m, x[i]);`` over the last dim, with ``MAX(a, b) = a > b ? a : b``
    (a NaN survives only as the last element)."""
    m = torch.full(x.shape[:-1], init, dtype=x.dtype)
    for i in range(x.shape[-1]):
        m = torch.where(m > x[..., i], m, x[..., i])
    return m


def _as_rows(w, check_finite: bool = True) -> torch.Tensor:
    if not isinstance(w, torch.Tensor):
        w = torch.as_tensor(np.asarray(w))
    w = w.detach().to("cpu")
    if w.ndim == 1:
        w = w[None]
    w = w.reshape(-1, w.shape[-1]).to(_F32).contiguous()
    if check_finite and w.numel():
        _check_finite(*torch.aminmax(w))
    return w


_POOL: ThreadPoolExecutor | None = None


def _parallel(fn, items) -> None:
    """Run ``fn`` over ``items`` on ``torch.get_num_threads()`` threads (torch and numpy drop the GIL in their
    ops). Callers keep each op of a work item within torch's parallel grain (32768 values), so the two levels of
    threading do not stack up."""
    global _POOL
    items = list(items)
    nthread = min(torch.get_num_threads(), len(items))
    if nthread <= 1 or threading.current_thread().name.startswith("lowbit-ggml"):  # never wait on our own pool
        for it in items:
            fn(it)
        return
    if _POOL is None or _POOL._max_workers < nthread:
        _POOL = ThreadPoolExecutor(max_workers=nthread, thread_name_prefix="lowbit-ggml")
    for f in [_POOL.submit(fn, it) for it in items]:
        f.result()


def _row_weights(quant_weights, rows: int, n: int) -> torch.Tensor | None:
    """imatrix -> (rows or 1, n) float32: one row for all rows, or one per group of rows (experts)."""
    if quant_weights is None:
        return None
    qw = _as_rows(quant_weights)
    if qw.shape[-1] != n or rows % qw.shape[0]:
        raise ValueError(f"quant_weights of shape {tuple(qw.shape)} do not fit {rows} rows of {n}")
    if qw.shape[0] == 1:
        return qw
    return qw.repeat_interleave(rows // qw.shape[0], dim=0)


# ------------------------------------------------------------------------------------------ make_qx_quants

def _qx_steps(nmax: int) -> torch.Tensor:
    """Numerators of ``iscale`` in make_qx_quants: ``-nmax`` then ``-(nmax + 0.1f*is)``, is = -9..9, is != 0."""
    f = np.float32
    c = [f(-nmax)] + [-(f(nmax) + f(0.1) * f(i)) for i in range(-9, 10) if i != 0]
    return torch.tensor(np.array(c, dtype=np.float32))


def make_qx_quants(xt: torch.Tensor, nmax: int, wt: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """``make_qx_quants(n, nmax, x, L, rmse_type=1, qw)`` over N groups given position-major, ``xt`` (n, N).

    ``wt`` (n, N) are the weights ``qw`` (None: ``x*x``). Returns (scale (N,), L (n, N) int32).
    The 19 trial scales do not depend on each other: their sums are computed one trial at a time over all
    groups, then an ordered scan (``best`` moves as trials are accepted) picks one per group.
    """
    n, N = xt.shape
    amax, mx = _first_absmax(xt.t())
    zero = amax < GROUP_MAX_EPS
    mx = torch.where(zero, torch.ones_like(mx), mx)
    steps = _qx_steps(nmax)
    S = steps.shape[0]
    xt = xt.contiguous()
    wt = xt * xt if wt is None else wt.contiguous()
    wx = wt * xt
    sums = torch.empty(S, 2, N, dtype=_F32)  # sum w*x*l, sum w*l*l per trial
    lt, buf = torch.empty_like(xt), torch.empty((n, 2, N), dtype=_F32)
    iscale = torch.empty(S, N, dtype=_F32)
    for s in range(S):
        torch.div(steps[s], mx, out=iscale[s])
        torch.mul(xt, iscale[s], out=lt).round_().clamp_(-nmax, nmax - 1)  # |iscale*x| <= nmax + 1: round is exact
        torch.mul(wx, lt, out=buf[:, 0])
        torch.mul(wt, lt, out=buf[:, 1]).mul_(lt)
        _seqsum_into(buf, sums[s])
    del lt, buf
    sn = sums.numpy()
    slx, sl2 = sn[:, 0], sn[:, 1]  # (S, N)
    with np.errstate(all="ignore"):  # the per-group scalar math in numpy: same float32 ops, less per-call overhead
        scales = slx / sl2  # trial s's scale = sumlx/suml2 (used where suml2 > 0)
        scales[0] = np.where(sl2[0] != 0, scales[0], np.float32(0))  # the first: suml2 ? sumlx/suml2 : 0
        bests = scales * slx  # best = scale*sumlx once trial s is accepted
        squares = slx * slx
        positive = sl2 > 0
        best = bests[0].copy()
        pick = np.zeros(N, dtype=np.int64)
        tmp, upd = np.empty(N, np.float32), np.empty(N, bool)
        for s in range(1, S):  # if (suml2 > 0 && sumlx*sumlx > best*suml2) accept trial s
            np.greater(squares[s], np.multiply(best, sl2[s], out=tmp), out=upd)
            np.logical_and(upd, positive[s], out=upd)
            np.copyto(best, bests[s], where=upd)
            np.copyto(pick, s, where=upd)
    scale = torch.from_numpy(np.take_along_axis(scales, pick[None], 0)[0])
    isc = iscale.gather(0, torch.from_numpy(pick)[None])  # L of the chosen trial scale
    L = (xt * isc).round_().clamp_(-nmax, nmax - 1).to(torch.int32).add_(nmax)
    L = torch.where(zero[None], torch.zeros_like(L), L)
    return torch.where(zero, torch.zeros_like(scale), scale), L


# ------------------------------------------------------------------------------------------ 32-blocks

def _chunks(rows: int, n: int, per_chunk: int):
    step = max(1, per_chunk // max(1, n))
    for r0 in range(0, rows, step):
        yield r0, min(rows, r0 + step)


def _put_f16(out: torch.Tensor, col: int, v: torch.Tensor):
    out[:, col:col + 2] = v.to(torch.float16).view(torch.uint8).view(-1, 2)  # round to nearest even


def _check_finite(*block_extrema: torch.Tensor):
    # max/min of each block propagate NaN and show inf: checking them checks the input
    if not all(bool(torch.isfinite(t).all()) for t in block_extrema):
        raise ValueError("ggml quantization needs finite values (found inf/nan)")


_BITS_MUL = np.uint64(0x0102040810204080)


def _pack_bits(bits: np.ndarray) -> np.ndarray:
    """(B, 8k) bools -> (B, k) bytes, bit j of byte i = bits[8i + j] (np.packbits little, without its slow path):
    the eight 0/1 bytes of a little-endian uint64 times 0x0102040810204080 gather into its top byte."""
    w = np.ascontiguousarray(bits).view(np.uint8).view(np.uint64)
    return ((w * _BITS_MUL) >> np.uint64(56)).astype(np.uint8)


def _k4_scale_min(q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``get_scale_min_k4`` for j = 0..7 on (B, 12) int32 scale bytes -> (sc, m), each (B, 8)."""
    lo_sc, lo_m = q[:, 0:4] & 63, q[:, 4:8] & 63
    hi_sc = (q[:, 8:12] & 0xF) | ((q[:, 0:4] >> 6) << 4)
    hi_m = (q[:, 8:12] >> 4) | ((q[:, 4:8] >> 6) << 4)
    return torch.cat([lo_sc, hi_sc], 1), torch.cat([lo_m, hi_m], 1)
