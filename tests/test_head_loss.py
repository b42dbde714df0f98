"""The frozen head's fused loss + gradient (online softmax over vocabulary tiles) against fp64 autograd."""
import pytest
import torch
import torch.nn.functional as F

from lowbit.recipes.loss import _FrozenHeadCE, ce_and_grad_h

TOL = {torch.float32: 2e-5, torch.bfloat16: 2e-2}  # relative to the largest entry: each dtype's own rounding


def _ref(x, w, y, softcap):
    """CE sum and d/dx in fp64 from the logits as x's dtype computes them (bf16 logits are rounded to bf16)."""
    z = (x @ w.t()).double()
    xr = torch.zeros_like(z, requires_grad=True)  # d/dz, then chain through the (frozen) matmul in fp64
    zz = z + xr
    if softcap:
        zz = torch.tanh(zz / softcap) * softcap
    loss = F.cross_entropy(zz, y, reduction="sum")
    (dz,) = torch.autograd.grad(loss, xr)
    return loss.detach(), dz @ w.double()


@pytest.mark.parametrize("t,v,h", [(1, 7, 4), (5, 300, 16), (37, 1024, 32), (64, 5000, 24)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("softcap", [None, 15.0])
@pytest.mark.parametrize("tile", [1, 64, 4096])
def test_fused_head_matches_fp64_reference(t, v, h, dtype, softcap, tile):
    g = torch.Generator().manual_seed(t * v + h)
    x = (torch.randn(t, h, generator=g) * 3).to(dtype)  # peaked rows: the running max moves between tiles
    w = (torch.randn(v, h, generator=g) * 0.5).to(dtype)
    y = torch.randint(0, v, (t,), generator=g)
    loss, gh = ce_and_grad_h(x, w, y, softcap, tile=tile)
    loss_ref, gh_ref = _ref(x, w, y, softcap)
    assert abs(loss.item() - loss_ref.item()) <= 1e-5 * abs(loss_ref.item()) + 1e-5
    assert (gh.double() - gh_ref).abs().max() <= TOL[dtype] * gh_ref.abs().max()


def test_frozen_head_autograd_uses_the_fused_gradient():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(70, 16, generator=g, requires_grad=True)
    w = torch.randn(900, 16, generator=g)
    y = torch.randint(0, 900, (70,), generator=g)
    loss = _FrozenHeadCE.apply(x, w, y, None, 32, 0.0)  # 3 token chunks (the last one short)
    (got,) = torch.autograd.grad(2.5 * loss, x)
    ref = F.cross_entropy(x @ w.t(), y, reduction="sum")
    (want,) = torch.autograd.grad(2.5 * ref, x)
    torch.testing.assert_close(loss, ref.detach(), rtol=1e-6, atol=1e-4)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
