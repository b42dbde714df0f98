import pytest
import torch

from lowbit.errors import InputError, UnsupportedModelError
from lowbit.format import dequantize_reference, quantize
from lowbit.models import load_model
from lowbit.modules import Linear4bit
from lowbit.testing import ARCHS


@pytest.mark.parametrize("arch", ARCHS)
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


def test_missing_path_and_unsupported_arch(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        load_model(tmp_path / "nope")
    from transformers import GPT2Config
    GPT2Config(n_layer=1, n_embd=32, n_head=2).save_pretrained(tmp_path / "gpt2")
    with pytest.raises(UnsupportedModelError, match="supported: llama, mistral, qwen2, qwen3, gemma3_text"):
        load_model(tmp_path / "gpt2")


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
