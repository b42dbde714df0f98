"""Fake quantizers against hand-computed values; STE and LSQ gradients; every granularity's shapes."""
import math

import pytest
import torch

from lowbit.errors import ConfigError
from lowbit.methods.qat import FakeQuantizer, QuantizerConfig
from lowbit.methods.qat.numerics import decode, encode, quantize_rows


def fq(role="weight", **kw):
    return FakeQuantizer(QuantizerConfig(**kw), role)


def test_int4_symmetric_per_tensor_hand_computed():
    x = torch.tensor([[-1.0, 0.3, 0.7, 1.4]])
    # scale = 1.4 / 7 = 0.2 → levels -5, 1.5→2 (half to even), 3.5→4, 7
    out = fq(granularity="per_tensor")(x)
    s = torch.tensor(1.4) / 7
    assert torch.equal(out, torch.tensor([[-5.0, 2.0, 4.0, 7.0]]) * s)


def test_int3_asymmetric_zero_point_hand_computed():
    x = torch.tensor([[-0.5, 0.0, 1.0, 3.0]])
    q = fq(bits=3, symmetric=False, granularity="per_tensor")
    scale = torch.tensor(3.5) / 7
    zero = 0 - torch.round(torch.tensor(-0.5) / scale)  # = 1
    expect = (torch.clamp(torch.round(x / scale) + zero, 0, 7) - zero) * scale
    assert torch.equal(q(x), expect)
    assert q(x)[0, 1] == 0  # zero stays exact


def test_int8_per_channel_rows_have_own_scale():
    w = torch.tensor([[1.0, -2.0], [100.0, 50.0]])
    out = fq(bits=8, granularity="per_channel")(w)
    assert torch.equal(out[0], torch.round(w[0] / (2 / 127)) * (2 / 127))
    assert torch.allclose(out[1], w[1], atol=100 / 127 / 2)


def test_fp4_e2m1_grid():
    x = torch.tensor([[6.0, 5.2, 2.4, 0.2, -0.3, -1.3]])
    out = fq(dtype="fp4_e2m1", granularity="per_tensor")(x)  # scale = 6/6 = 1
    assert out.tolist() == [[6.0, 6.0, 2.0, 0.0, -0.5, -1.5]]


@pytest.mark.parametrize("fmt,dt", [("fp8_e4m3", torch.float8_e4m3fn), ("fp8_e5m2", torch.float8_e5m2)])
def test_fp8_matches_torch_cast(fmt, dt):
    x = torch.randn(4, 32)
    fmax = 448.0 if fmt == "fp8_e4m3" else 57344.0
    out = fq(dtype=fmt, granularity="per_channel")(x)
    s = x.abs().amax(-1, keepdim=True) / fmax
    assert torch.equal(out, (x / s).to(dt).float() * s)


def test_nf4_is_bitsandbytes_format_roundtrip():
    from lowbit.format import dequantize_reference, quantize
    w = torch.randn(16, 128, dtype=torch.bfloat16)
    q = FakeQuantizer(QuantizerConfig(dtype="nf4", granularity="per_group", group_size=64), "weight",
                      weight_dtype=torch.bfloat16)
    assert torch.equal(q(w.float(), out_dtype=torch.bfloat16), dequantize_reference(quantize(w, 64, True, "nf4")))


@pytest.mark.parametrize("gran,shape,rows", [("per_tensor", (8, 64), 1), ("per_channel", (8, 64), 8),
                                             ("per_group", (8, 64), 16), ("per_token", (2, 5, 64), 10)])
def test_granularity_shapes(gran, shape, rows):
    role = "activation" if gran == "per_token" else "weight"
    q = fq(role, bits=4, granularity=gran, group_size=32)
    x = torch.randn(shape)
    assert q(x).shape == x.shape
    _, scale, _ = q.quantize(x)
    assert scale.shape == (rows, 1)


def test_per_token_each_token_its_own_range():
    x = torch.randn(1, 3, 16)
    x[0, 1] *= 1000
    q = fq("activation", bits=8, granularity="per_token")
    err = (q(x) - x).abs().amax(-1)
    assert err[0, 0] < 0.1 and err[0, 2] < 0.1 and err[0, 1] > 1


def test_ste_gradient_is_identity_for_minmax():
    x = torch.randn(4, 32, requires_grad=True)
    fq(granularity="per_channel")(x).sum().backward()
    assert torch.equal(x.grad, torch.ones_like(x))


def test_learned_scale_lsq_gradients():
    w = torch.tensor([[0.1, -0.35, 2.0, 0.0]])
    q = FakeQuantizer(QuantizerConfig(bits=2, granularity="per_tensor", range="learned"), "weight", weight=w)
    with torch.no_grad():
        q.scale.fill_(0.25)  # levels -2..1 → 2.0 is clipped
    x = w.clone().requires_grad_(True)
    q(x).sum().backward()
    v = w / 0.25
    # LSQ: d/ds = round(v) - v inside the range, the clip level outside; scaled by 1/sqrt(n * Q_P)
    inside = (v >= -2) & (v <= 1)
    expect = torch.where(inside, torch.round(v) - v, torch.clamp(v, -2, 1)).sum() / math.sqrt(4 * 1)
    assert torch.allclose(q.scale.grad, expect.reshape(1, 1))
    assert torch.equal(x.grad, inside.float())  # no gradient through the clipped value


def test_learned_activation_scale_initialised_from_first_batch():
    q = fq("activation", bits=8, granularity="per_tensor", range="learned")
    x = torch.randn(2, 3, 8)
    q(x)
    assert torch.allclose(q.scale, x.abs().amax().reshape(1, 1) / 127)


def test_static_range_needs_calibration_then_is_fixed():
    from lowbit.methods.qat.prepare import calibrate
    q = fq("activation", bits=8, granularity="per_tensor", dynamic=False)
    with pytest.raises(ConfigError, match="calibrate"):
        q(torch.randn(3, 4))
    m = torch.nn.Sequential(q)
    with calibrate(m):
        m(torch.tensor([[-1.0, 2.0]]))
        m(torch.tensor([[3.0, 0.5]]))
    assert (q.lo.item(), q.hi.item()) == (-1.0, 3.0)
    out = q(torch.tensor([[10.0]]))  # beyond the calibrated range: clipped to it
    assert out.item() == pytest.approx(3.0, abs=4 / 255)


def test_disabled_and_start_step_are_identity():
    x = torch.randn(4, 16)
    assert torch.equal(fq(enabled=False)(x), x)
    q = fq(start_step=3)
    assert torch.equal(q(x), x)
    q.step = 3
    assert not torch.equal(q(x), x)


@pytest.mark.parametrize("cfg", [dict(bits=2), dict(bits=3, symmetric=False), dict(bits=4), dict(bits=8, symmetric=False),
                                 dict(dtype="fp4_e2m1"), dict(dtype="fp8_e4m3"), dict(dtype="fp8_e5m2")])
def test_codes_encode_decode_roundtrip(cfg):
    c = QuantizerConfig(granularity="per_channel", **cfg)
    rows = torch.randn(6, 33)  # odd count: the last nibble is padding
    q, _ = quantize_rows(rows, rows.abs().amax(-1, keepdim=True) / 3, None if c.symmetric else torch.ones(6, 1), c)
    assert torch.equal(decode(encode(q, c), c, q.shape), q)


@pytest.mark.parametrize("bad,match", [(dict(bits=9), "2..8"), (dict(dtype="fp8_e4m3", symmetric=False), "symmetric"),
                                       (dict(range="learned", symmetric=False), "LSQ"),
                                       (dict(granularity="per_token"), "activation granularity"),
                                       (dict(dtype="nf4", granularity="per_channel"), "blockwise"),
                                       (dict(dtype="int8"), "dtype must be one of")])
def test_bad_weight_configs_name_the_fix(bad, match):
    with pytest.raises(ConfigError, match=match):
        QuantizerConfig(**bad).validate("qat.weight")


def test_group_size_must_divide():
    q = fq(granularity="per_group", group_size=48)
    with pytest.raises(ConfigError, match="does not divide"):
        q(torch.randn(4, 64))
