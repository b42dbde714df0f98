"""Rotations (online Hadamard on linear inputs and post-RoPE Q/K/V) and learned weight clipping."""
from pathlib import Path

import pytest
import torch

import lowbit.methods.qat as qat
from lowbit.errors import ConfigError
from lowbit.methods.qat.clip import LR_MULT, ClippedFakeQuantizer, search_gamma
from lowbit.methods.qat.config import QuantizerConfig
from lowbit.methods.qat.numerics import quantize_rows
from lowbit.methods.qat.rotate import Rotation, factor_sizes, hadamard
from lowbit.modules.lora import add_lora
from lowbit.testing.tiny import make_tiny_model

ROT = {"preset": "w4a8kv8", "rotation": "hadamard"}
ROT_CLIP = {"preset": "w4a8kv4", "rotation": "hadamard", "weight": {"range": "learned_clip"}}


def _ids(seed=1):
    return torch.randint(0, 500, (2, 24), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("n", [1, 7, 64, 96, 576, 640, 2048])
def test_rotation_is_orthogonal_and_inverts(n):
    rot = Rotation(n, torch.Generator().manual_seed(0))
    r = rot.matrix()
    assert torch.allclose(r @ r.t(), torch.eye(n), atol=1e-5)
    x = torch.randn(3, 5, n)
    assert torch.allclose(rot(x), x @ r.t(), atol=1e-4)  # the factored transform is the dense R
    assert torch.allclose(rot.rotate(rot(x), inverse=True), x, atol=1e-5)
    m, pow2 = factor_sizes(n)
    assert m % 2 == 1 and m * torch.tensor(pow2 or [1]).prod().item() == n and all(s <= 128 for s in pow2)


def test_rotation_reuses_its_result_for_the_same_input_only():
    rot = Rotation(64, torch.Generator().manual_seed(0))
    x = torch.randn(4, 64)
    y = rot(x)
    assert rot(x) is y and rot(x.clone()) is not y
    x.mul_(2)  # in place: a new version, computed again
    assert torch.allclose(rot(x), 2 * y, atol=1e-5)
    xg = torch.randn(4, 64, requires_grad=True)
    with torch.no_grad():
        rot(xg)
    rot(xg).sum().backward()  # the no-grad result is not reused under grad
    assert xg.grad is not None


def test_siblings_share_a_rotation_and_lora_weight_is_rotated_low_rank():
    model, _ = make_tiny_model("llama", hidden=96, dtype=torch.float32)
    model = qat.prepare(add_lora(model, r=4, alpha=8, dropout=0.0, target_modules="all-linear"), ROT)
    attn = model.base_model.model.model.layers[0].self_attn
    assert attn.q_proj.lowbit_rotation is attn.k_proj.lowbit_rotation is attn.v_proj.lowbit_rotation
    with torch.no_grad():
        attn.q_proj.lora_B["default"].weight.normal_()
    from lowbit.methods.qat.linear import effective_weight
    rot = attn.q_proj.lowbit_rotation
    assert torch.allclose(rot.layer_weight(attn.q_proj), rot.rotate(effective_weight(attn.q_proj)), atol=1e-5)


def test_hadamard_entries_and_symmetry():
    h = hadamard(16)
    assert torch.allclose(h.abs(), torch.full((16, 16), 0.25)) and torch.equal(h, h.t())
    with pytest.raises(ValueError, match="power-of-two"):
        hadamard(12)


def test_rotation_spreads_an_outlier_channel_and_cuts_int8_error():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 256, generator=g)
    x[:, 3] *= 60  # one massive channel, as in LLM activations
    cfg = QuantizerConfig(bits=8, symmetric=False, granularity="per_token")
    fq = qat.FakeQuantizer(cfg, "activation")
    rot = Rotation(256, g)
    plain = (fq(x) - x).pow(2).mean()
    rotated = (rot.rotate(fq(rot(x)), inverse=True) - x).pow(2).mean()  # the error seen after undoing R
    assert rotated < plain / 10


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_rotation_alone_is_exact_in_fp32_and_unprepare_restores(arch):
    model, _ = make_tiny_model(arch, hidden=96, dtype=torch.float32)  # 96 = 3·32: an odd factor too
    ids = _ids()
    ref = model(ids).logits
    off = {"enabled": False}
    qat.prepare(model, {**ROT, "weight": off, "activation": off, "kv": off})
    assert sum(isinstance(m, Rotation) for m in model.modules()) > 0
    assert torch.allclose(model(ids).logits, ref, atol=1e-4)  # y = (W Rᵀ)(R x), q·k and attention·V kept
    qat.unprepare(model)
    assert not any(isinstance(m, Rotation) for m in model.modules())
    assert torch.equal(model(ids).logits, ref)


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
@pytest.mark.parametrize("config", [ROT, ROT_CLIP])
def test_converted_rotated_model_equals_trained_fake_quant_exactly(arch, config):
    model, _ = make_tiny_model(arch, hidden=128, dtype=torch.bfloat16)
    ids = _ids()
    ref = model(ids).logits
    qat.prepare(model, config)
    fake = model(ids).logits
    assert not torch.equal(fake, ref)
    converted = qat.convert(model)
    lin = converted.model.layers[0].mlp.down_proj
    assert isinstance(lin, qat.QuantizedLinear) and isinstance(lin.lowbit_rotation, Rotation)
    assert torch.equal(converted(ids).logits, fake)


def test_rotation_lowers_a8_error_of_a_linear_with_an_outlier_input():
    g = torch.Generator().manual_seed(0)
    lin = torch.nn.Sequential(torch.nn.Linear(256, 64, bias=False))
    with torch.no_grad():  # trained LLM weights are bell-shaped (the uniform init already suits int4 rows)
        lin[0].weight.copy_(torch.randn(64, 256, generator=g) * 0.05)
    x = torch.randn(32, 256, generator=g)
    x[:, 7] *= 50  # a massive activation channel
    ref = lin(x)
    a8 = {"activation": {"bits": 8, "symmetric": False, "granularity": "per_token"}}

    def err(config):
        out = qat.prepare(lin, config)(x)
        qat.unprepare(lin)
        return (out - ref).pow(2).mean().item()
    assert err({**a8, "rotation": "hadamard"}) < err(a8) / 10


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_rotated_clipped_model_saves_and_reloads(tmp_path, dtype):
    model, tok = make_tiny_model("gemma3", hidden=128, dtype=dtype)
    ids = _ids()
    converted = qat.convert(qat.prepare(model, ROT_CLIP))
    ref = converted(ids).logits
    qat.save_quantized(converted, tmp_path / "q", tok)
    again = qat.load_quantized(tmp_path / "q")
    assert again.lowbit_qat_config.rotation == "hadamard"
    assert torch.equal(again.model.layers[1].self_attn.lowbit_kv_rotation.signs,
                       converted.model.layers[1].self_attn.lowbit_kv_rotation.signs)
    assert torch.equal(again(ids).logits, ref)


def _wcfg(**kw):
    return QuantizerConfig(bits=4, granularity="per_channel", range="learned_clip", **kw)


@pytest.mark.parametrize("symmetric", [True, False])
def test_clip_at_gamma_one_is_minmax(symmetric):
    w = torch.randn(8, 64)
    cfg = _wcfg(symmetric=symmetric)
    fq = ClippedFakeQuantizer(cfg, "weight", weight=w)
    with torch.no_grad():
        fq.clip_init.fill_(1.0)
    minmax = qat.FakeQuantizer(QuantizerConfig(bits=4, symmetric=symmetric, granularity="per_channel"), "weight")
    assert torch.allclose(fq(w), minmax(w), atol=1e-6)


def test_clip_search_never_worse_than_minmax_and_clips_heavy_tails():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(16, 256, generator=g)
    w[:8, 0] = 12.0  # rows with one far outlier: clipping it costs less than the coarse grid
    cfg = _wcfg(symmetric=True)
    gamma = search_gamma(w, cfg)
    assert (gamma[:8] < 1).all()
    fq = ClippedFakeQuantizer(cfg, "weight", weight=w)
    minmax = qat.FakeQuantizer(QuantizerConfig(bits=4, granularity="per_channel"), "weight")
    err_c = (fq(w) - w).pow(2).sum(-1)
    err_m = (minmax(w) - w).pow(2).sum(-1)
    assert (err_c <= err_m + 1e-6).all() and err_c.sum() < 0.9 * err_m.sum()


def test_clip_gradients_are_straight_through_and_lsq_like():
    torch.manual_seed(0)
    w = torch.randn(4, 32)
    cfg = _wcfg(symmetric=True)
    fq = ClippedFakeQuantizer(cfg, "weight", weight=w)
    with torch.no_grad():
        fq.clip_init.fill_(0.6)  # some values clipped in every row
    wr = w.clone().requires_grad_(True)
    fq(wr).sum().backward()
    amax = w.abs().amax(-1, keepdim=True)
    scale = 0.6 * amax / 7
    v = w / scale
    clipped = (v < -8) | (v > 7)
    assert clipped.any() and (~clipped).any()
    # the weight: identity inside the range, nothing beyond it
    assert torch.equal(wr.grad, (~clipped).float())
    # the clip factor: d(q·s)/ds = round(v) − v inside, the clamped level outside (LSQ), times ds/dγ = amax/7
    ds = torch.where(clipped, v.clamp(-8, 7), torch.round(v) - v).sum(-1, keepdim=True)
    assert torch.allclose(fq.clip_delta.grad, ds * amax / 7 * LR_MULT, rtol=1e-4, atol=1e-5)


def test_clip_convert_stores_the_clipped_codes():
    w = torch.randn(8, 64)
    cfg = _wcfg(symmetric=False)
    fq = ClippedFakeQuantizer(cfg, "weight", weight=w)
    q, scale, zero = fq.quantize(w)
    _, deq = quantize_rows(w, scale, zero, cfg)
    assert torch.allclose(deq, fq(w)) and q.min() >= 0 and q.max() <= 15


def test_lora_qat_with_rotation_and_clip_trains_and_exports_what_it_trained():
    model, _ = make_tiny_model("gemma3", hidden=128, dtype=torch.float32)
    model = qat.prepare(add_lora(model, r=8, alpha=16, dropout=0.0, target_modules="all-linear"), ROT_CLIP)
    deltas = [p for n, p in model.named_parameters() if n.endswith("clip_delta")]
    assert deltas and all(p.requires_grad for p in deltas)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for step in range(3):
        ids = _ids(step)
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    assert any(p.abs().sum() > 0 for p in deltas)
    ids = _ids(9)
    model.eval()
    trained = model(ids).logits
    assert torch.equal(qat.convert(model)(ids).logits, trained)


@pytest.mark.parametrize("bad, match", [
    ({"preset": "w4a8kv8", "activation": {"range": "learned_clip"}}, "learned_clip clips integer weight"),
    ({"preset": "nf4", "rotation": "hadamard"}, "rotation folds"),
    ({"preset": "w4a8kv8", "rotation": "spin"}, "rotation.*must be one of"),
])
def test_bad_rotation_and_clip_configs_name_the_fix(bad, match):
    with pytest.raises(ConfigError, match=match):
        qat.resolve(bad)


GEMMA = Path(".cache/models/gemma-3-270m")


@pytest.mark.slow
@pytest.mark.skipif(not GEMMA.exists(), reason="run scripts/prepare_model.py first")
def test_gemma_rotated_clipped_lora_student_converts_saves_and_reloads_exactly(tmp_path):
    # the real model: 640 = 5·128 inputs (odd factor), head_dim 256, tied embedding, sandwich norms
    from lowbit.models import load_model
    model, tok = load_model(GEMMA, compute_dtype="auto", progress=False)
    model = qat.prepare(add_lora(model, r=4, alpha=8, dropout=0.0, target_modules="all-linear"), ROT_CLIP)
    with torch.no_grad():  # a trained adapter's worth of change, so the merge is not a no-op
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(std=1e-3, generator=torch.Generator().manual_seed(0))
    ids = tok("To be, or not to be, that is the question:", return_tensors="pt").input_ids
    model.eval()
    with torch.no_grad():
        trained = model(ids).logits
        converted = qat.convert(model)
        assert torch.equal(converted(ids).logits, trained)
        qat.save_quantized(converted, tmp_path / "q", tok)
        assert torch.equal(qat.load_quantized(tmp_path / "q")(ids).logits, trained)
