"""The fused LoRA forward over a 4-bit base (lowbit.kernels.lora_matmul_4bit) equals peft's unfused one."""
import pytest
import torch

from lowbit.kernels import lora_fusable, lora_matmul_4bit, quantize_4bit
from lowbit.models import load_model
from lowbit.modules import lora as lora_mod
from lowbit.modules.lora import add_lora, keep_mask, prepare_for_kbit_training


@pytest.fixture
def peft_path():
    """Run a block with the fused path off (peft's own Linear.forward)."""
    def run(fn):
        lora_mod.FUSED["enabled"] = False
        try:
            return fn()
        finally:
            lora_mod.FUSED["enabled"] = True
    return run


def _model(path, dtype="float32", dropout=0.0, ckpt=False):
    model, tok = load_model(path, compute_dtype=dtype, progress=False)
    prepare_for_kbit_training(model, gradient_checkpointing=ckpt)
    torch.manual_seed(0)
    pm = add_lora(model, r=8, alpha=16, dropout=dropout, target_modules="all-linear")
    torch.manual_seed(1)
    for n, p in pm.named_parameters():
        if "lora_B" in n:  # B = 0 at init would hide the adapter's half of every gradient
            p.data.normal_(0, 0.05)
    return pm, tok


def _step(pm, ids):
    pm.zero_grad(set_to_none=True)
    out = pm(input_ids=ids, labels=ids)
    out.loss.backward()
    return out.logits.detach(), {n: p.grad.clone() for n, p in pm.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_fused_equals_peft_output_and_gradients(arch, tiny_model_dirs, peft_path, one_thread):
    pm, _ = _model(tiny_model_dirs(arch))
    pm.train()
    ids = torch.randint(0, 500, (2, 24))
    calls = []
    layer = next(m for m in pm.modules() if type(m).__name__ == "LoraLinear4bit")
    layer.register_forward_hook(lambda m, a, o: calls.append(m._fused_adapter(a[0], (), {})))
    logits, grads = _step(pm, ids)
    assert calls and calls[0] == "default"  # the fused path ran
    ref_logits, ref_grads = peft_path(lambda: _step(pm, ids))
    torch.testing.assert_close(logits, ref_logits, rtol=1e-5, atol=1e-5)
    assert grads.keys() == ref_grads.keys() and len(grads) > 0
    for n in grads:
        torch.testing.assert_close(grads[n], ref_grads[n], rtol=1e-4, atol=1e-6, msg=n)


def _unfused(x, q, a, b, scale, mask, p):
    from lowbit.kernels import matmul_4bit
    xd = x if mask is None else x * mask / (1 - p)  # what peft's nn.Dropout hands lora_A
    return matmul_4bit(x, q) + (xd @ a.t()) @ b.t() * scale


@pytest.mark.parametrize("p", [0.0, 0.1])
def test_lora_matmul_4bit_matches_unfused_with_same_mask(p, one_thread):
    torch.manual_seed(0)
    q = quantize_4bit(torch.randn(48, 32) * 0.1)
    a, b = torch.randn(4, 32, requires_grad=True), torch.randn(48, 4, requires_grad=True)
    x = torch.randn(3, 10, 32, requires_grad=True)
    assert lora_fusable(x, q, a)
    mask = keep_mask(x.shape, p) if p else None
    y = lora_matmul_4bit(x, q, None, a, b, 2.0 / (1 - p), mask)
    gy = torch.randn_like(y)
    got = torch.autograd.grad(y, (x, a, b), gy)
    y_ref = _unfused(x, q, a, b, 2.0, mask, p)
    want = torch.autograd.grad(y_ref, (x, a, b), gy)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)


def test_keep_mask_rate_and_generator():
    torch.manual_seed(3)
    m = keep_mask((1000, 1000), 0.05)
    assert m.dtype == torch.bool
    assert abs(m.float().mean().item() - 0.95) < 0.002  # 1e6 draws: std of the rate is 2.2e-4
    torch.manual_seed(3)
    assert torch.equal(keep_mask((1000, 1000), 0.05), m)  # checkpoint recompute replays the same mask
    assert keep_mask((100,), 0.0).all()


def test_dropout_mask_replayed_by_checkpoint_recompute(tiny_model_dirs, one_thread):
    """With dropout on, a checkpointed step and a plain one see the same masks: same loss and gradients."""
    res = []
    for ckpt in (False, True):
        pm, _ = _model(tiny_model_dirs("llama"), dropout=0.1, ckpt=ckpt)
        pm.train()
        torch.manual_seed(7)
        res.append(_step(pm, torch.randint(0, 500, (2, 24)))[1])
    for n in res[0]:
        torch.testing.assert_close(res[0][n], res[1][n], rtol=1e-5, atol=1e-7, msg=n)


def test_bf16_compute_keeps_peft_path(tiny_model_dirs, one_thread):
    """bf16 activations with fp32 adapters: nothing to fuse, peft's forward runs."""
    pm, _ = _model(tiny_model_dirs("llama"), dtype="bfloat16")
    layer = next(m for m in pm.modules() if type(m).__name__ == "LoraLinear4bit")
    x = torch.randn(2, 24, layer.in_features, dtype=torch.bfloat16)
    assert layer._fused_adapter(x, (), {}) is None
    assert layer._fused_adapter(x.float(), (), {}) is None  # x not in the base's compute dtype
