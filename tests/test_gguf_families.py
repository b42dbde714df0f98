"""GGUF export for every tiny family lowbit loads that llama.cpp supports: llama.cpp's architecture and tensor
names, read back through gguf-py and the family's inverse conventions (F32 ≈ exact, Q8_0 close), transformers'
GGUF loader where it rebuilds the same model, tokenizer metadata (the comparison with llama.cpp's own
convert_hf_to_gguf.py on these families is in test_gguf_export.py)."""
import functools

import gguf
import pytest
import torch

from lowbit.errors import UnsupportedModelError
from lowbit.export.formats import gguf_reference, verify_gguf
from lowbit.export.gguf_writer import export_gguf
from lowbit.models.gguf_arch import gguf_layout, gguf_tensors, tensor_type_plan
from lowbit.testing import ARCHS, make_tiny_model
from lowbit.testing.tiny import make_tokenizer

# tiny family -> the general.architecture llama.cpp's converter writes for it ("llama3_rope": llama with llama3
# rope scaling; "llama4_text": with llama.cpp's fixed 8192-token chunks, see tiny())
EXPECTED_ARCH = {"llama": "llama", "mistral": "llama", "mixtral": "llama", "granite": "granite", "qwen2": "qwen2",
                 "qwen3": "qwen3", "qwen3_moe": "qwen3moe", "gemma2": "gemma2", "gemma3": "gemma3", "gemma3_vl": "gemma3",
                 "phi3": "phi3", "olmo2": "olmo2", "gpt_neox": "gptneox", "gpt2": "gpt2", "gpt_oss": "gpt-oss",
                 "deepseek_v3": "deepseek2", "llama4_text": "llama4", "llama3_rope": "llama", "gemma4_text": "gemma4",
                 "gemma4_text_moe": "gemma4", "gemma4_vl": "gemma4", "qwen3_5_text": "qwen35",
                 "qwen3_5_moe_text": "qwen35moe", "qwen3_5_vl": "qwen35"}
# max |Δlogit| / max(|logit|, 1) of the decoded file against the dense model; Gemma 4 attends with scale 1
# (q/k normed, no 1/√d), so its logits move ~5x more per unit of weight error (measured: 0.067-0.10 vs 0.007-0.014)
TOLERANCE = {"F32": 1e-5, "Q8_0": 6e-2}
Q8_GEMMA4 = 0.2


def test_every_tiny_family_is_exported():
    assert set(EXPECTED_ARCH) - {"llama3_rope"} == set(ARCHS)


@functools.lru_cache(maxsize=None)
def tiny(arch):
    import transformers as tf
    if arch not in ("llama4_text", "llama3_rope"):
        model, tok = make_tiny_model(arch)
        if arch == "qwen3_moe":
            _renormalize_top_k(model)
        return model, tok
    tok = make_tokenizer()
    common = dict(vocab_size=len(tok), hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  head_dim=16, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    cfg = tf.Llama4TextConfig(**common, intermediate_size=64, intermediate_size_mlp=128, num_local_experts=4,
                              num_experts_per_tok=1, interleave_moe_layer_step=2, max_position_embeddings=512,
                              tie_word_embeddings=False) if arch == "llama4_text" else tf.LlamaConfig(
        **common, intermediate_size=128, max_position_embeddings=4096,
        rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 64})
    torch.manual_seed(0)
    return tf.AutoModelForCausalLM.from_config(cfg).eval(), tok


def _renormalize_top_k(model):
    """Released Qwen3 MoE models renormalize the top-k router weights (llama.cpp's qwen3moe always does);
    transformers' config default does not."""
    model.config.norm_topk_prob = True
    for m in model.modules():
        if hasattr(m, "norm_topk_prob"):
            m.norm_topk_prob = True


def _probe(tok):
    return tok(["Fair is foul, and foul is fair: hover through the fog and filthy air."], return_tensors="pt").input_ids


def _valid_names(arch_name: str, n_layer: int) -> set[str]:
    """Every tensor name llama.cpp knows for this architecture (gguf-py's MODEL_TENSORS)."""
    arch = next(a for a, n in gguf.MODEL_ARCH_NAMES.items() if n == arch_name)
    names = set()
    for t in gguf.MODEL_TENSORS[arch]:
        for bid in range(n_layer):
            base = gguf.TENSOR_NAMES[t].format(bid=bid)
            names |= {base, f"{base}.weight", f"{base}.bias", f"{base}.scale"}
    return names


@pytest.mark.parametrize("gguf_type", ["F32", "Q8_0"])
@pytest.mark.parametrize("arch", sorted(EXPECTED_ARCH))
def test_family_exports_and_reads_back(arch, gguf_type, tmp_path):
    model, tok = tiny(arch)
    out = tmp_path / f"{arch}.gguf"
    rep = export_gguf(model, tok, out, gguf_type, progress=False)
    reader = gguf.GGUFReader(str(out))
    assert rep["architecture"] == EXPECTED_ARCH[arch] == reader.fields["general.architecture"].contents()
    cfg = getattr(model.config, "text_config", None) or model.config
    names = [t.name for t in reader.tensors]
    assert len(set(names)) == len(names) and set(names) <= _valid_names(rep["architecture"], cfg.num_hidden_layers)
    if gguf_type == "Q8_0":  # every weight whose rows split into 32-blocks is Q8_0; norms / routers stay F32
        types = {t.name: t.tensor_type.name for t in reader.tensors}
        assert types["token_embd.weight"] == "Q8_0" and types["output_norm.weight"] == "F32"
        assert all(types[n] == "F32" for n in types if "ffn_gate_inp" in n or "_norm" in n)
        assert all(types[n] == "Q8_0" for n in types if n.endswith("_exps.weight"))

    v = verify_gguf(out, model, tok, gguf_type)
    ids = _probe(tok)
    with torch.no_grad():
        dense = model(input_ids=ids).logits
    scale = max(dense.abs().max().item(), 1.0)
    tol = Q8_GEMMA4 if gguf_type == "Q8_0" and arch.startswith("gemma4") else TOLERANCE[gguf_type]
    assert v["gguf_decoded_vs_dense_max_abs_logit_diff"] <= tol * scale
    if gguf_type == "Q8_0":  # the file really is quantized
        assert v["gguf_decoded_vs_dense_max_abs_logit_diff"] > 0
    # the inverse puts every exported HF tensor back: F32 decodes to the very weights
    if gguf_type == "F32":
        ref, _ = gguf_reference(model, out)
        sd, ref_sd = model.state_dict(), ref.state_dict()
        for hf_name, _ in gguf_layout(model):
            assert torch.equal(ref_sd[hf_name], sd[hf_name]), hf_name

    f = lambda k: reader.fields[k].contents()  # noqa: E731
    assert f("tokenizer.chat_template") == tok.chat_template
    assert (f("tokenizer.ggml.bos_token_id"), f("tokenizer.ggml.eos_token_id"), f("tokenizer.ggml.padding_token_id")) == (
        tok.bos_token_id, tok.eos_token_id, tok.pad_token_id)
    assert f("tokenizer.ggml.add_bos_token") is True and "tokenizer.ggml.eot_token_id" not in reader.fields


def test_expert_tensors_are_stacked_3d_in_llama_cpp_order(tmp_path):
    """transformers 5's fused gate_up_proj (n_expert, 2·ff, hidden) → ffn_gate_exps / ffn_up_exps; gpt-oss
    stores (n_expert, hidden, 2·ff) with gate / up interleaved."""
    model, _ = tiny("qwen3_moe")
    t = dict(gguf_tensors(model))
    gate_up = model.model.layers[0].mlp.experts.gate_up_proj.detach()
    ff = gate_up.shape[1] // 2
    assert torch.equal(t["blk.0.ffn_gate_exps.weight"], gate_up[:, :ff])
    assert torch.equal(t["blk.0.ffn_up_exps.weight"], gate_up[:, ff:])
    model, _ = tiny("gpt_oss")
    t = dict(gguf_tensors(model))
    e = model.model.layers[0].mlp.experts
    assert torch.equal(t["blk.0.ffn_gate_exps.weight"], e.gate_up_proj.detach()[..., ::2].transpose(1, 2))
    assert torch.equal(t["blk.0.ffn_up_exps.bias"], e.gate_up_proj_bias.detach()[..., 1::2])
    assert torch.equal(t["blk.0.ffn_down_exps.weight"], e.down_proj.detach().transpose(1, 2))
    assert t["blk.0.ffn_down_exps.weight"].shape == (4, 64, 64) and t["blk.0.attn_sinks.weight"].shape == (4,)


def test_gpt_neox_qkv_is_regrouped_into_q_k_v_blocks():
    """HF's query_key_value rows are per head (q, k, v of head 0, then head 1...); llama.cpp wants all q, all k,
    all v. The first `hidden` rows of attn_qkv must compute what HF's attention uses as the query."""
    model, _ = tiny("gpt_neox")
    attn = model.gpt_neox.layers[0].attention
    x = torch.randn(3, model.config.hidden_size)
    with torch.no_grad():
        qkv = attn.query_key_value(x).reshape(3, 4, 3, -1)  # HF's view: (tokens, heads, q/k/v, head_dim)
    t = dict(gguf_tensors(model))
    w, b = t["blk.0.attn_qkv.weight"], t["blk.0.attn_qkv.bias"]
    ours = (x @ w.T + b).reshape(3, 3, 4, -1)  # llama.cpp's view: (tokens, q/k/v, heads, head_dim)
    torch.testing.assert_close(ours.transpose(1, 2), qkv)


def test_gpt2_conv1d_weights_are_transposed():
    model, _ = tiny("gpt2")
    t = dict(gguf_tensors(model))
    assert torch.equal(t["blk.0.attn_qkv.weight"], model.transformer.h[0].attn.c_attn.weight.detach().T)
    assert "output.weight" not in t and "position_embd.weight" in t  # tied head; learned positions


def test_image_text_checkpoint_exports_its_text_model(tmp_path):
    model, tok = tiny("gemma3_vl")
    names = dict(gguf_layout(model))
    assert not any(n.startswith(("model.vision_tower.", "model.multi_modal_projector.")) for n in names)
    assert names["model.language_model.embed_tokens.weight"][0][0] == "token_embd.weight"
    out = tmp_path / "vl.gguf"
    export_gguf(model, tok, out, "F32", progress=False)
    r = gguf.GGUFReader(str(out))
    assert r.fields["gemma3.vocab_size"].contents() == 520  # the marker rows above the tokenizer stay
    assert r.fields["gemma3.attention.sliding_window"].contents() == 64


def test_metadata_carries_each_familys_settings(tmp_path):
    want = {"granite": {"granite.attention.scale": 1 / 16, "granite.embedding_scale": 2.0, "granite.residual_scale": 0.5,
                        "granite.logit_scale": 4.0},
            "gpt_neox": {"gptneox.rope.dimension_count": 4, "gptneox.use_parallel_residual": True},
            "mixtral": {"llama.expert_count": 4, "llama.expert_used_count": 2},
            "qwen3_moe": {"qwen3moe.expert_count": 4, "qwen3moe.expert_feed_forward_length": 64},
            "gpt_oss": {"gpt-oss.expert_count": 4, "gpt-oss.attention.sliding_window": 64,
                        "gpt-oss.rope.scaling.factor": 32.0, "gpt-oss.rope.scaling.original_context_length": 4096},
            "phi3": {"phi3.rope.dimension_count": 16, "phi3.attention.sliding_window": 0},
            "deepseek_v3": {"deepseek2.attention.head_count_kv": 1, "deepseek2.attention.kv_lora_rank": 64,
                            "deepseek2.attention.key_length": 72, "deepseek2.attention.key_length_mla": 24,
                            "deepseek2.leading_dense_block_count": 1, "deepseek2.expert_shared_count": 1,
                            "deepseek2.expert_gating_func": 2, "deepseek2.expert_weights_scale": 2.5},
            "gemma4_text_moe": {"gemma4.attention.key_length": 32, "gemma4.attention.key_length_swa": 16,
                                "gemma4.rope.dimension_count_swa": 16, "gemma4.expert_feed_forward_length": 64,
                                "gemma4.embedding_length_per_layer_input": 64, "gemma4.rope.freq_base_swa": 1e4},
            "llama4_text": {"llama4.interleave_moe_layer_step": 2, "llama4.expert_feed_forward_length": 64,
                            "llama4.feed_forward_length": 128}}
    for arch, keys in want.items():
        model, tok = tiny(arch)
        export_gguf(model, tok, tmp_path / f"{arch}.gguf", "F32", progress=False)
        r = gguf.GGUFReader(str(tmp_path / f"{arch}.gguf"))
        for k, v in keys.items():
            assert r.fields[k].contents() == pytest.approx(v), (arch, k)


def test_families_without_gguf_conventions_fail_in_one_line(tmp_path):
    import transformers as tf
    tok = make_tokenizer()
    model = tf.AutoModelForCausalLM.from_config(tf.BloomConfig(vocab_size=len(tok), hidden_size=64, n_layer=1, n_head=4))
    with pytest.raises(UnsupportedModelError) as e:
        export_gguf(model, tok, tmp_path / "x.gguf", "Q8_0", progress=False)
    msg = str(e.value)
    assert "\n" not in msg and "not 'bloom'" in msg and "qwen3_moe" in msg and "--format merged or bnb4" in msg
    assert not (tmp_path / "x.gguf").exists()


def test_settings_llama_cpp_cannot_express_fail_in_one_line(tmp_path):
    model, tok = make_tiny_model("qwen3_moe")  # transformers' default norm_topk_prob=False
    with pytest.raises(UnsupportedModelError, match="norm_topk_prob=False.*--format merged or bnb4"):
        export_gguf(model, tok, tmp_path / "x.gguf", "F32", progress=False)
    model, tok = make_tiny_model("llama4_text")  # 64-token chunks; llama.cpp fixes 8192
    with pytest.raises(UnsupportedModelError, match="attention_chunk_size=64 .llama.cpp: 8192.*--format merged or bnb4"):
        export_gguf(model, tok, tmp_path / "x.gguf", "F32", progress=False)
    assert not (tmp_path / "x.gguf").exists()


def test_deepseek_kv_b_is_split_for_mla_absorption_and_llama3_rope_gets_its_factors():
    model, _ = tiny("deepseek_v3")
    t = dict(gguf_tensors(model))
    kv_b = model.model.layers[0].self_attn.kv_b_proj.weight.detach().reshape(4, 16 + 16, 64)  # heads, nope + v, rank
    assert torch.equal(t["blk.0.attn_k_b.weight"], kv_b[:, :16].transpose(1, 2))
    assert torch.equal(t["blk.0.attn_v_b.weight"], kv_b[:, 16:])
    assert t["blk.1.exp_probs_b.bias"].shape == (4,) and "blk.0.attn_kv_b.weight" not in t
    factors = dict(gguf_tensors(tiny("llama3_rope")[0]))["rope_freqs.weight"]
    assert factors.shape == (8,) and factors[0] == 1 and factors[-1] == 32  # high frequencies kept, low ones scaled
    assert "rope_freqs.weight" not in dict(gguf_tensors(tiny("llama")[0]))


def test_tokenizer_gguf_cannot_express_fails_in_one_line(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    model, _ = tiny("phi3")
    wl = Tokenizer(models.WordLevel({f"w{i}": i for i in range(512)}, unk_token="w0"))
    wl.pre_tokenizer = pre_tokenizers.Whitespace()
    with pytest.raises(UnsupportedModelError, match="WordLevel.*--format merged or bnb4"):
        export_gguf(model, PreTrainedTokenizerFast(tokenizer_object=wl), tmp_path / "x.gguf", "F32", progress=False)


def test_gemma4_sentencepiece_style_bpe_gets_llama_cpps_gemma4_vocab(tmp_path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from lowbit.testing.tiny import sample_text
    sp = Tokenizer(models.BPE(byte_fallback=True))
    sp.pre_tokenizer, sp.decoder = pre_tokenizers.Metaspace(), decoders.Metaspace()
    sp.train_from_iterator(sample_text().splitlines(), trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<pad>", "<bos>", "<eos>"], show_progress=False))
    tok = PreTrainedTokenizerFast(tokenizer_object=sp, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>")
    model, _ = tiny("gemma4_text")
    export_gguf(model, tok, tmp_path / "g4.gguf", "F32", progress=False)
    r = gguf.GGUFReader(str(tmp_path / "g4.gguf"))
    assert r.fields["tokenizer.ggml.model"].contents() == "gemma4" and len(r.fields["tokenizer.ggml.merges"].contents())
    assert r.fields["tokenizer.ggml.bos_token_id"].contents() == tok.bos_token_id


def test_end_of_turn_id_is_written_and_must_lie_in_the_vocabulary(tmp_path):
    model, tok = tiny("gemma3_vl")  # 8 embedding rows above the tokenizer: room for one more token
    tok = make_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": ["<|im_end|>"]})
    export_gguf(model, tok, tmp_path / "a.gguf", "F32", progress=False)
    r = gguf.GGUFReader(str(tmp_path / "a.gguf"))
    assert r.fields["tokenizer.ggml.eot_token_id"].contents() == tok.convert_tokens_to_ids("<|im_end|>") == 512
    small, _ = tiny("phi3")  # 512 rows: the new token has no embedding
    with pytest.raises(UnsupportedModelError, match="outside the model's 512 embedding rows"):
        export_gguf(small, tok, tmp_path / "b.gguf", "F32", progress=False)


def test_moe_q4_k_m_gives_expert_tensors_llama_cpps_types(tmp_path):
    """Rows of 256 (the k-quant block) and 8 experts, where llama-quantize's Q4_K_M rules differ from a dense
    model's: attn_v / attn_k → Q8_0, attn_output → Q5_K; 3-D expert FFNs counted per layer from the name
    (ffn_down_exps: Q6_K on the layers use_more_bits picks), routers kept F32."""
    import transformers as tf
    tok = make_tokenizer()
    cfg = tf.Qwen3MoeConfig(vocab_size=len(tok), hidden_size=256, intermediate_size=256, moe_intermediate_size=256,
                            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=64,
                            num_experts=8, num_experts_per_tok=2, max_position_embeddings=512,
                            bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    model = tf.AutoModelForCausalLM.from_config(cfg).eval()
    _renormalize_top_k(model)
    out = tmp_path / "moe.gguf"
    export_gguf(model, tok, out, "Q4_K_M", progress=False)
    stored = {t.name: t for t in gguf.GGUFReader(str(out)).tensors}
    plan = tensor_type_plan(list(gguf_tensors(model)), model, "Q4_K_M", has_imatrix=False)
    assert {n: t.tensor_type.name for n, t in stored.items()} == plan
    for i in (0, 1):
        assert plan[f"blk.{i}.attn_v.weight"] == plan[f"blk.{i}.attn_k.weight"] == "Q8_0"
        assert plan[f"blk.{i}.attn_output.weight"] == "Q5_K" and plan[f"blk.{i}.ffn_gate_inp.weight"] == "F32"
        assert plan[f"blk.{i}.ffn_gate_exps.weight"] == plan[f"blk.{i}.ffn_up_exps.weight"] == "Q4_K"
    assert (plan["blk.0.ffn_down_exps.weight"], plan["blk.1.ffn_down_exps.weight"]) == ("Q4_K", "Q6_K")
    assert list(stored["blk.0.ffn_down_exps.weight"].shape) == [256, 256, 8]  # GGUF ne: {ff, hidden, n_expert}
    v = verify_gguf(out, model, tok, "Q4_K_M")
    with torch.no_grad():
        scale = max(model(input_ids=_probe(tok)).logits.abs().max().item(), 1.0)
    assert 0 < v["gguf_decoded_vs_dense_max_abs_logit_diff"] < 0.6 * scale


def test_expert_count_is_read_under_each_configs_name():
    from types import SimpleNamespace

    from lowbit.models.gguf_arch.base import n_experts
    for key in ("num_local_experts", "num_experts", "n_routed_experts"):
        assert n_experts(SimpleNamespace(**{key: 16})) == 16
    assert n_experts(tiny("mixtral")[0].config) == n_experts(tiny("gpt_oss")[0].config) == 4
    assert n_experts(tiny("llama")[0].config) == 0


# ---- transformers' GGUF loader: tiny configs with the settings it assumes instead of reading them ----

def _loader_friendly(arch):
    import transformers as tf
    tok = make_tokenizer()
    ids = dict(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    common = dict(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, **ids)
    cfg = {
        "phi3": lambda: tf.Phi3Config(**common),
        "gpt2": lambda: tf.GPT2Config(vocab_size=len(tok), n_embd=64, n_layer=2, n_head=4, n_positions=1024, **ids),
        "qwen3_moe": lambda: tf.Qwen3MoeConfig(**common, head_dim=16, moe_intermediate_size=768, num_experts=4,
                                               num_experts_per_tok=2, tie_word_embeddings=False),
        "gemma3_vl": lambda: tf.Gemma3Config(
            text_config=dict(common, vocab_size=len(tok) + 8, head_dim=256, query_pre_attn_scalar=256, sliding_window=64),
            vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                               image_size=28, patch_size=14),
            mm_tokens_per_image=4, image_token_index=len(tok), boi_token_index=len(tok) + 1, eoi_token_index=len(tok) + 2),
    }[arch]()
    torch.manual_seed(0)
    m = tf.AutoModelForCausalLM.from_config(cfg).eval()
    _renormalize_top_k(m)
    with torch.no_grad():  # non-trivial norms: a missing or double "+1" (Gemma) would show
        for n, p in m.named_parameters():
            if "norm" in n:
                p.normal_(0, 0.3)
    return m, tok


@pytest.mark.parametrize("arch", ["phi3", "gpt2", "qwen3_moe", "gemma3_vl"])
def test_transformers_gguf_loader_rebuilds_the_same_model(arch, tmp_path):
    model, tok = _loader_friendly(arch)
    out = tmp_path / f"{arch}.gguf"
    export_gguf(model, tok, out, "Q8_0", progress=False)
    v = verify_gguf(out, model, tok, "Q8_0")
    assert v["transformers_gguf_load"] == "ok"
    with torch.no_grad():
        scale = max(model(input_ids=_probe(tok)).logits.abs().max().item(), 1.0)
    assert v["gguf_reload_vs_decoded_max_abs_logit_diff"] < 1e-3 * scale
    assert 0 < v["gguf_vs_dense_max_abs_logit_diff"] < TOLERANCE["Q8_0"] * scale
