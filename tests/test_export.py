"""`lowbit export`: every format loaded back by its real consumer (peft, transformers+bitsandbytes,
gguf.GGUFReader, transformers' GGUF loader) with matching logits."""
import json

import pytest
import torch
from test_merge import TEXT, make_adapter

from lowbit.errors import UnsupportedModelError
from lowbit.export.cli import main as cli
from lowbit.export.gguf_writer import export_gguf

# max |Δlogit| / max |logit| allowed against the dense model, per GGUF type (measured on these tiny
# random models: F16 ≈ 4e-4, BF16 ≈ 7e-3, Q8_0 ≈ 2e-2, Q4_0 ≈ 0.37)
GGUF_VS_DENSE = {"F16": 5e-3, "BF16": 3e-2, "Q8_0": 6e-2, "Q4_0": 0.6}


@pytest.fixture(scope="module")
def run_dir(tiny_model_dirs, tmp_path_factory):
    out = tmp_path_factory.mktemp("export_run")
    make_adapter(tiny_model_dirs("llama"), out)
    return out


def _save_tiny(tmp_path, config_cls, norm_std: float | None = None, **kw):
    """A tiny random model of `config_cls` (shapes as the GGUF readers expect) + tokenizer, saved to tmp_path.
    `norm_std` draws non-trivial norm weights, so a missing or double "+1" of Gemma's norms would show."""
    from transformers import AutoModelForCausalLM

    from lowbit.testing.tiny import make_tokenizer
    tok = make_tokenizer()
    cfg = config_cls(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                     bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, **kw)
    torch.manual_seed(0)
    m = AutoModelForCausalLM.from_config(cfg).eval()
    if norm_std is not None:
        with torch.no_grad():
            for n, p in m.named_parameters():
                if "norm" in n:
                    p.normal_(0, norm_std)
    m.save_pretrained(tmp_path, safe_serialization=True)
    tok.save_pretrained(tmp_path)
    return tmp_path


def qwen3_head128(tmp_path):
    """A tiny Qwen3 with head_dim 128, as every released Qwen3: transformers' GGUF loader reads no head_dim
    from the file and assumes Qwen3's default (llama.cpp reads attention.key_length, which we write)."""
    from transformers import Qwen3Config
    return _save_tiny(tmp_path, Qwen3Config, head_dim=128, tie_word_embeddings=False)


def gemma2_head256(tmp_path):
    """A tiny Gemma2 with head_dim = query_pre_attn_scalar = 256 as in Gemma-2-2B (GGUF stores no attention
    scalar; transformers' GGUF loader assumes 256), softcaps on."""
    from transformers import Gemma2Config
    return _save_tiny(tmp_path, Gemma2Config, norm_std=0.2, head_dim=256, query_pre_attn_scalar=256,
                      sliding_window=64, tie_word_embeddings=True)


def gemma3_head256(tmp_path):
    """A tiny Gemma3 whose head_dim = query_pre_attn_scalar = 256, as in Gemma-3-270M: GGUF stores no
    attention scalar, so llama.cpp and transformers' GGUF loader both assume these match."""
    from transformers import Gemma3TextConfig
    return _save_tiny(tmp_path, Gemma3TextConfig, norm_std=0.3, head_dim=256, query_pre_attn_scalar=256,
                      sliding_window=64, tie_word_embeddings=True)


def test_peft_export_loads_in_peft_on_a_bitsandbytes_base(run_dir, tiny_model_dirs, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from lowbit.export.merge import load_adapter_model, resolve_adapter
    assert cli(["export", str(run_dir), str(tmp_path / "peft"), "--format", "peft"]) == 0
    assert (tmp_path / "peft" / "adapter_model.safetensors").exists() and (tmp_path / "peft" / "lowbit_run.json").exists()
    ours, tok = load_adapter_model(resolve_adapter(run_dir), compute_dtype="float32")
    ids = tok([TEXT], return_tensors="pt").input_ids
    bnb_cfg = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                 bnb_4bit_compute_dtype=torch.float32)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dirs("llama"), quantization_config=bnb_cfg,
                                                dtype=torch.float32)
    theirs = PeftModel.from_pretrained(base, tmp_path / "peft")
    theirs.train()  # bitsandbytes' eval CPU path repacks to bf16 (README); dropout is 0
    with torch.no_grad():
        torch.testing.assert_close(theirs(input_ids=ids).logits, ours(input_ids=ids).logits, rtol=1e-4, atol=1e-4)


def test_bnb4_export_bytes_match_lowbit_format(run_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    from lowbit.format import quantize
    assert cli(["export", str(run_dir), str(tmp_path / "bnb"), "--format", "bnb4"]) == 0
    merged_dir = tmp_path / "merged"
    assert cli(["export", str(run_dir), str(merged_dir), "--format", "merged", "--dtype", "float32"]) == 0
    dense = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32)
    q = AutoModelForCausalLM.from_pretrained(tmp_path / "bnb")
    lin = q.model.layers[1].mlp.down_proj
    ours = quantize(dense.model.layers[1].mlp.down_proj.weight.detach(), 64, True, "nf4")
    assert torch.equal(lin.weight.data.reshape(-1).view(torch.uint8), ours.codes_u8())


@pytest.mark.parametrize("gguf_type", ["F16", "BF16", "Q8_0", "Q4_0"])
@pytest.mark.parametrize("arch", ["llama", "gemma2", "gemma3", "qwen2", "qwen3"])
def test_gguf_loads_back_with_matching_logits(arch, gguf_type, tiny_model_dirs, tmp_path):
    import gguf
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lowbit.export.formats import verify_gguf
    src = {"gemma2": gemma2_head256, "gemma3": gemma3_head256, "qwen3": qwen3_head128}.get(arch)
    src = src(tmp_path / arch) if src else tiny_model_dirs(arch)
    dense = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(src)
    out = tmp_path / f"model-{gguf_type}.gguf"
    rep = export_gguf(dense, tok, out, gguf_type, progress=False)

    reader = gguf.GGUFReader(str(out))
    field = lambda k: reader.fields[k].contents()  # noqa: E731
    assert field("general.architecture") == arch
    assert field("tokenizer.ggml.model") == "gpt2" and len(field("tokenizer.ggml.tokens")) == len(tok)
    assert field("tokenizer.ggml.bos_token_id") == tok.bos_token_id
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    assert types["blk.0.ffn_down.weight"] == gguf_type and types["output_norm.weight"] == "F32"
    assert ("output.weight" in types) == (not arch.startswith("gemma"))  # Gemma ties the head to the embedding

    # transformers' GGUF loader == the decoded weights (tight), and ≈ the dense model (format tolerance)
    v = verify_gguf(out, dense, tok, gguf_type)
    ids = tok([TEXT], return_tensors="pt").input_ids
    with torch.no_grad():
        scale = dense(input_ids=ids).logits.abs().max().item()
    assert v["gguf_reload_vs_decoded_max_abs_logit_diff"] < 1e-3 * max(scale, 1)
    assert v["gguf_vs_dense_max_abs_logit_diff"] < GGUF_VS_DENSE[gguf_type] * scale
    assert rep["tensor_types"][gguf_type] > 0

    # the tokenizer rebuilt from the file splits text the same way (transformers' GPT-2 builder adds no BOS)
    gtok = AutoTokenizer.from_pretrained(tmp_path, gguf_file=out.name)
    want = tok(TEXT, add_special_tokens=False).input_ids
    assert gtok(TEXT, add_special_tokens=False).input_ids == want


def test_gemma3_norms_are_stored_plus_one(tmp_path):
    import gguf
    from transformers import AutoModelForCausalLM, AutoTokenizer
    src = gemma3_head256(tmp_path / "g3")
    dense = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    export_gguf(dense, AutoTokenizer.from_pretrained(src), tmp_path / "g.gguf", "F16", progress=False)
    t = {t.name: t for t in gguf.GGUFReader(str(tmp_path / "g.gguf")).tensors}
    stored = torch.from_numpy(t["blk.0.attn_norm.weight"].data.copy())
    torch.testing.assert_close(stored, dense.model.layers[0].input_layernorm.weight.detach() + 1)


def test_llama_qk_rows_are_permuted_like_llama_cpp(tiny_model_dirs, tmp_path):
    import gguf
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lowbit.models.gguf_arch import permute_qk
    src = tiny_model_dirs("llama")
    dense = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    export_gguf(dense, AutoTokenizer.from_pretrained(src), tmp_path / "l.gguf", "F16", progress=False)
    t = {t.name: t for t in gguf.GGUFReader(str(tmp_path / "l.gguf")).tensors}
    k = dense.model.layers[0].self_attn.k_proj.weight.detach()
    stored = torch.from_numpy(t["blk.0.attn_k.weight"].data.astype("float32"))
    torch.testing.assert_close(stored, permute_qk(k, 4, 2).half().float())
    assert not torch.equal(stored, k.half().float())


def test_gguf_export_from_adapter_via_cli(run_dir, tmp_path, capsys):
    out = tmp_path / "tuned-Q8_0.gguf"
    assert cli(["export", str(run_dir), str(out), "--format", "gguf", "--gguf-type", "Q8_0"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert out.exists() and rep["tensor_types"]["Q8_0"] == 16  # 14 linears + token_embd + output
    assert rep["gguf_reload_vs_decoded_max_abs_logit_diff"] < 1e-3
    # refuses to overwrite; the existing file is untouched
    before = out.read_bytes()
    assert cli(["export", str(run_dir), str(out), "--format", "gguf"]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith("error: ")
    assert out.read_bytes() == before


def test_gguf_refuses_unsupported_architecture(tiny_model_dirs, tmp_path, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer, BloomConfig

    from lowbit.testing.tiny import make_tokenizer
    src = tmp_path / "bloom-src"
    tok = make_tokenizer()
    AutoModelForCausalLM.from_config(BloomConfig(vocab_size=len(tok), hidden_size=64, n_layer=1,
                                                 n_head=4)).save_pretrained(src)
    tok.save_pretrained(src)
    tmp_path = tmp_path / "out"
    tmp_path.mkdir()
    with pytest.raises(UnsupportedModelError, match="GGUF export supports"):
        export_gguf(AutoModelForCausalLM.from_pretrained(src), AutoTokenizer.from_pretrained(src), tmp_path / "q.gguf")
    assert cli(["export", str(src), str(tmp_path / "q.gguf"), "--format", "gguf"]) == 2
    assert "GGUF export supports" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_gguf_write_is_atomic(tiny_model_dirs, tmp_path, monkeypatch):
    import gguf
    from transformers import AutoModelForCausalLM, AutoTokenizer
    src = tiny_model_dirs("llama")

    def boom(self, *a, **k):
        raise OSError("No space left on device")
    monkeypatch.setattr(gguf.GGUFWriter, "write_tensors_to_file", boom)
    with pytest.raises(OSError):
        export_gguf(AutoModelForCausalLM.from_pretrained(src), AutoTokenizer.from_pretrained(src), tmp_path / "x.gguf",
                    progress=False)
    assert list(tmp_path.iterdir()) == []


def test_merge_into_16bit_uses_the_original_weights(run_dir, tiny_model_dirs, tmp_path, capsys):
    """--merge-into 16bit: W16 + s·B·A (not deq(NF4) + s·B·A) for every adapted layer; the GGUF holds exactly it."""
    import gguf
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from lowbit.export.formats import dense_source
    base = tiny_model_dirs("llama")
    w16 = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).state_dict()
    ad = load_file(str(run_dir / "adapter" / "adapter_model.safetensors"))
    scale = json.loads((run_dir / "adapter" / "adapter_config.json").read_text())
    scale = scale["lora_alpha"] / scale["r"]
    m16, _, info = dense_source(run_dir, merge_into="16bit", progress=False)
    trained, _, _ = dense_source(run_dir, progress=False)
    assert info["merged_into"] == "16bit"
    name = "model.layers.0.self_attn.q_proj"
    a = next(v for k, v in ad.items() if name in k and "lora_A" in k)
    b = next(v for k, v in ad.items() if name in k and "lora_B" in k)
    want = w16[f"{name}.weight"] + scale * b @ a
    torch.testing.assert_close(m16.state_dict()[f"{name}.weight"], want, rtol=0, atol=1e-6)
    assert (trained.state_dict()[f"{name}.weight"] - want).abs().max() > 1e-3  # the NF4 rounding is gone
    out = tmp_path / "m16.gguf"
    assert cli(["export", str(run_dir), str(out), "--format", "gguf", "--gguf-type", "F32", "--merge-into", "16bit"]) == 0
    capsys.readouterr()
    t = {t.name: t for t in gguf.GGUFReader(str(out)).tensors}
    v = torch.from_numpy(t["blk.0.attn_v.weight"].data.copy())
    vn = "model.layers.0.self_attn.v_proj"
    av = next(x for k, x in ad.items() if vn in k and "lora_A" in k)
    bv = next(x for k, x in ad.items() if vn in k and "lora_B" in k)
    torch.testing.assert_close(v, w16[f"{vn}.weight"] + scale * bv @ av, rtol=0, atol=1e-6)


def test_merge_into_16bit_refuses_loftq_and_dense_sources(tiny_model_dirs, tmp_path, capsys):
    make_adapter(tiny_model_dirs("llama"), tmp_path / "lq", loftq=True)
    assert cli(["export", str(tmp_path / "lq"), str(tmp_path / "x.gguf"), "--format", "gguf", "--merge-into", "16bit"]) == 2
    assert "LoftQ" in capsys.readouterr().err
    assert cli(["export", str(tiny_model_dirs("llama")), str(tmp_path / "y.gguf"), "--format", "gguf",
                "--merge-into", "16bit"]) == 2
    assert "nothing to merge" in capsys.readouterr().err
    assert cli(["export", str(tmp_path / "lq"), str(tmp_path / "m"), "--format", "merged", "--merge-into", "16bit"]) == 2
    assert "--format gguf or bnb4" in capsys.readouterr().err
    assert not any(p.name in ("x.gguf", "y.gguf", "m") for p in tmp_path.iterdir())
