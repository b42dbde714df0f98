import pytest
import torch
from torch import nn

from lowbit.format import dequantize_reference
from lowbit.modules import Linear4bit
from lowbit.modules.lora import add_lora


@pytest.mark.parametrize("compute_dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("storage", [torch.uint8, torch.bfloat16, torch.float32])
def test_forward_backward_equal_dense_dequantized(compute_dtype, storage):
    torch.manual_seed(0)
    lin = nn.Linear(192, 72, bias=True)
    q = Linear4bit.from_linear(lin, storage_dtype=storage, compute_dtype=compute_dtype)
    assert q.weight.dtype == storage and not q.weight.requires_grad
    w = dequantize_reference(q.quant, compute_dtype)
    x = torch.randn(24, 192, dtype=compute_dtype, requires_grad=True)  # > 16 rows: dequantize + matmul path
    x_ref = x.detach().clone().requires_grad_(True)
    y = q(x)
    y_ref = torch.nn.functional.linear(x_ref, w, q.bias.to(compute_dtype))
    assert torch.equal(y, y_ref)
    g = torch.randn_like(y)
    y.backward(g)
    y_ref.backward(g)
    assert torch.equal(x.grad, x_ref.grad)


@pytest.mark.parametrize("rows", [1, 3, 16])
def test_small_batch_fused_path_matches_dequantized_matmul(rows):
    torch.manual_seed(1)
    q = Linear4bit.from_linear(nn.Linear(256, 96, bias=True), compute_dtype=torch.bfloat16)
    x = torch.randn(rows, 256, dtype=torch.bfloat16)
    ref = x.float() @ dequantize_reference(q.quant, torch.bfloat16).float().t() + q.bias.float()
    got = q(x).float()
    # bf16 output and bf16-rounded code values: a few bf16 ulps of the largest output
    assert (got - ref).abs().max() <= 0.02 * ref.abs().max()


def test_state_dict_is_bitsandbytes_layout_and_round_trips():
    lin = nn.Linear(128, 64)
    q = Linear4bit.from_linear(lin, compute_dtype=torch.float32)
    sd = q.state_dict()
    assert set(sd) == {"weight", "weight.absmax", "weight.quant_map", "weight.nested_absmax",
                       "weight.nested_quant_map", "weight.quant_state.bitsandbytes__nf4", "bias"}
    other = Linear4bit.from_linear(nn.Linear(128, 64), compute_dtype=torch.float32)
    other.load_state_dict(sd)
    x = torch.randn(2, 128)
    assert torch.equal(other(x), q(x))


def _tiny_lora_model():
    torch.manual_seed(0)
    base = nn.Sequential()
    base.add_module("up", Linear4bit.from_linear(nn.Linear(64, 128), compute_dtype=torch.float32))
    base.add_module("act", nn.GELU())
    base.add_module("down", Linear4bit.from_linear(nn.Linear(128, 64), compute_dtype=torch.float32))

    class Wrap(nn.Module):  # peft wants a model with a config-free forward
        def __init__(self):
            super().__init__()
            self.body = base

        def forward(self, x):
            return self.body(x)
    from peft import LoraConfig, get_peft_model

    from lowbit.modules.lora import register_lowbit_layers
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["up", "down"], init_lora_weights=False)
    register_lowbit_layers(cfg)
    return get_peft_model(Wrap(), cfg)


def _grads_and_merge(model, x):
    model.train()
    model.zero_grad()
    model(x).pow(2).sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    merged = {n: m.get_base_layer().dequantize(torch.float32) + m.get_delta_weight("default")
              for n, m in model.named_modules() if hasattr(m, "lora_A") and hasattr(m, "get_base_layer")}
    return grads, merged


def test_no_grad_eval_forward_changes_nothing():
    """bitsandbytes 0.50 on AVX512-BF16 CPUs repacks 4-bit weights on the first no_grad
    forward, after which merge and LoRA gradients are silently wrong. Ours must not."""
    model = _tiny_lora_model()
    x = torch.randn(8, 64)
    grads_before, merged_before = _grads_and_merge(model, x)
    bytes_before = {n: b.clone() for n, b in model.state_dict().items()}
    model.eval()
    with torch.no_grad():
        model(x)
    grads_after, merged_after = _grads_and_merge(model, x)
    assert all(torch.equal(bytes_before[n], t) for n, t in model.state_dict().items())
    assert grads_before.keys() == grads_after.keys() and len(grads_after) == 4
    for n in grads_before:
        assert torch.equal(grads_before[n], grads_after[n]), n
        assert grads_after[n].abs().sum() > 0, f"{n}: gradient is zero"
    for n in merged_before:
        assert torch.equal(merged_before[n], merged_after[n]), n


def test_peft_merge_requantizes_through_our_layer(tiny_model_dirs):
    from lowbit.models import load_model
    model, tok = load_model(tiny_model_dirs("llama"), compute_dtype="float32", progress=False)
    pm = add_lora(model, r=4, alpha=8)
    for n, p in pm.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.02)
    layer = pm.base_model.model.model.layers[0].mlp.down_proj
    expect = layer.get_base_layer().dequantize(torch.float32) + layer.get_delta_weight("default")
    merged = pm.merge_and_unload()
    got = merged.model.layers[0].mlp.down_proj
    assert isinstance(got, Linear4bit)
    # requantized: equal to quantize(expect) exactly, and close to expect
    from lowbit.format import quantize
    assert torch.equal(got.dequantize(torch.float32), dequantize_reference(quantize(expect), torch.float32))


def test_same_check_catches_the_bitsandbytes_repack_bug():
    """The check above is sensitive: on bitsandbytes' repacking CPU path it sees the damage."""
    import bitsandbytes as bnb
    from bitsandbytes.functional import has_avx512bf16
    if not has_avx512bf16():
        pytest.skip("bitsandbytes repacks only on AVX512-BF16 CPUs")
    from peft import LoraConfig, get_peft_model
    torch.manual_seed(0)

    class Wrap(nn.Module):
        def __init__(self):
            super().__init__()
            self.up = bnb.nn.Linear4bit(64, 128, bias=False, compute_dtype=torch.bfloat16, quant_type="nf4")
            self.up.weight = bnb.nn.Params4bit(torch.randn(128, 64) * 0.05, requires_grad=False, quant_type="nf4")
            self.up.weight = self.up.weight.to("cpu")  # quantizes
            self.down = bnb.nn.Linear4bit(128, 64, bias=False, compute_dtype=torch.bfloat16, quant_type="nf4")
            self.down.weight = bnb.nn.Params4bit(torch.randn(64, 128) * 0.05, requires_grad=False, quant_type="nf4")
            self.down.weight = self.down.weight.to("cpu")

        def forward(self, x):
            return self.down(torch.nn.functional.gelu(self.up(x)))
    model = get_peft_model(Wrap(), LoraConfig(r=4, lora_alpha=8, target_modules=["up", "down"],
                                              init_lora_weights=False))
    x = torch.randn(8, 64)

    def grads():
        model.train()
        model.zero_grad()
        model(x).float().pow(2).sum().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    before = grads()
    model.eval()
    with torch.no_grad():
        model(x)
    after = grads()
    changed = [n for n in before if not torch.equal(before[n], after[n])]
    assert changed, ("bitsandbytes no longer changes LoRA gradients after a no_grad forward: the known "
                     "0.50 repack bug is fixed in this build; update README's note and this test")
