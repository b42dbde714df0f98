"""Activation-aware LoftQ: input moments, whitening, and a lower output error than weight-space LoftQ."""
import pytest
import torch

from lowbit.errors import ConfigError, InputError
from lowbit.methods.loftq import loftq_weight, lora_scaling
from lowbit.methods.loftq.calibration import calibration_batches, input_moments, whitening
from lowbit.methods.loftq.quantizers import BaseQuantizer


def _weight_and_inputs(out=192, inp=128, n=4096, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out, inp, generator=g) * 0.02
    # LLM-like inputs: a few channels carry most of the energy, plus correlated directions
    scale = torch.ones(inp)
    scale[:6] = 20.0
    mix = torch.eye(inp) + 0.3 * torch.randn(inp, inp, generator=g) / inp ** 0.5
    x = (torch.randn(n, inp, generator=g) * scale) @ mix
    return w, x


def _out_err(w, deq, s, A, B, x):
    low = 0 if A is None else s * B @ A
    return ((x @ (w - deq - low).T).norm() / (x @ w.T).norm()).item()


@pytest.mark.parametrize("r,alpha", [(8, 16), (16, 4)])
def test_calibrated_loftq_beats_weight_space_loftq_on_the_output_error(r, alpha):
    w, x = _weight_and_inputs()
    H = x.T @ x / x.shape[0]
    s = lora_scaling(r, alpha)
    quant = BaseQuantizer("nf4", 64, True)
    from lowbit.format import dequantize_reference

    def run(wh):
        q, A, B, errors, best = loftq_weight(w, quant, r, s, iters=5, svd="full", whiten=wh)
        return _out_err(w, dequantize_reference(q, torch.float32), s, A, B, x), errors, best

    zero = _out_err(w, quant(w)[1], s, None, None, x)
    plain, _, _ = run(None)
    cal, errors, best = run(whitening(H, damp=1e-4))
    assert plain < zero
    assert cal < 0.8 * plain, (zero, plain, cal)
    # the reported (activation) errors are the real output errors, up to the tiny damping
    assert errors[0] == pytest.approx(zero, rel=1e-2)
    assert errors[best] == pytest.approx(cal, rel=1e-2)


def test_whitening_is_the_damped_square_root():
    _, x = _weight_and_inputs(inp=64, n=512)
    H = x.T @ x / x.shape[0]
    wh = whitening(H, damp=0.01)
    lam = 0.01 * H.diagonal().mean()
    torch.testing.assert_close(wh.sqrt @ wh.sqrt, H + lam * torch.eye(64), rtol=1e-4, atol=1e-3 * lam)
    torch.testing.assert_close(wh.sqrt @ wh.inv_sqrt, torch.eye(64), rtol=0, atol=1e-4)
    with pytest.raises(ConfigError, match="damp must be > 0"):
        whitening(H, damp=0.0)


def test_input_moments_match_the_inputs_and_are_shared(tiny_model_dirs):
    from lowbit.models import load_model
    model, tok = load_model(tiny_model_dirs("llama"), compute_dtype="float32", progress=False)
    names = [n for n, m in model.named_modules() if n.endswith(("q_proj", "k_proj", "o_proj", "down_proj"))]
    ids = torch.randint(3, 200, (5, 16), generator=torch.Generator().manual_seed(0))
    H = input_moments(model, ids, names, batch_size=2, progress=False)
    seen = {}
    hooks = [model.get_submodule(n).register_forward_pre_hook(
        lambda m, a, n=n: seen.setdefault(n, []).append(a[0].reshape(-1, a[0].shape[-1]))) for n in names]
    with torch.no_grad():
        model(input_ids=ids)
    for h in hooks:
        h.remove()
    for n in names:
        x = torch.cat(seen[n])
        torch.testing.assert_close(H[n], x.T @ x / x.shape[0], rtol=1e-4, atol=1e-5)
    layer0 = "model.layers.0.self_attn."
    assert H[layer0 + "q_proj"] is H[layer0 + "k_proj"]  # one input, one moment
    assert H[layer0 + "o_proj"] is not H[layer0 + "q_proj"]


def test_calibration_batches_and_bad_input(tiny_model_dirs, tmp_path):
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(tiny_model_dirs("llama"))
    text = tmp_path / "calib.txt"
    text.write_text("Fair is foul, and foul is fair: hover through the fog and filthy air. " * 40)
    x = calibration_batches(tok, text, n_samples=6, seq_len=32)
    assert x.shape == (6, 32) and (x[:, 0] == tok.bos_token_id).all()
    with pytest.raises(InputError, match="does not exist"):
        calibration_batches(tok, tmp_path / "missing.txt")
    (tmp_path / "short.txt").write_text("Fair is foul.")
    with pytest.raises(InputError, match="fewer than one window"):
        calibration_batches(tok, tmp_path / "short.txt", seq_len=64)


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_calibrated_loftq_init_lowers_the_output_error_of_every_layer(arch, tiny_model_dirs, tmp_path):
    from lowbit.methods.loftq import loftq_init
    text = tmp_path / "calib.txt"
    text.write_text(open("lowbit/testing/data/macbeth_sample.txt").read())
    pm, tok, res = loftq_init(tiny_model_dirs(arch), r=4, alpha=16, dropout=0.0, iters=3, compute_dtype="float32",
                              progress=False, calibration=text, calibration_samples=8, calibration_seq_len=32)
    assert res.calibration["tokens"] == 8 * 32
    assert res.summary()["metric"] == "activation"
    for layer in res.layers:
        assert layer.metric == "activation"
        assert layer.final_error < layer.zero_init_error, layer.name
