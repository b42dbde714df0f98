"""lowbit.format.ggml_quants.filetypes vs the rules of llama.cpp's src/llama-quant.cpp (cases derived from the C++ source:
llama_tensor_get_type, llama_tensor_get_type_impl, tensor_type_fallback, tensor_allows_quantization)."""
import pytest

from lowbit.format.ggml_quants.filetypes import (
    ModelParams,
    tensor_allows_quantization,
    tensor_category,
    tensor_type,
    tensor_types,
)


def _llama(n_layer: int, hidden: int = 4096, ff: int = 11008, kv: int = 4096, tied: bool = False):
    t = {"token_embd.weight": (32000, hidden), "output_norm.weight": (hidden,)}
    if not tied:
        t["output.weight"] = (32000, hidden)
    for i in range(n_layer):
        p = f"blk.{i}."
        t.update({p + "attn_norm.weight": (hidden,), p + "ffn_norm.weight": (hidden,),
                  p + "attn_q.weight": (hidden, hidden), p + "attn_k.weight": (kv, hidden),
                  p + "attn_v.weight": (kv, hidden), p + "attn_output.weight": (hidden, hidden),
                  p + "ffn_gate.weight": (ff, hidden), p + "ffn_up.weight": (ff, hidden),
                  p + "ffn_down.weight": (hidden, ff)})
    return t


def _more_bits(n):  # use_more_bits() of llama_tensor_get_type_impl, spelled out
    return {i for i in range(n) if i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2}


def test_use_more_bits_layers():
    assert _more_bits(32) == {0, 1, 2, 3, 6, 9, 12, 15, 18, 21, 24, 27, 28, 29, 30, 31}
    assert _more_bits(18) == {0, 1, 4, 7, 10, 13, 15, 16, 17}


def test_q4_k_m_llama():
    types = tensor_types(_llama(32), "Q4_K_M", ModelParams(n_layer=32, n_head=32, n_head_kv=32))
    assert types["output.weight"] == "Q6_K"  # output branch: new_type != Q8_0 -> Q6_K
    assert types["token_embd.weight"] == "Q4_K"  # untied: default type
    assert types["output_norm.weight"] == "F32" and types["blk.0.attn_norm.weight"] == "F32"
    for i in range(32):
        hi = "Q6_K" if i in _more_bits(32) else "Q4_K"
        assert types[f"blk.{i}.attn_v.weight"] == hi
        assert types[f"blk.{i}.ffn_down.weight"] == hi
        for k in ("attn_q", "attn_k", "attn_output", "ffn_gate", "ffn_up"):
            assert types[f"blk.{i}.{k}.weight"] == "Q4_K"


def test_gemma3_270m_q4_k_m_fallbacks():
    """Rows of 640 are not a multiple of 256: Q4_K -> Q5_0, Q6_K -> Q8_0 (tensor_type_fallback); the tied
    token_embd takes the output branch, where nx % 256 != 0 gives Q8_0."""
    t = {"token_embd.weight": (262144, 640), "output_norm.weight": (640,)}
    for i in range(18):
        p = f"blk.{i}."
        t.update({p + "attn_q.weight": (1024, 640), p + "attn_k.weight": (256, 640),
                  p + "attn_v.weight": (256, 640), p + "attn_output.weight": (640, 1024),
                  p + "attn_q_norm.weight": (256,), p + "post_attention_norm.weight": (640,),
                  p + "ffn_gate.weight": (2048, 640), p + "ffn_up.weight": (2048, 640),
                  p + "ffn_down.weight": (640, 2048)})
    types = tensor_types(t, "Q4_K_M", ModelParams(n_layer=18, n_head=4, n_head_kv=1, arch="gemma3"))
    assert types["token_embd.weight"] == "Q8_0"
    for i in range(18):
        more = i in _more_bits(18)
        assert types[f"blk.{i}.attn_v.weight"] == ("Q8_0" if more else "Q5_0")
        assert types[f"blk.{i}.ffn_down.weight"] == ("Q6_K" if more else "Q4_K")
        assert types[f"blk.{i}.attn_output.weight"] == "Q4_K"
        assert types[f"blk.{i}.attn_q.weight"] == types[f"blk.{i}.ffn_up.weight"] == "Q5_0"
        assert types[f"blk.{i}.attn_q_norm.weight"] == "F32"


@pytest.mark.parametrize("ftype,v_lo,v_hi,down_lo,down_hi,default,out", [
    ("Q4_K_S", "Q4_K", "Q5_K", "Q4_K", "Q5_K", "Q4_K", "Q6_K"),  # attn_v: i_attention_wv < 4; ffn_down: i < n/8
    ("Q5_K_M", "Q5_K", "Q6_K", "Q5_K", "Q6_K", "Q5_K", "Q6_K"),  # use_more_bits
    ("Q5_K_S", "Q5_K", "Q5_K", "Q5_K", "Q5_K", "Q5_K", "Q6_K"),
    ("Q6_K", "Q6_K", "Q6_K", "Q6_K", "Q6_K", "Q6_K", "Q6_K"),
    ("Q8_0", "Q8_0", "Q8_0", "Q8_0", "Q8_0", "Q8_0", "Q8_0"),  # output stays Q8_0 (new_type == Q8_0)
    ("Q4_0", "Q4_0", "Q4_0", "Q4_0", "Q4_0", "Q4_0", "Q6_K"),  # output: Q6_K whenever nx % 32 == 0
    ("Q3_K_M", "Q4_K", "Q5_K", "Q4_K", "Q5_K", "Q3_K", "Q6_K"),  # attn_v: i < 2; ffn_down: i < n/16 -> Q5_K
])
def test_file_types(ftype, v_lo, v_hi, down_lo, down_hi, default, out):
    n = 32
    types = tensor_types(_llama(n), ftype, ModelParams(n_layer=n, n_head=32, n_head_kv=32))
    hi_v = {"Q4_K_S": set(range(4)), "Q3_K_M": {0, 1}}.get(ftype, _more_bits(n))
    hi_d = {"Q4_K_S": set(range(n // 8)), "Q3_K_M": set(range(n // 16))}.get(ftype, _more_bits(n))
    for i in range(n):
        assert types[f"blk.{i}.attn_v.weight"] == (v_hi if i in hi_v else v_lo), i
        assert types[f"blk.{i}.ffn_down.weight"] == (down_hi if i in hi_d else down_lo), i
    assert types["blk.5.attn_q.weight"] == types["blk.5.ffn_up.weight"] == default
    assert types["output.weight"] == out
    if ftype == "Q3_K_M":
        assert types["blk.5.attn_output.weight"] == "Q4_K"


@pytest.mark.parametrize("ftype", ["F16", "BF16", "F32"])
def test_float_file_types(ftype):
    """ggml_is_quantized(default) is false: every quantizable tensor gets the default type, no fallback."""
    t = _llama(2)
    t["blk.0.odd.weight"] = (7, 100)
    types = tensor_types(t, ftype, ModelParams(n_layer=2))
    assert types["output.weight"] == types["blk.1.attn_v.weight"] == types["blk.0.odd.weight"] == ftype
    assert types["blk.0.ffn_norm.weight"] == "F32"


def test_q4_0_imatrix_guards_first_ffn_down():
    types = tensor_types(_llama(16), "Q4_0", ModelParams(n_layer=16), has_imatrix=True)
    assert [types[f"blk.{i}.ffn_down.weight"] for i in range(3)] == ["Q4_1", "Q4_1", "Q4_0"]
    assert tensor_type("blk.1.ffn_down.weight", (4096, 11008), "Q5_0", 16, has_imatrix=True) == "Q5_1"
    assert tensor_type("blk.1.ffn_down.weight", (4096, 11008), "Q5_0", 16) == "Q5_0"


def test_moe_eight_experts():
    """n_expert == 8: attn_v and attn_k -> Q8_0, attn_output -> Q5_K; expert layers come from the name."""
    mp = dict(n_layer=32, n_expert=8, n_head=32, n_head_kv=8)
    assert tensor_type("blk.3.attn_v.weight", (1024, 4096), "Q4_K_M", **mp) == "Q8_0"
    assert tensor_type("blk.3.attn_k.weight", (1024, 4096), "Q4_K_M", **mp) == "Q8_0"
    assert tensor_type("blk.3.attn_output.weight", (4096, 4096), "Q4_K_M", **mp) == "Q5_K"
    assert tensor_type("blk.3.attn_output.weight", (4096, 4096), "Q5_K_M", **mp) == "Q5_K"  # not in the list
    assert tensor_type("blk.6.ffn_down_exps.weight", (8, 4096, 14336), "Q4_K_M", **mp, i_ffn_down=0) == "Q6_K"
    assert tensor_type("blk.7.ffn_down_exps.weight", (8, 4096, 14336), "Q4_K_M", **mp, i_ffn_down=6) == "Q4_K"
    assert tensor_type("blk.7.ffn_gate_inp.weight", (8, 4096), "Q4_K_M", **mp) == "F32"  # router stays
    with pytest.raises(ValueError, match="Bad layer"):
        tensor_type("blk.40.ffn_up_exps.weight", (8, 14336, 4096), "Q4_K_M", **mp)


def test_attn_qkv_follows_attn_v_rules():
    """category_is_attn_v() includes attn_qkv, and that branch comes first: the attn_qkv branch of
    llama_tensor_get_type_impl (Q4_K_M -> Q5_K) is never reached."""
    assert tensor_type("blk.0.attn_qkv.weight", (12288, 4096), "Q4_K_M", 32) == "Q6_K"
    assert tensor_type("blk.5.attn_qkv.weight", (12288, 4096), "Q4_K_M", 32) == "Q4_K"
    assert tensor_category("blk.5.attn_qkv.weight") == "attn_qkv"


def test_falcon():
    mp = dict(n_layer=32, arch="falcon")
    assert tensor_type("output.weight", (65024, 4544), "Q4_K_M", **mp) == "Q8_0"
    assert tensor_type("blk.1.ffn_down.weight", (4544, 18176), "Q4_K_M", **mp) == "Q6_K"  # i < n/16
    assert tensor_type("blk.6.ffn_down.weight", (4544, 18176), "Q4_K_M", **mp) == "Q5_K"  # use_more_bits
    assert tensor_type("blk.7.ffn_down.weight", (4544, 18176), "Q4_K_M", **mp) == "Q4_K"
    assert tensor_type("blk.7.attn_output.weight", (4096, 4096), "Q3_K_L", **mp) == "Q4_K"
    assert tensor_type("blk.7.attn_output.weight", (4544, 4544), "Q3_K_L", **mp) == "Q5_0"  # 4544 % 256: fallback


def test_70b_bumps_attn_v():
    assert tensor_type("blk.10.attn_v.weight", (1024, 8192), "Q4_K_S", 80) == "Q4_K"
    assert tensor_type("blk.10.attn_v.weight", (1024, 8192), "Q4_K_S", 80, model_type="70B") == "Q5_K"


def test_fallbacks():
    """tensor_type_fallback: Q4_K->Q5_0, Q5_K->Q5_1, Q6_K->Q8_0, Q2_K/Q3_K->Q4_0; F16 if 32 does not divide."""
    assert tensor_type("blk.0.ffn_up.weight", (100, 640), "Q5_K_S", 4) == "Q5_1"
    assert tensor_type("blk.0.ffn_up.weight", (100, 640), "Q6_K", 4) == "Q8_0"
    assert tensor_type("blk.0.ffn_up.weight", (100, 640), "Q3_K_S", 4) == "Q4_0"
    assert tensor_type("blk.0.ffn_up.weight", (100, 100), "Q4_K_M", 4) == "F16"
    assert tensor_type("blk.0.ffn_up.weight", (100, 100), "Q8_0", 4) == "F16"
    assert tensor_type("output.weight", (100, 640), "Q4_K_M", 4) == "Q8_0"  # output branch, nx % 256


def test_output_of_q4_0_with_odd_rows():
    # output branch: Q4_0 block is 32, 96 % 32 == 0 -> Q6_K, then the fallback turns Q6_K into Q8_0
    assert tensor_type("output.weight", (100, 96), "Q4_0", 4) == "Q8_0"
    assert tensor_type("output.weight", (100, 4096), "Q4_0", 4) == "Q6_K"


def test_counters_follow_llama_cpp_order():
    """i_attention_wv counts attn_v tensors in weight_name_comparer order (layer number, then name), and
    n_attention_wv is how many there are, not n_layer."""
    t = _llama(12)
    assert [i for i in range(12) if tensor_types(t, "Q4_K_M", ModelParams(n_layer=12))[f"blk.{i}.attn_v.weight"]
            == "Q6_K"] == sorted(_more_bits(12))
    for i in range(4, 8):  # layers without attn_v (e.g. shared KV): only 4 attn_v tensors are counted
        del t[f"blk.{i}.attn_v.weight"]
    types = tensor_types(t, "Q4_K_M", ModelParams(n_layer=12))
    wv = [i for i in range(12) if f"blk.{i}.attn_v.weight" in t]
    assert [types[f"blk.{i}.attn_v.weight"] for i in wv] == ["Q6_K" if k in _more_bits(8) else "Q4_K"
                                                             for k in range(8)]


def test_tied_embeddings_single_tensor():
    assert tensor_type("token_embd.weight", (32000, 4096), "Q4_K_M", 32) == "Q4_K"
    assert tensor_type("token_embd.weight", (32000, 4096), "Q4_K_M", 32, tied_embeddings=True) == "Q6_K"
    assert tensor_type("token_embd.weight", (32000, 4096), "Q4_K_M", 32, token_embedding_type="Q8_0") == "Q8_0"
    assert tensor_type("output.weight", (32000, 4096), "Q4_K_M", 32, output_tensor_type="Q5_K") == "Q5_K"


def test_overrides_and_pure():
    assert tensor_type("blk.0.attn_v.weight", (4096, 4096), "Q4_K_M", 32, pure=True) == "Q4_K"
    ov = [(r"attn_v\.weight$", "Q8_0"), (r"ffn_.*", "q5_k")]
    assert tensor_type("blk.5.attn_v.weight", (4096, 4096), "Q4_K_M", 32, overrides=ov) == "Q8_0"
    assert tensor_type("blk.5.ffn_up.weight", (11008, 640), "Q4_K_M", 32, overrides=ov) == "Q5_1"  # + fallback


def test_allows_quantization():
    assert not tensor_allows_quantization("blk.0.attn_norm.weight", (4096, 4096))
    assert not tensor_allows_quantization("blk.0.attn_q.bias", (4096, 4096))
    assert not tensor_allows_quantization("blk.0.attn_q.weight", (4096,))
    assert not tensor_allows_quantization("blk.0.attn_q.weight", (1, 4096))  # ggml_n_dims == 1
    assert not tensor_allows_quantization("position_embd.weight", (2048, 768))
    assert not tensor_allows_quantization("blk.0.ssm_conv1d.weight", (4, 4096))
    assert tensor_allows_quantization("blk.0.attn_q.weight", (4096, 4096))
    assert not tensor_allows_quantization("output.weight", (32000, 4096), quantize_output_tensor=False)
    assert tensor_type("blk.0.attn_norm.weight", (4096,), "Q4_K_M", 32, src_type="BF16") == "BF16"


def test_unsupported_ftype():
    with pytest.raises(ValueError, match="unsupported file type"):
        tensor_type("blk.0.attn_q.weight", (4096, 4096), "IQ2_XS", 32)
