import pytest
import torch

from lowbit.errors import InputError, UnsupportedModelError
from lowbit.format import dequantize_reference, quantize
from lowbit.models import load_model
from lowbit.modules import Experts4bit, Linear4bit

LLAMA_LIKE = ("llama", "gemma3", "qwen2", "qwen3", "mistral")  # every family: tests/test_any_model.py


@pytest.mark.parametrize("arch", LLAMA_LIKE)
def test_loads_4bit_equal_to_dense_with_dequantized_weights(arch, tiny_model_dirs):
    from transformers import AutoModelForCausalLM
    path = tiny_model_dirs(arch)
    model, tok = load_model(path, compute_dtype="float32", progress=False)
    lin4 = [n for n, m in model.named_modules() if isinstance(m, Linear4bit)]
    assert len(lin4) == 7 * model.config.num_hidden_layers  # q k v o gate up down
    assert not isinstance(model.lm_head, Linear4bit)
    ref = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    for n, m in ref.named_modules():
        if n in lin4:
            m.weight.data = dequantize_reference(quantize(m.weight.data), torch.float32)
    ids = tok("Fair is foul, and foul is fair", return_tensors="pt").input_ids
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, ref(ids).logits, rtol=1e-5, atol=1e-5)


def test_embeddings_and_norms_in_compute_dtype(tiny_model_dirs):
    model, _ = load_model(tiny_model_dirs("gemma3"), compute_dtype="bfloat16", progress=False)
    dense = {p.dtype for n, p in model.named_parameters() if not n.endswith("proj.weight")}
    assert dense == {torch.bfloat16}
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()  # still tied


def test_float_container_storage_for_sharding(tiny_model_dirs):
    model, _ = load_model(tiny_model_dirs("llama"), storage_dtype="bfloat16", compute_dtype="float32", progress=False)
    assert model.model.layers[0].self_attn.q_proj.weight.dtype == torch.bfloat16


def test_missing_path(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        load_model(tmp_path / "nope")


def test_gpt2_conv1d_layers_load_transposed(tiny_model_dirs):
    """GPT-2 keeps its projections as Conv1D (weight (in, out)): they become Linear4bit of the transpose."""
    model, tok = load_model(tiny_model_dirs("gpt2"), compute_dtype="float32", progress=False)
    c_attn = model.transformer.h[0].attn.c_attn
    assert isinstance(c_attn, Linear4bit) and c_attn.lowbit_conv1d and (c_attn.in_features, c_attn.out_features) == (64, 192)


def _one_line(excinfo, *words):
    msg = str(excinfo.value)
    assert "\n" not in msg and all(w in msg for w in words), msg


def test_refuses_what_is_not_a_decoder_only_causal_lm(tmp_path):
    from transformers import BertConfig, Qwen3VLConfig, T5Config
    BertConfig(num_hidden_layers=1, hidden_size=32, num_attention_heads=2, intermediate_size=64).save_pretrained(
        tmp_path / "bert")
    T5Config(num_layers=1, d_model=32, num_heads=2, d_ff=64).save_pretrained(tmp_path / "t5")
    Qwen3VLConfig().save_pretrained(tmp_path / "vl")
    with pytest.raises(UnsupportedModelError) as e:
        load_model(tmp_path / "bert")
    _one_line(e, "'bert'", "encoder-only")
    with pytest.raises(UnsupportedModelError) as e:
        load_model(tmp_path / "t5")
    _one_line(e, "'t5'", "seq2seq")
    with pytest.raises(UnsupportedModelError) as e:
        load_model(tmp_path / "vl")
    _one_line(e, "'qwen3_vl'", "image-text", "no causal-LM class")


def test_unknown_or_remote_code_models_are_refused(tmp_path):
    import json
    for name, cfg in {"unknown": {"model_type": "not_a_model"},
                      "remote": {"model_type": "my_lm", "auto_map": {"AutoConfig": "cfg.MyConfig",
                                                                     "AutoModelForCausalLM": "m.MyLM"}}}.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UnsupportedModelError) as e:
        load_model(tmp_path / "unknown")
    _one_line(e, "transformers cannot read")
    with pytest.raises(UnsupportedModelError) as e:
        load_model(tmp_path / "remote")
    _one_line(e, "trust_remote_code=True")


def test_prequantized_checkpoints_other_than_bnb4_are_refused(tmp_path, tiny_model_dirs):
    import json
    import shutil
    d = tmp_path / "gptq"
    shutil.copytree(tiny_model_dirs("llama"), d)
    cfg = json.loads((d / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "gptq", "bits": 4}
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UnsupportedModelError) as e:
        load_model(d)
    _one_line(e, "'gptq'")


def test_image_text_model_loads_its_language_model_in_4bit_vision_frozen_16bit(tiny_model_dirs):
    from lowbit.modules.lora import add_lora
    model, _ = load_model(tiny_model_dirs("gemma3_vl"), compute_dtype="bfloat16", progress=False)
    vision = [(n, p) for n, p in model.named_parameters() if ".vision_tower." in n or "multi_modal" in n]
    assert vision and all(p.dtype == torch.bfloat16 and not p.requires_grad for _, p in vision)
    assert not any(isinstance(m, Linear4bit) for n, m in model.named_modules() if "vision_tower" in n)
    assert isinstance(model.model.language_model.layers[0].self_attn.q_proj, Linear4bit)
    pm = add_lora(model, r=4, alpha=8, dropout=0.0)
    lora = [n for n, _ in pm.named_parameters() if "lora_" in n]
    assert lora and not any("vision_tower" in n for n in lora)


def test_moe_experts_stream_across_shards_holding_one_fused_tensor(tmp_path, monkeypatch):
    """Per-expert checkpoint tensors spread over shards are fused as transformers does, holding only the
    pieces of the fused tensors being built — at most one layer's experts (peak ≈ 4-bit model + one tensor)."""
    from lowbit.models import keys
    from lowbit.testing import make_tiny_model
    dense, tok = make_tiny_model("qwen3_moe")
    dense.save_pretrained(tmp_path / "sharded", max_shard_size="40KB")
    tok.save_pretrained(tmp_path / "sharded")
    assert len(list((tmp_path / "sharded").glob("*.safetensors"))) > 3
    held, feed = [0], keys.CheckpointKeys.feed

    def tracking(self, key, tensor):
        out = feed(self, key, tensor)
        held[0] = max(held[0], sum(t.numel() for parts in self.pending.values() for _, _, t in parts))
        return out
    monkeypatch.setattr(keys.CheckpointKeys, "feed", tracking)
    model, _ = load_model(tmp_path / "sharded", compute_dtype="float32", progress=False)
    one_layer = sum(p.numel() for p in dense.model.layers[0].mlp.experts.parameters())
    assert 0 < held[0] <= one_layer
    assert isinstance(model.model.layers[1].mlp.experts, Experts4bit)
    ids = torch.tensor([[1, 5, 9, 30, 2]])
    single, _ = load_model(_saved(dense, tok, tmp_path / "single"), compute_dtype="float32", progress=False)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, single(ids).logits)


def _saved(model, tok, path):
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def test_pickle_only_checkpoint_is_refused(tmp_path, tiny_model_dirs):
    import shutil
    d = tmp_path / "m"
    shutil.copytree(tiny_model_dirs("llama"), d)
    (d / "model.safetensors").unlink()
    (d / "pytorch_model.bin").write_bytes(b"x")
    with pytest.raises(InputError, match="safetensors only"):
        load_model(d)


def test_bnb_model_converts_without_requantizing(tiny_model_dirs):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from lowbit.models import from_bnb_model
    path = tiny_model_dirs("qwen2")
    bnb_cfg = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                 bnb_4bit_compute_dtype=torch.float32)
    bm = AutoModelForCausalLM.from_pretrained(path, quantization_config=bnb_cfg, dtype=torch.float32)
    ids = torch.tensor([[1, 5, 9, 30, 2]])
    bnb_bytes = {k: v.clone() for k, v in bm.state_dict().items()}
    ours = from_bnb_model(bm)
    assert isinstance(ours.model.layers[0].mlp.up_proj, Linear4bit)
    sd = ours.state_dict()
    for k, v in bnb_bytes.items():
        assert torch.equal(sd[k], v), k
    mine, _ = load_model(path, compute_dtype="float32", progress=False)
    with torch.no_grad():
        assert torch.equal(ours(ids).logits, mine(ids).logits)
