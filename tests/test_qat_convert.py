"""prepare → convert parity for every preset, KV placement, save/load, YAML presets."""
import pytest
import torch
import yaml

import lowbit.methods.qat as qat
from lowbit.errors import ConfigError
from lowbit.testing.tiny import make_tiny_model

PRESETS = list(qat.PRESETS)


def _model(arch):
    # hidden 128 so the g128 preset's groups divide every linear
    return make_tiny_model(arch, hidden=128, dtype=torch.bfloat16)


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
@pytest.mark.parametrize("preset", PRESETS)
def test_convert_forward_equals_prepared_forward_exactly(arch, preset):
    model, _ = _model(arch)
    ids = torch.randint(0, 500, (2, 24))
    ref = model(ids).logits
    qat.prepare(model, preset)
    fake = model(ids).logits
    assert not torch.equal(fake, ref)  # fake quant does something
    converted = qat.convert(model)
    assert torch.equal(converted(ids).logits, fake)  # atol 0, activation/KV schemes included
    assert not any(isinstance(m, qat.FakeQuantizer) and m.role == "weight" for m in converted.modules())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("preset", ["w4a8kv4", "nf4", "fp4-e2m1", "w4a16-g128"])
def test_converted_model_saves_and_reloads(tmp_path, preset, dtype):
    # fp32 too: the reload must rebuild in the saved dtype (Gemma's embed_scale buffer is computed at init)
    model, tok = make_tiny_model("gemma3", hidden=128, dtype=dtype)
    ids = torch.randint(0, 500, (1, 20))
    converted = qat.convert(qat.prepare(model, preset))
    ref = converted(ids).logits
    qat.save_quantized(converted, tmp_path / "q", tok)
    from safetensors import safe_open
    with safe_open(str(tmp_path / "q" / "model.safetensors"), "pt") as f:
        meta = f.metadata()
        keys = list(f.keys())
    assert meta["format"] == "lowbit.methods.qat" and meta["version"] == "1"
    assert any(k.endswith(".codes") or k.endswith("weight.absmax") for k in keys)
    again = qat.load_quantized(tmp_path / "q")
    assert again.model.embed_tokens.embed_scale.dtype == dtype
    assert torch.equal(again(ids).logits, ref)


def test_packed_codes_are_smaller_than_bf16():
    model, _ = _model("llama")
    converted = qat.convert(qat.prepare(model, "w4a16-g128"))
    lin = converted.model.layers[0].mlp.up_proj
    assert isinstance(lin, qat.QuantizedLinear) and lin.codes.dtype == torch.uint8
    assert lin.codes.numel() == lin.in_features * lin.out_features // 2


def test_reload_refuses_foreign_file(tmp_path):
    from safetensors.torch import save_file
    (tmp_path / "m").mkdir()
    save_file({"a": torch.zeros(1)}, str(tmp_path / "m" / "model.safetensors"), metadata={"format": "other"})
    from lowbit.errors import InputError
    with pytest.raises(InputError, match="not a lowbit QAT checkpoint"):
        qat.load_quantized(tmp_path / "m")


@pytest.mark.parametrize("arch", ["llama", "gemma3", "qwen2", "qwen3"])
@pytest.mark.parametrize("position", ["pre_rope", "post_rope"])
def test_kv_fake_quant_changes_attention_when_on_identity_when_off(arch, position):
    model, _ = _model(arch)
    ids = torch.randint(0, 500, (1, 16))
    ref = model(ids).logits
    cfg = qat.QATConfig(kv=qat.QuantizerConfig(bits=2, symmetric=False, granularity="per_token"), kv_position=position)
    qat.prepare(model, cfg)
    kvq = [q for q in qat.quantizers(model) if q.role == "kv"]
    assert len(kvq) == 2 * model.config.num_hidden_layers
    calls = []
    hook = kvq[0].register_forward_hook(lambda *a: calls.append(1))
    assert not torch.equal(model(ids).logits, ref)
    assert calls, "the key quantizer of layer 0 was not on the forward path"
    hook.remove()
    for q in kvq:
        q.cfg.enabled = False
    assert torch.equal(model(ids).logits, ref)


def test_post_rope_kv_sees_rotated_keys():
    # post-RoPE keys are [batch, heads, tokens, head_dim]; pre-RoPE ones are k_proj outputs [batch, tokens, kv_dim]
    model, _ = _model("llama")
    cfg = qat.QATConfig(kv=qat.QuantizerConfig(bits=8, symmetric=False, granularity="per_token"))
    qat.prepare(model, cfg)
    shapes = []
    model.model.layers[0].self_attn.lowbit_k_fq.register_forward_hook(lambda m, i, o: shapes.append(tuple(i[0].shape)))
    model(torch.randint(0, 500, (1, 7)))
    assert shapes == [(1, 2, 7, 32)]


def test_unprepare_restores_the_model():
    model, _ = _model("gemma3")
    ids = torch.randint(0, 500, (1, 12))
    ref = model(ids).logits
    qat.unprepare(qat.prepare(model, "w4a8kv4"))
    assert torch.equal(model(ids).logits, ref)
    assert not qat.quantizers(model)


def test_embeddings_and_lm_head_excluded_by_default_configurable():
    model, _ = _model("llama")
    qat.prepare(model, "w4a16-g128")
    assert model.lm_head.__class__ is torch.nn.Linear
    model2, _ = _model("llama")
    qat.prepare(model2, {"preset": "w4a16-g128", "exclude": []})
    assert model2.lm_head.lowbit_weight_fq is not None


def test_start_step_and_set_step():
    model, _ = _model("llama")
    ids = torch.randint(0, 500, (1, 12))
    ref = model(ids).logits
    qat.prepare(model, {"preset": "w4a16-g128", "weight": {"start_step": 5}})
    assert torch.equal(model(ids).logits, ref)
    qat.set_step(model, 5)
    assert not torch.equal(model(ids).logits, ref)


def test_preset_yamls_match_the_code(tmp_path):
    from pathlib import Path
    files = sorted(Path("configs/qat").glob("*.yaml"))
    assert {f.stem for f in files} == set(PRESETS)
    for f in files:
        assert f.read_text().startswith("# "), f"{f} must open with its launch command"
        loaded = qat.resolve(str(f))
        assert loaded.to_dict() == qat.preset_config(f.stem).to_dict(), f


def test_config_errors():
    with pytest.raises(ConfigError, match="did you mean 'w4a8kv8'"):
        qat.resolve("w4a8kv9")
    with pytest.raises(ConfigError, match="unknown config key 'qat.wieght'"):
        qat.resolve({"wieght": {"bits": 4}})
    with pytest.raises(ConfigError, match="quantizes nothing"):
        qat.resolve({})
    with pytest.raises(ConfigError, match="does not divide"):
        qat.prepare(make_tiny_model("llama", hidden=64)[0], "w4a16-g128")
    with pytest.raises(ConfigError, match="nf4 is bitsandbytes' blockwise"):
        qat.resolve(yaml.safe_load("weight: {dtype: nf4}"))
