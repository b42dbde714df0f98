"""LoftQ: errors fall over iterations, beat zero-init for any alpha, and land correctly in peft adapters."""
import pytest
import torch

from lowbit.errors import ConfigError
from lowbit.methods.loftq import (
    apply_loftq,
    load_loftq_base,
    loftq_init,
    loftq_load_model,
    loftq_quantize_model,
    loftq_weight,
    lora_scaling,
    save_loftq_base,
)
from lowbit.methods.loftq.quantizers import BaseQuantizer


def _weight(out=192, inp=128, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out, inp, generator=g) * 0.02
    w[:, :4] *= 8  # outlier columns, as in real LLM weights
    return w


@pytest.mark.parametrize("quant_type", ["nf4", "fp4", "int3", "int4", "int8"])
@pytest.mark.parametrize("r,alpha,rslora", [(8, 16, False), (16, 4, False), (8, 32, True)])
def test_error_falls_monotonically_and_ends_below_zero_init(quant_type, r, alpha, rslora):
    s = lora_scaling(r, alpha, rslora)
    q, A, B, errors, best = loftq_weight(_weight(), BaseQuantizer(quant_type, 64, True), r, s, iters=5, svd="full")
    assert len(errors) == 6
    assert all(b <= a + 1e-6 for a, b in zip(errors, errors[1:])), errors
    assert errors[best] < 0.9 * errors[0]
    # the reported error is the real one, with peft's scaling s applied to B·A
    w = _weight()
    deq = BaseQuantizer(quant_type, 64, True)(w)[1] if quant_type.startswith("int") else None
    if deq is None:
        from lowbit.format import dequantize_reference
        deq = dequantize_reference(q, torch.float32)
    else:
        deq = q.dequantize(torch.float32)
    real = ((w - deq - s * B @ A).norm() / w.norm()).item()
    assert real == pytest.approx(errors[best], rel=1e-4)


def test_int2_keeps_the_best_iterate():
    q, A, B, errors, best = loftq_weight(_weight(), BaseQuantizer("int2", 64), 16, 2.0, iters=6)
    assert errors[best] == min(errors) < 0.75 * errors[0]  # the shared intN rule (integer zero point): 0.72 here
    w = _weight()
    assert ((w - q.dequantize(torch.float32) - 2.0 * B @ A).norm() / w.norm()).item() == pytest.approx(errors[best],
                                                                                                      rel=1e-4)


def test_scaling_is_accounted_for_any_alpha():
    """s·B·A is the same low-rank correction for every alpha; ignoring s (peft's LoftQ) breaks alpha != r."""
    w = _weight()
    products = []
    for alpha in (1.0, 8.0, 64.0):
        s = lora_scaling(8, alpha)
        _, A, B, errors, best = loftq_weight(w, BaseQuantizer(), 8, s, iters=2)
        products.append(s * B @ A)
        # A and B carry √σ/√s each: balanced magnitudes, so neither factor starts tiny
        assert A.norm().item() == pytest.approx(B.norm().item(), rel=1e-3)
    for p in products[1:]:
        torch.testing.assert_close(p, products[0], rtol=1e-4, atol=1e-6)
    # the peft-style factors (B·A = L, no 1/s) at alpha=64, r=8 overshoot by 8x: worse than no correction
    q, A, B, errors, _ = loftq_weight(w, BaseQuantizer(), 8, 1.0, iters=2)
    from lowbit.format import dequantize_reference
    wrong = ((w - dequantize_reference(q, torch.float32) - 8.0 * B @ A).norm() / w.norm()).item()
    assert wrong > errors[0]


def test_lowrank_svd_option():
    q, A, B, errors, best = loftq_weight(_weight(), BaseQuantizer(), 8, 2.0, iters=3, svd="lowrank")
    assert errors[best] < 0.9 * errors[0]


def test_bad_input_names_the_fix():
    with pytest.raises(ConfigError, match="lower lora.r"):
        loftq_weight(_weight(16, 16), BaseQuantizer(), 32, 1.0)
    with pytest.raises(ConfigError, match="choose one of"):
        BaseQuantizer("int5")
    with pytest.raises(ConfigError, match="blocksize"):
        BaseQuantizer("nf4", 48)
    with pytest.raises(ConfigError, match="svd"):
        loftq_weight(_weight(), BaseQuantizer(), 4, 1.0, svd="qr")


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_loftq_init_puts_the_right_factors_into_peft(arch, tiny_model_dirs):
    """For every adapted layer: W − deq(base) − peft's delta == the reported LoftQ error; logits move toward dense."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from lowbit.models import load_model
    path = tiny_model_dirs(arch)
    pm, tok, res = loftq_init(path, r=8, alpha=32, dropout=0.0, iters=3, compute_dtype="float32", progress=False)
    dense_sd = load_file(str(path / "model.safetensors"))
    layers = {l.name: l for l in res.layers}
    assert len(layers) == len(res.lora) > 0
    checked = 0
    for name, mod in pm.get_base_model().named_modules():
        if name in layers:
            w = dense_sd[f"{name}.weight"].float()
            delta = mod.get_delta_weight("default").float()
            err = ((w - mod.get_base_layer().dequantize(torch.float32) - delta).norm() / w.norm()).item()
            assert err == pytest.approx(layers[name].final_error, rel=1e-4)
            assert layers[name].final_error < layers[name].zero_init_error
            checked += 1
    assert checked == len(layers)
    ids = tok(["Fair is foul, and foul is fair: hover through the fog and filthy air."], return_tensors="pt").input_ids
    dense = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    zero, _ = load_model(path, compute_dtype="float32", progress=False)
    with torch.no_grad():
        ref = dense(input_ids=ids).logits
        e_zero = (zero(input_ids=ids).logits - ref).abs().mean()
        e_loftq = (pm(input_ids=ids).logits - ref).abs().mean()
    assert e_loftq < e_zero


def test_in_memory_and_streamed_loftq_agree(tiny_model_dirs):
    from transformers import AutoModelForCausalLM
    path = tiny_model_dirs("llama")
    streamed, _, r1 = loftq_load_model(path, r=4, alpha=8, iters=2, compute_dtype="float32", progress=False)
    dense = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    r2 = loftq_quantize_model(dense, r=4, alpha=8, iters=2, compute_dtype="float32", progress=False)
    assert set(r1.lora) == set(r2.lora)
    for k in r1.lora:
        torch.testing.assert_close(r1.lora[k][0], r2.lora[k][0])
    sa, sb = streamed.state_dict(), dense.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


def test_apply_refuses_a_different_lora_config(tiny_model_dirs):
    from lowbit.modules.lora import add_lora
    path = tiny_model_dirs("llama")
    model, _, res = loftq_load_model(path, r=4, alpha=8, iters=1, compute_dtype="float32", progress=False)
    pm = add_lora(model, r=4, alpha=16, dropout=0.0)
    with pytest.raises(ConfigError, match="same lora.r/alpha"):
        apply_loftq(pm, res)


def test_loftq_base_round_trip(tiny_model_dirs, tmp_path):
    from lowbit.models import load_model
    from lowbit.modules.linear4bit import Linear4bit
    path = tiny_model_dirs("llama")
    model, _, _ = loftq_load_model(path, r=4, alpha=8, iters=2, compute_dtype="float32", progress=False)
    save_loftq_base(model, tmp_path / "loftq_base.safetensors")
    plain, _ = load_model(path, compute_dtype="float32", progress=False)
    assert load_loftq_base(plain, tmp_path / "loftq_base.safetensors") == 14
    for (n, a), (_, b) in zip(model.named_modules(), plain.named_modules()):
        if isinstance(a, Linear4bit):
            assert torch.equal(a.dequantize(torch.float32), b.dequantize(torch.float32)), n
    with pytest.raises(FileExistsError, match="--overwrite"):
        save_loftq_base(model, tmp_path / "loftq_base.safetensors", overwrite=False)
