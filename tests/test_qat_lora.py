"""QAT + LoRA on an NF4 base, merge-aware: what is exported is what was trained."""
import pytest
import torch

import lowbit.methods.qat as qat
from lowbit.errors import ConfigError
from lowbit.models.load import quantize_model
from lowbit.modules.lora import add_lora
from lowbit.testing.tiny import make_tiny_model


def _qlora(arch="llama", dropout=0.0):
    model, _ = make_tiny_model(arch, hidden=128, dtype=torch.bfloat16)
    quantize_model(model)  # NF4 double quant, blocksize 64
    return add_lora(model, r=8, alpha=16, dropout=dropout, target_modules="all-linear")


def _train(model, steps=6):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-2)
    g = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(steps):
        ids = torch.randint(0, 500, (2, 24), generator=g)
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()


def _ids():
    return torch.randint(0, 500, (2, 24), generator=torch.Generator().manual_seed(1))  # 48 rows: the dequant matmul path


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_merge_aware_export_equals_trained_model_naive_does_not(arch):
    ids = _ids()
    aware = qat.prepare(_qlora(arch), "nf4")
    _train(aware)
    trained = aware(ids).logits
    merged = aware.merge_and_unload()  # the standard merge: deq(base) + s·BA → requantize to NF4
    assert torch.equal(merged(ids).logits, trained)

    naive = _qlora(arch)
    _train(naive)
    naive_trained = naive(ids).logits
    naive_merged = naive.merge_and_unload()
    assert (naive_merged(ids).logits - naive_trained).abs().max() > 1e-2


def test_merge_aware_convert_gives_linear4bit_with_same_logits(tmp_path):
    from lowbit.modules.linear4bit import Linear4bit
    ids = _ids()
    model = qat.prepare(_qlora(), "nf4")
    _train(model, 3)
    trained = model(ids).logits
    converted = qat.convert(model)
    assert isinstance(converted.model.layers[0].self_attn.q_proj, Linear4bit)
    assert torch.equal(converted(ids).logits, trained)


def test_merge_aware_gradients_reach_lora_only():
    model = qat.prepare(_qlora(), "nf4")
    ids = _ids()
    model(input_ids=ids, labels=ids).loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert grads and all(("lora_" in n) for n in grads)
    assert all(g is not None for n, g in grads.items() if "lora_A" in n)
    assert sum(g.abs().sum() for n, g in grads.items() if "lora_A" in n) == 0  # B = 0 at init
    assert all(g.abs().sum() > 0 for n, g in grads.items() if "lora_B" in n)


def test_int4_qat_lora_on_nf4_base_converts_exactly():
    ids = _ids()
    model = qat.prepare(_qlora("gemma3"), "w4a8kv4")
    _train(model, 3)
    trained = model(ids).logits
    assert torch.equal(qat.convert(model)(ids).logits, trained)


def test_lora_dropout_is_refused_with_the_fix():
    with pytest.raises(ConfigError, match="lora.dropout: 0"):
        qat.prepare(_qlora(dropout=0.1), "nf4")


def test_learned_weight_scales_train_with_lora():
    model = qat.prepare(_qlora(), {"preset": "w4a16-g128", "weight": {"range": "learned", "symmetric": True}})
    scales = [q.scale for q in qat.quantizers(model) if q.role == "weight"]
    assert scales and all(s.requires_grad for s in scales)
    before = [s.detach().clone() for s in scales]
    _train(model, 2)
    assert any(not torch.equal(a, b) for a, b in zip(before, scales))
