"""The frozen head's gradient filter (Cut Cross-Entropy's): skipped blocks stay within their bound."""
import pytest
import torch

from lowbit.recipes.loss import _FrozenHeadCE, filtered_grad_h
from lowbit.recipes.trainer import grad_filter_eps

ROUNDING = {torch.float32: 1e-5, torch.bfloat16: 2e-2}  # relative, of each dtype's own unfiltered matmul


def _grads(t, v, h, dtype, softcap, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(t, h, generator=g) * 4).to(dtype)  # peaked softmax: whole blocks fall below eps
    w = (torch.randn(v, h, generator=g) * 0.5).to(dtype)
    y = torch.randint(0, v, (t,), generator=g)
    return x, w, y, softcap


def _dlogits(x, w, y, softcap):
    """softmax - onehot (times the softcap derivative) of the head's logits (in x's dtype), in fp64."""
    z = (x @ w.t()).double()
    d = 1.0
    if softcap:
        t = torch.tanh(z / softcap)
        z, d = t * softcap, 1 - t * t
    g = z.softmax(-1)
    g[torch.arange(len(y)), y] -= 1
    return g * d


@pytest.mark.parametrize("t,v,h", [(5, 300, 16), (37, 1024, 32)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("softcap", [None, 15.0])
@pytest.mark.parametrize("eps", [2.0 ** -12, 2.0 ** -6])
def test_filtered_head_gradient_within_bound(t, v, h, dtype, softcap, eps):
    x, w, y, sc = _grads(t, v, h, dtype, softcap)
    xr = x.clone().requires_grad_(True)
    loss_ref = _FrozenHeadCE.apply(xr, w, y, sc, 16, 0.0)
    (ref,) = torch.autograd.grad(loss_ref, xr)
    xf = x.clone().requires_grad_(True)
    loss = _FrozenHeadCE.apply(xf, w, y, sc, 16, eps)
    (got,) = torch.autograd.grad(loss, xf)
    # the filter touches only d(loss)/dh (the filtered path keeps the whole-vocabulary softmax in memory, the
    # unfiltered one runs over tiles: the same loss up to summation order)
    assert abs(loss.item() - loss_ref.item()) <= 1e-5 * abs(loss_ref.item())

    # the dropped part of each row is at most sum over skipped entries of |g_v| * |W_v| (exact arithmetic)
    g = _dlogits(x, w, y, sc)
    nb = -(-v // 256)
    pad = torch.nn.functional.pad(g.abs() >= eps, (0, nb * 256 - v))
    keep = pad.view(t, nb, 256).any(-1)
    keep[torch.arange(t), y // 256] = True
    skipped = ~keep.repeat_interleave(256, dim=1)[:, :v]
    bound = (g.abs() * skipped) @ w.double().abs()
    tol = ROUNDING[dtype] * (g.abs() @ w.double().abs())  # each side's own rounding (g cast, matmul, output)
    assert ((ref.double() - g @ w.double()).abs() <= tol + 1e-12).all()
    assert ((got.double() - ref.double()).abs() <= bound + 2 * tol + 1e-12).all()
    if eps == 2.0 ** -6:
        assert (bound > 0).any()  # something was skipped: the bound is exercised


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_label_block_never_skipped(dtype):
    x, w, y, _ = _grads(9, 1024, 16, dtype, None, seed=1)
    g = _dlogits(x, w, y, None).to(dtype)
    out, skipped = filtered_grad_h(g, w, y, eps=2.0)  # every |g| < 2: only the label blocks remain
    want = torch.zeros(9, 16, dtype=torch.float64)
    for i, lab in enumerate(y.tolist()):
        b = lab // 256
        want[i] = g[i, b * 256:(b + 1) * 256].double() @ w[b * 256:(b + 1) * 256].double()
    torch.testing.assert_close(out.double(), want, rtol=ROUNDING[dtype], atol=1e-6)
    assert skipped == pytest.approx(1 - 9 / (9 * 4))


def test_filter_at_zero_threshold_is_the_dense_product():
    x, w, y, _ = _grads(20, 700, 8, torch.float32, None, seed=2)
    g = _dlogits(x, w, y, None).float()
    out, skipped = filtered_grad_h(g, w, y, eps=0.0)
    assert skipped == 0.0
    torch.testing.assert_close(out, g @ w, rtol=1e-5, atol=1e-6)


def test_grad_filter_setting():
    assert grad_filter_eps("auto") == 0.0 and grad_filter_eps("off") == 0.0
    assert grad_filter_eps(2.0 ** -12) == 2.0 ** -12
