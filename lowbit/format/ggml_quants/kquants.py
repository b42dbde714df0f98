"""K-quants (Q4_K, Q5_K, Q6_K) of ``lowbit.format.ggml_quants``: make_qkx2/qkx3_quants, make_qp_quants, packing.

Same exactness rules as ``ggml_quants`` (sequential float32 sums, exact ``nearest_int``, C operation order). The
scale searches run for all sub-blocks at once, laid out position-major, (32, sub-blocks), so that each sequential
sum is one reduction over dim 0. make_qkx's trial scales run in order (an accepted one moves ``min``);
make_qx_quants's (in common) are independent and run together.
"""
from __future__ import annotations

import numpy as np
import torch

from lowbit.format.ggml_quants.common import (
    GROUP_MAX_EPS,
    QK_K,
    _c_max,
    _cdiv,
    _first_absmax,
    _nearest_int,
    _parallel,
    _seqsum,
    _seqsum_impl_is_numpy,
    _seqsum_into,
    _sqrtf,
    make_qx_quants,
)

__all__ = ["CHUNK_ELEMS", "QUANTIZERS", "make_qkx_quants", "make_qp_quants"]

_F32 = torch.float32
_INF = float("inf")


def _first_min(cand: torch.Tensor) -> torch.Tensor:
    """Which candidate ``best = cand[0]; for (s...) if (cand[s] < best) best = cand[s];`` keeps, per row: the
    first minimum. NaN candidates never win, and a NaN start is never replaced."""
    c = cand.clone()
    c[:, 1:] = torch.where(torch.isnan(c[:, 1:]), _INF, c[:, 1:])
    pick = c.argmin(dim=1)  # first occurrence on ties, as the strict '<'
    return torch.where(torch.isnan(cand[:, 0]), torch.zeros_like(pick), pick)


def _qkx_steps(nmax: int, rmin: float, rdelta: float, nstep: int) -> torch.Tensor:
    f = np.float32
    c = [f(nmax)] + [f(rmin) + f(rdelta) * f(i) + f(nmax) for i in range(nstep + 1)]
    return torch.tensor(np.array(c, dtype=np.float32))


def make_qkx_quants(xt: torch.Tensor, wt: torch.Tensor, nmax: int, rmin: float, rdelta: float, nstep: int,
                    exact: bool = False):
    """``make_qkx2_quants`` / ``make_qkx3_quants`` (with weights, use_mad=false) over N groups, position-major:
    ``xt``, ``wt`` of shape (n, N), contiguous.

    Returns (scale (N,), the_min (N,), L (n, N) int32). Both C functions compute the same thing here: qkx3 tests
    ``max <= min`` where qkx2 tests ``max == min``, equivalent since min is clamped to <= 0 and max >= x[0] >= min.
    The trial scales run one after the other: an accepted trial moves ``min``, which the next trials use.
    ``exact`` rounds with the bit-exact ``nearest_int`` emulation instead of ``torch.round`` (which equals it
    below 2**22 in magnitude; groups that could exceed that are redone with ``exact``).
    """
    n, N = xt.shape
    xlo, mx = xt.amin(0), xt.amax(0)
    mn = xlo.clamp_max(0)
    const = mx == mn
    mxe = torch.where(const, mn + 1, mx)  # const groups never accept a trial (D == 0); keep their grid finite
    # rows: sum_l2, sum_xl, sum_l (the sequential sums of one trial), sum_x, sum_w; laid out so that the
    # products below are row slices
    sums = torch.empty(5, N, dtype=_F32)
    wxw = torch.empty((n, 2, N), dtype=_F32)
    torch.mul(wt, xt, out=wxw[:, 0])
    wxw[:, 1] = wt
    _seqsum_into(wxw, sums[3:])  # sum_x = w[0]*x[0] + ...; sum_w = w[0] + ...
    steps = _qkx_steps(nmax, rmin, rdelta, nstep)

    def grid(out, iscale):  # MAX(0, MIN(nmax, nearest_int(iscale*(x - min)))) as float, in place
        if exact:
            out.copy_(_nearest_int(out.mul_(iscale)).clamp_(0, nmax))
        else:
            out.mul_(iscale).round_().clamp_(0, nmax)

    # rows of state: best error, iscale and min of the accepted L, min, (unused), scale; ``new`` holds one
    # trial's candidates in the same rows
    state = torch.empty(6, N, dtype=_F32)
    best, acc_iscale, acc_min, cur_min, _, scale = state
    torch.div(steps[0].expand(N), mxe - mn, out=acc_iscale)  # the initial guess: x - min lies in [0, max - min]
    acc_min.copy_(mn)
    cur_min.copy_(mn)
    torch.div(torch.ones(()), acc_iscale, out=scale)
    L = torch.sub(xt, mn)
    grid(L, acc_iscale)
    e = torch.empty_like(xt)
    torch.mul(L, scale, out=e).add_(mn).sub_(xt)  # diff = scale*L + min - x; error = sum(w*diff*diff)
    _seqsum_into(e.mul_(e).mul_(wt), best)

    buf = torch.empty((n, 3, N), dtype=_F32)
    wll, wlx, wl = buf[:, 0], buf[:, 1], buf[:, 2]
    new = torch.empty(6, N, dtype=_F32)
    err, iscale, _, this_min, _, this_scale = new
    hist = torch.empty(len(steps) - 1, N, dtype=_F32)  # min used by each trial, to check the rounding range
    # the per-group scalar math runs in numpy: same IEEE float32 ops, a fraction of torch's per-call overhead
    sums_n, new_n, state_n, hist_n, mxe_n = sums.numpy(), new.numpy(), state.numpy(), hist.numpy(), mxe.numpy()
    err_n, iscale_n, min_used_n, this_min_n, _, this_scale_n = new_n
    best_n, cur_min_n = state_n[0], state_n[3]
    sl2_n, sxl_n, sl_n, sx_n, sw_n = sums_n
    p, q = np.empty((3, N), np.float32), np.empty((3, N), np.float32)
    tmp, pos, upd, upd2 = np.empty(N, np.float32), np.empty(N, bool), np.empty(N, bool), np.empty(N, bool)
    steps_n = steps.numpy()
    reduce, npmul, npsub, npdiv, copyto = np.add.reduce, np.multiply, np.subtract, np.divide, np.copyto
    greater, less, land = np.greater, np.less, np.logical_and
    tmul, tsub = torch.mul, torch.sub
    fast = _seqsum_impl_is_numpy()  # numpy adds the rows of a C-contiguous (n, M) array in order
    buf2, sums3, e_n = buf.numpy().reshape(n, -1), sums_n[:3].reshape(-1), e.numpy()
    with np.errstate(all="ignore"):
        for k in range(1, len(steps)):
            copyto(min_used_n, cur_min_n)
            copyto(hist_n[k - 1], cur_min_n)
            npdiv(steps_n[k], npsub(mxe_n, cur_min_n, out=tmp), out=iscale_n)
            if exact:
                grid(tsub(xt, cur_min, out=L), iscale)
            else:
                tsub(xt, cur_min, out=L).mul_(iscale).round_().clamp_(0, nmax)
            tmul(wt, L, out=wl)
            tmul(wl, L, out=wll)
            tmul(wl, xt, out=wlx)
            if fast:
                reduce(buf2, axis=0, out=sums3)
            else:
                _seqsum_into(buf, sums[:3])
            # this_min*D = sum_l2*sum_x - sum_l*sum_xl; D = sum_w*sum_l2 - sum_l*sum_l;
            # this_scale*D = sum_w*sum_xl - sum_x*sum_l
            npmul(sx_n, sl2_n, out=p[0])
            npmul(sw_n, sums_n[0:2], out=p[1:3])
            npmul(sl_n, sums_n[1:4], out=q)  # sum_l * (sum_xl, sum_l, sum_x)
            npsub(p, q, out=p)  # (this_min*D, D, this_scale*D)
            npdiv(p, p[1], out=new_n[3:6])
            greater(this_min_n, 0, out=pos)  # if (this_min > 0) { this_min = 0; this_scale = sum_xl/sum_l2; }
            copyto(this_scale_n, npdiv(sxl_n, sl2_n, out=tmp), where=pos)
            copyto(this_min_n, 0, where=pos)
            tmul(L, this_scale, out=e).add_(this_min).sub_(xt).square_().mul_(wt)
            if fast:
                reduce(e_n, axis=0, out=err_n)
            else:
                _seqsum_into(e, err)
            copyto(state_n, new_n, where=land(greater(p[1], 0, out=upd), less(err_n, best_n, out=upd2), out=upd))
    result = _finish_qkx(xt, nmax, const, acc_iscale, acc_min, scale, cur_min)
    if not exact:
        rng = mxe - hist
        bound = steps[1:, None] / rng * torch.maximum(rng, (xlo - hist).abs())
        risky = (bound >= 4.0e6).any(0)
        if bool(risky.any()):
            idx = risky.nonzero()[:, 0]
            redo = make_qkx_quants(xt[:, idx].contiguous(), wt[:, idx].contiguous(), nmax, rmin, rdelta, nstep, True)
            result[0][idx], result[1][idx], result[2][:, idx] = redo
    return result


def _finish_qkx(xt, nmax, const, acc_iscale, acc_min, scale, cur_min):
    L = _nearest_int((xt - acc_min) * acc_iscale).clamp_(0, nmax)
    return (torch.where(const, torch.zeros_like(scale), scale), -cur_min,
            torch.where(const[None], torch.zeros_like(L), L))


def make_qp_quants(x: torch.Tensor, w: torch.Tensor, nmax: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``make_qp_quants(n, nmax, x, L, quant_weights)`` over rows of x, w (B, n) -> (scale (B,), L (B, n) int32).

    L holds what the C ``uint8_t L[]`` holds (values wrap modulo 256).
    """
    B, n = x.shape
    mx = _c_max(x)
    zero = mx < GROUP_MAX_EPS
    mx = torch.where(zero, torch.ones_like(mx), mx)
    iscale = _cdiv(nmax, mx)
    L0 = (_nearest_int(iscale[:, None] * x) & 0xFF).to(_F32)
    diff = x - _cdiv(1.0, iscale)[:, None] * L0
    best_mse = _seqsum(((w * diff) * diff).t())
    f = np.float32
    num = torch.tensor(np.array([f(0.1) * f(i) + f(nmax) for i in range(-4, 5) if i != 0], dtype=np.float32))
    iscale_is = num[None, :] / mx[:, None]  # (B, 8)
    scale_is = _cdiv(1.0, iscale_is)
    l = _nearest_int(iscale_is[:, :, None] * x[:, None, :]).clamp_max_(nmax).to(_F32)
    diff = x[:, None, :] - scale_is[:, :, None] * l
    mse = _seqsum(((w[:, None, :] * diff) * diff).permute(2, 0, 1))  # (B, 8)
    pick = _first_min(torch.cat([best_mse[:, None], mse], 1))
    iscale = torch.cat([iscale[:, None], iscale_is], 1).gather(1, pick[:, None])[:, 0]
    li = _nearest_int(iscale[:, None] * x).clamp_max_(nmax)
    lf = li.to(_F32)
    wx = w * x
    sumlx = _seqsum((wx * lf).t())
    suml2 = _seqsum(((w * lf) * lf).t())
    L = li & 0xFF
    Lf = L.to(_F32)
    for _ in range(5):  # an iteration without changes leaves the state as is, so no early exit is needed
        for i in range(n):
            wi, xi, wxi, Li = w[:, i], x[:, i], wx[:, i], Lf[:, i]
            slx = sumlx - wxi * Li
            sl2 = suml2 - (wi * Li) * Li
            ok = (slx > 0) & (sl2 > 0)
            new_l = _nearest_int((xi * sl2) / slx).clamp_max_(nmax)
            ok &= new_l != L[:, i]
            nl = new_l.to(_F32)
            slx = slx + wxi * nl
            sl2 = sl2 + (wi * nl) * nl
            ok &= (slx * slx) * suml2 > (sumlx * sumlx) * sl2
            L[:, i] = torch.where(ok, new_l & 0xFF, L[:, i])
            Lf[:, i] = L[:, i].to(_F32)
            sumlx = torch.where(ok, slx, sumlx)
            suml2 = torch.where(ok, sl2, suml2)
    scale = torch.where(suml2 > 0, sumlx / suml2, torch.zeros_like(sumlx))
    return torch.where(zero, torch.zeros_like(scale), scale), torch.where(zero[:, None], torch.zeros_like(L), L)


def _np_nearest_int(v: np.ndarray) -> np.ndarray:
    """``nearest_int`` (magic-number trick) on a float32 array."""
    return ((v + np.float32(12582912.0)).view(np.int32) & 0x007FFFFF) - 0x00400000


def _pack_k_scales(ls: np.ndarray, lm: np.ndarray) -> np.ndarray:
    """The 12 ``scales`` bytes of q4_K/q5_K from 8 (scale, min) codes, bytes wrapping like the C ``uint8_t``."""
    out = np.concatenate([ls[:, :4] | ((ls[:, 4:] >> 4) << 6), lm[:, :4] | ((lm[:, 4:] >> 4) << 6),
                          (ls[:, 4:] & 0xF) | ((lm[:, 4:] & 0xF) << 4)], 1)
    return (out & 0xFF).astype(np.uint8)


def _np_k4_scale_min(q: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``get_scale_min_k4`` for j = 0..7 on (B, 12) scale bytes -> (sc, m) as float32, each (B, 8)."""
    q = q.astype(np.int32)
    sc = np.concatenate([q[:, 0:4] & 63, (q[:, 8:12] & 0xF) | ((q[:, 0:4] >> 6) << 4)], 1)
    m = np.concatenate([q[:, 4:8] & 63, (q[:, 8:12] >> 4) | ((q[:, 4:8] >> 6) << 4)], 1)
    return sc.astype(np.float32), m.astype(np.float32)


def _finish_k45(xs: np.ndarray, L: np.ndarray, ls, lm, d, dmin, nmax: int, out: np.ndarray):
    """Final pass of q4_K/q5_K over (B, 8, 32) values: re-quantize each sub-block with the stored fp16 and 6-bit
    scales (keeping the search's L where the scale is 0), then pack the blocks into ``out`` (B, type size).
    Small arrays, so numpy (same float32 ops, less per-call overhead)."""
    B = xs.shape[0]
    sc_bytes = _pack_k_scales(ls, lm)
    sc, m = _np_k4_scale_min(sc_bytes)
    with np.errstate(all="ignore"):  # fp16 overflow to inf and the divisions that follow are C semantics too
        d16, dmin16 = d.astype(np.float16), dmin.astype(np.float16)  # GGML_FP32_TO_FP16: round to nearest even
        dd = (d16.astype(np.float32)[:, None] * sc)[:, :, None]  # (B, 8, 1)
        dm = (dmin16.astype(np.float32)[:, None] * m)[:, :, None]
        Lnew = np.clip(_np_nearest_int((xs + dm) / dd), 0, nmax)
    L = np.where(dd != 0, Lnew, L).astype(np.uint8)
    out[:, 0:2] = d16.view(np.uint8).reshape(B, 2)
    out[:, 2:4] = dmin16.view(np.uint8).reshape(B, 2)
    out[:, 4:16] = sc_bytes
    Lc = L.reshape(B, 4, 2, 32)
    out[:, -128:] = ((Lc[:, :, 0] & 0xF) | ((Lc[:, :, 1] & 0xF) << 4)).reshape(B, 128)
    if nmax == 31:  # qh[l] bit j: the 5th bit of value l of sub-block j
        out[:, 16:48] = np.packbits(L >= 16, axis=1, bitorder="little").reshape(B, 32)


def _ref_codes(scales: np.ndarray, mins: np.ndarray):
    """quantize_row_q{4,5}_K_ref: 6-bit codes of the 8 (scale, min) pairs and the fp32 super-block scales."""
    def cmax(v):  # m = 0; if (v > m) m = v;
        m = np.where(np.isnan(v), np.float32(0), v).max(1)
        return np.where(m > 0, m, np.float32(0)).astype(np.float32)

    max_scale, max_min = cmax(scales), cmax(mins)
    with np.errstate(all="ignore"):
        inv_scale = np.where(max_scale > 0, np.float32(63) / max_scale, np.float32(0)).astype(np.float32)
        inv_min = np.where(max_min > 0, np.float32(63) / max_min, np.float32(0)).astype(np.float32)
        ls = np.minimum(_np_nearest_int(inv_scale[:, None] * scales) & 0xFF, 63)
        lm = np.minimum(_np_nearest_int(inv_min[:, None] * mins) & 0xFF, 63)
    return ls, lm, max_scale / np.float32(63), max_min / np.float32(63)


_REF_SEARCH = {15: (-1.0, 0.1, 20), 31: (-0.5, 0.1, 15)}  # (rmin, rdelta, nstep) of quantize_row_q{4,5}_K_ref
# super-blocks per work item: the (32, 8*128) arrays of the search stay in L2, and at 32768 values an op stays
# within torch's parallel grain, so work items can run on worker threads without oversubscription
_SB_PER_ITEM = 128


def _quantize_k45(x: torch.Tensor, qw: torch.Tensor | None, out: torch.Tensor, nmax: int):
    """quantize_row_q4_K_ref / q5_K_ref (qw is None) or quantize_row_q4_K_impl / q5_K_impl."""
    rows, n = x.shape
    xs = x.view(-1, 8, 32)
    B = xs.shape[0]
    xs_n, out_n = xs.numpy(), out.numpy()
    qws = None if qw is None else qw.expand(rows, n).reshape(B, 8, 32)
    if qw is not None:
        scales, mins, sw = torch.empty(B, 8), torch.empty(B, 8), torch.empty(B, 8)
        Ls = torch.empty(B, 8, 32, dtype=torch.uint8)

    def search(b0: int):
        b1 = min(B, b0 + _SB_PER_ITEM)
        nb = b1 - b0
        xt = xs[b0:b1].reshape(-1, 32).t().contiguous()  # (32, sub-blocks), position-major
        if qws is None:
            av_x = _sqrtf(_seqsum(xt * xt).div_(32.0))
            wt = xt.abs().add_(av_x)
            sc, mi, L = make_qkx_quants(xt, wt, nmax, *_REF_SEARCH[nmax])
            ls, lm, d, dmin = _ref_codes(sc.view(nb, 8).numpy(), mi.view(nb, 8).numpy())
            _finish_k45(xs_n[b0:b1], L.t().reshape(nb, 8, 32).numpy(), ls, lm, d, dmin, nmax, out_n[b0:b1])
            return
        x2 = xt * xt
        sum_x2 = _seqsum(x2.view(32, nb, 8).permute(2, 0, 1).reshape(QK_K, nb))  # in row order, l = 32*j + i
        sigma2 = (2 * sum_x2) / float(QK_K)
        wt = qws[b0:b1].reshape(-1, 32).t() * _sqrtf(x2.add_(sigma2.repeat_interleave(8)))
        sw[b0:b1] = _seqsum(wt).view(nb, 8)
        sc, mi, L = make_qkx_quants(xt, wt.contiguous(), nmax, -0.9, 0.05, 36)
        scales[b0:b1], mins[b0:b1] = sc.view(nb, 8), mi.view(nb, 8)
        Ls[b0:b1] = L.t().reshape(nb, 8, 32)

    items = range(0, B, _SB_PER_ITEM)
    _parallel(search, items)
    if qw is None:
        return
    d, ls = make_qp_quants(scales, sw, 63)
    dmin, lm = make_qp_quants(mins, sw, 63)
    if nmax == 31:  # quantize_row_q5_K_impl clamps the codes, q4_K_impl does not
        ls, lm = ls.clamp_max(63), lm.clamp_max(63)
    ls, lm, d, dmin, Ls_n = ls.numpy(), lm.numpy(), d.numpy(), dmin.numpy(), Ls.numpy()

    def finish(b0: int):
        b1 = min(B, b0 + _SB_PER_ITEM)
        _finish_k45(xs_n[b0:b1], Ls_n[b0:b1], ls[b0:b1], lm[b0:b1], d[b0:b1], dmin[b0:b1], nmax, out_n[b0:b1])

    _parallel(finish, items)


def _quantize_q6_k(x: torch.Tensor, qw: torch.Tensor | None, out: torch.Tensor):
    """quantize_row_q6_K_ref (qw is None) or quantize_row_q6_K_impl."""
    out = out.numpy()
    rows, n = x.shape
    xt = x.reshape(-1, 16).t().contiguous()  # (16, groups)
    qwt = None if qw is None else qw.expand(rows, n).reshape(-1, 16).t()
    scales, L = make_qx_quants(xt, 32, qwt)
    scales = scales.view(-1, 16)
    B = scales.shape[0]
    amax_s, max_scale = _first_absmax(scales, finite=False)
    zero = (amax_s < GROUP_MAX_EPS).numpy()
    max_scale = np.where(zero, np.float32(1), max_scale.numpy())
    with np.errstate(all="ignore"):
        iscale = np.float32(-128) / max_scale
        d16 = (np.float32(1) / iscale).astype(np.float16)  # GGML_FP32_TO_FP16: round to nearest even
        sc = (np.minimum(_np_nearest_int(iscale[:, None] * scales.numpy()), 127) & 0xFF).astype(np.uint8)  # int8
        dd = (d16.astype(np.float32)[:, None] * sc.view(np.int8).astype(np.float32))[:, :, None]  # (B, 16, 1)
        Lnew = np.clip(_np_nearest_int(x.numpy().reshape(B, 16, 16) / dd), -32, 31) + 32
    Lq = np.where(dd != 0, Lnew, L.t().reshape(B, 16, 16).numpy()).astype(np.uint8).reshape(B, 2, 4, 32)
    out[:, 0:128] = np.stack([(Lq[:, :, 0] & 0xF) | ((Lq[:, :, 2] & 0xF) << 4),
                              (Lq[:, :, 1] & 0xF) | ((Lq[:, :, 3] & 0xF) << 4)], 2).reshape(B, 128)
    out[:, 128:192] = np.bitwise_or.reduce((Lq >> 4) << (2 * np.arange(4, dtype=np.uint8))[None, None, :, None],
                                           axis=2).reshape(B, 64)
    out[:, 192:208] = sc
    out[:, 208:210] = d16.view(np.uint8).reshape(B, 2)
    out[zero] = 0  # an all-zero super-block is memset to 0


QUANTIZERS = {"Q4_K": lambda x, qw, out: _quantize_k45(x, qw, out, 15),
              "Q5_K": lambda x, qw, out: _quantize_k45(x, qw, out, 31), "Q6_K": _quantize_q6_k}
# values per chunk (without, with imatrix) on one thread; with more, Q6_K's chunks shrink to 32768 values and
# go to worker threads, while Q4_K/Q5_K split their chunks into work items themselves
CHUNK_ELEMS = {"Q4_K": (1 << 20, 1 << 20), "Q5_K": (1 << 20, 1 << 20), "Q6_K": (1 << 16, 1 << 16)}
PARALLEL_CHUNKS = {"Q6_K"}
