"""Per-tensor GGUF types of a llama.cpp file type (Q4_K_M, Q5_K_S, ...), as ``llama-quantize`` picks them.

A pure-Python port of ``llama_tensor_get_type`` and its helpers in llama.cpp's ``src/llama-quant.cpp``
(``tensor_allows_quantization``, ``tensor_get_category``, ``llama_tensor_get_type_impl``,
``tensor_type_fallback``, ``llama_ftype_get_default_type``), for the k-quant and legacy file types plus
F16/BF16/F32. Inputs are GGUF tensor names (``blk.N.attn_v.weight``, ``token_embd.weight``...), shapes in torch
order (``shape[-1]`` is GGUF's ``ne[0]``, the row length; a 3-D ``(n_expert, rows, n)`` is a stacked expert tensor)
and model hyper-parameters.

``tensor_types`` handles a whole model and reproduces llama.cpp's running counters exactly (attn_v tensors are
counted in llama.cpp's tensor order: by layer, then by name). ``tensor_type`` does one tensor, deriving the
counters from the layer number in the name (exact for the usual one-attn_v-per-layer models).
"""
from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

__all__ = ["FTYPES", "ModelParams", "default_type", "tensor_allows_quantization", "tensor_category",
           "tensor_type", "tensor_types"]

# llama_ftype_get_default_type
_DEFAULT_TYPE = {"F32": "F32", "F16": "F16", "BF16": "BF16", "Q4_0": "Q4_0", "Q4_1": "Q4_1", "Q5_0": "Q5_0",
                 "Q5_1": "Q5_1", "Q8_0": "Q8_0", "Q2_K": "Q2_K", "Q2_K_S": "Q2_K", "Q3_K_S": "Q3_K",
                 "Q3_K_M": "Q3_K", "Q3_K_L": "Q3_K", "Q4_K_S": "Q4_K", "Q4_K_M": "Q4_K", "Q5_K_S": "Q5_K",
                 "Q5_K_M": "Q5_K", "Q6_K": "Q6_K"}
FTYPES = tuple(_DEFAULT_TYPE)
_BLOCK = {"F32": 1, "F16": 1, "BF16": 1, "Q4_0": 32, "Q4_1": 32, "Q5_0": 32, "Q5_1": 32, "Q8_0": 32,
          "Q2_K": 256, "Q3_K": 256, "Q4_K": 256, "Q5_K": 256, "Q6_K": 256}
_NOT_QUANTIZED = ("F32", "F16", "BF16")  # ggml_is_quantized() is false for these
_K_FALLBACK = {"Q2_K": "Q4_0", "Q3_K": "Q4_0", "Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q6_K": "Q8_0"}
_LAYER = re.compile(r"blk\.\s*([+-]?\d+)")  # what sscanf(name, "blk.%d.", &il) reads


@dataclass(frozen=True)
class ModelParams:
    """The model hyper-parameters llama_tensor_get_type looks at."""
    n_layer: int
    n_expert: int = 0
    n_head: int = 0
    n_head_kv: int = 0
    arch: str = "llama"  # general.architecture; "falcon" and "glm5-next" have special cases
    model_type: str | None = None  # llama.cpp's size label; "70B" bumps attn_v

    @property
    def n_gqa(self) -> int:
        """llama_hparams::n_gqa: n_head / n_head_kv (0 without kv heads)."""
        return self.n_head // self.n_head_kv if self.n_head_kv else 0


def default_type(ftype: str) -> str:
    """llama_ftype_get_default_type."""
    try:
        return _DEFAULT_TYPE[ftype.upper()]
    except KeyError:
        raise ValueError(f"unsupported file type {ftype!r}; supported: {', '.join(FTYPES)}") from None


def tensor_category(name: str) -> str:
    """tensor_get_category: output, token_embd, attn_qkv, attn_kv_b, attn_v, attn_k, attn_q, attn_output,
    ffn_up, ffn_gate, ffn_down or other (substring tests, in this order)."""
    if name == "output.weight":
        return "output"
    if name in ("token_embd.weight", "per_layer_token_embd.weight"):
        return "token_embd"
    for key, cat in (("attn_qkv.weight", "attn_qkv"), ("attn_kv_b.weight", "attn_kv_b"), ("attn_v.weight", "attn_v"),
                     ("attn_k.weight", "attn_k"), ("attn_q.weight", "attn_q"), ("attn_output.weight", "attn_output"),
                     ("ffn_up", "ffn_up"), ("ffn_gate", "ffn_gate"), ("ffn_down", "ffn_down")):
        if key in name:
            return cat
    return "other"


def _is_attn_v(cat: str) -> bool:  # category_is_attn_v
    return cat in ("attn_v", "attn_qkv", "attn_kv_b")


_KEEP_SUBSTRINGS = ("_norm.weight", "ffn_gate_inp.weight", "ffn_gate_tid2eid.weight", "altup", "laurel",
                    "per_layer_model_proj", "ssm_conv1d", "shortconv.conv.weight", "indexer.k_proj.weight",
                    "indexer.q_proj.weight", "time_mix_first.weight", "time_mix_w0.weight", "time_mix_w1.weight",
                    "time_mix_w2.weight", "time_mix_v0.weight", "time_mix_v1.weight", "time_mix_v2.weight",
                    "time_mix_a0.weight", "time_mix_a1.weight", "time_mix_a2.weight", "time_mix_g1.weight",
                    "time_mix_g2.weight", "time_mix_decay_w1.weight", "time_mix_decay_w2.weight",
                    "time_mix_lerp_fused.weight", "attn_rel_b.weight", ".position_embd", "sam.pos_embd", "sam.neck.",
                    "sam.net_", ".rel_pos", ".patch_embd", ".patch_merger", "a.rvq.codebook", "mm.a.code_embd")
_KEEP_GLM5_NEXT = ("hc_", "indexer.attn_q_b", "indexer.attn_k", "indexer.proj", "indexer_compressor_gate",
                   "indexer_compressor_ape", "ssm_f_a.weight", "ssm_f_b.weight", "ssm_g_a.weight", "ssm_g_b.weight",
                   "ssm_beta.weight", "attn_kv_a_mqa.weight", "attn_k_b.weight", "attn_v_b.weight")


def tensor_allows_quantization(name: str, shape: Sequence[int], arch: str = "llama",
                               quantize_output_tensor: bool = True) -> bool:
    """tensor_allows_quantization: only 2-D/3-D ``*weight`` tensors that are not norms, routers, tiny tables..."""
    if _n_dims(shape) < 2:  # quantize only 2-D and 3-D (expert) tensors
        return False
    if not name.endswith("weight"):
        return False
    if not quantize_output_tensor and name == "output.weight":
        return False
    if any(s in name for s in _KEEP_SUBSTRINGS) or name in ("position_embd.weight", "token_types.weight"):
        return False
    if arch == "glm5-next" and any(s in name for s in _KEEP_GLM5_NEXT):
        return False
    return True


def _n_dims(shape: Sequence[int]) -> int:
    """ggml_n_dims: trailing size-1 GGUF dims (leading ones in torch order) do not count."""
    dims = list(shape)
    while len(dims) > 1 and dims[0] == 1:
        dims.pop(0)
    return len(dims)


def _fallback(ncols: int, qtype: str) -> str:
    """tensor_type_fallback: a type whose block size divides the row length."""
    if ncols % _BLOCK[qtype] == 0:
        return qtype
    if qtype in _K_FALLBACK:
        out = _K_FALLBACK[qtype]
    elif _BLOCK[qtype] <= 32:
        out = qtype
    else:
        raise ValueError(f"no tensor type fallback is defined for type {qtype}")
    return out if ncols % _BLOCK[out] == 0 else "F16"


def _use_more_bits(i_layer: int, n_layers: int) -> bool:
    return i_layer < n_layers // 8 or i_layer >= 7 * n_layers // 8 or (i_layer - n_layers // 8) % 3 == 2


@dataclass
class _State:
    """quantize_state_impl's counters."""
    n_attention_wv: int
    n_layer: int
    has_imatrix: bool
    tied_embeddings: bool
    i_attention_wv: int = 0
    i_ffn_down: int = 0
    i_ffn_gate: int = 0
    i_ffn_up: int = 0


def _layer_info(i_layer: int, n_layer: int, name: str, n_expert: int) -> tuple[int, int]:
    if max(1, n_expert) > 1:  # expert FFNs are not consecutive: read the layer from the name
        m = _LAYER.match(name)
        if m is None:
            raise ValueError(f"Failed to determine layer for tensor {name}")
        i_layer = int(m.group(1))
        if not 0 <= i_layer < n_layer:
            raise ValueError(f"Bad layer {i_layer} for tensor {name}. Must be in [0, {n_layer})")
    return i_layer, n_layer


def _get_type_impl(st: _State, mp: ModelParams, new: str, name: str, shape, ftype: str, cat: str,
                   output_tensor_type: str | None) -> str:
    """llama_tensor_get_type_impl for the supported file types (the IQ and MXFP4 branches never fire)."""
    arch = mp.arch
    if arch == "glm5-next" and any(s in name for s in ("attn_q_a", "attn_q_b", "nextn.eh_proj")):
        if new not in ("F32", "BF16", "F16"):
            return "Q8_0"
    if cat == "output" or (st.tied_embeddings and cat == "token_embd"):
        if output_tensor_type is not None:
            return output_tensor_type
        if arch == "falcon" or shape[-1] % _BLOCK[new] != 0:
            return "Q8_0"
        return "Q6_K" if new != "Q8_0" else new
    if cat == "token_embd":
        return new  # only the IQ/TQ file types change token_embd
    if _is_attn_v(cat):  # attn_v, attn_qkv, attn_kv_b: the attn_qkv branch further down is never reached
        if ftype == "Q2_K":
            new = "Q4_K" if mp.n_gqa >= 4 else "Q3_K"
        elif ftype == "Q2_K_S" and mp.n_gqa >= 4:
            new = "Q4_K"
        elif ftype == "Q3_K_M":
            new = "Q5_K" if st.i_attention_wv < 2 else "Q4_K"
        elif ftype == "Q3_K_L":
            new = "Q5_K"
        elif ftype in ("Q4_K_M", "Q5_K_M") and _use_more_bits(st.i_attention_wv, st.n_attention_wv):
            new = "Q6_K"
        elif ftype == "Q4_K_S" and st.i_attention_wv < 4:
            new = "Q5_K"
        if mp.model_type == "70B" and new in ("Q3_K", "Q4_K"):  # 8 heads share attn_v: cheap to give it bits
            new = "Q5_K"
        if mp.n_expert == 8:
            new = "Q8_0"
        st.i_attention_wv += 1
    elif cat == "attn_k":
        if mp.n_expert == 8:
            new = "Q8_0"
    elif cat == "ffn_down":
        i_layer, n_layer = _layer_info(st.i_ffn_down, st.n_layer, name, mp.n_expert)
        falcon = arch == "falcon"
        if ftype == "Q2_K":
            new = "Q3_K"
        elif ftype == "Q2_K_S":
            if i_layer < n_layer // 8:
                new = "Q4_K"
        elif ftype == "Q3_K_M":
            new = ("Q5_K" if i_layer < n_layer // 16 else
                   "Q4_K" if not falcon or _use_more_bits(i_layer, n_layer) else "Q3_K")
        elif ftype == "Q3_K_L":
            new = "Q4_K" if falcon else "Q5_K"
        elif ftype == "Q4_K_M":
            if falcon:
                new = ("Q6_K" if i_layer < n_layer // 16 else
                       "Q5_K" if _use_more_bits(i_layer, n_layer) else "Q4_K")
            elif _use_more_bits(i_layer, n_layer):
                new = "Q6_K"
        elif ftype == "Q5_K_M" and _use_more_bits(i_layer, n_layer):
            new = "Q6_K"
        elif ftype == "Q4_K_S" and not falcon and i_layer < n_layer // 8:
            new = "Q5_K"
        elif ftype in ("Q4_0", "Q5_0") and st.has_imatrix and i_layer < n_layer // 8:
            new = "Q4_1" if ftype == "Q4_0" else "Q5_1"  # guards the first ffn_down layers
        st.i_ffn_down += 1
    elif cat == "attn_output":
        if arch != "falcon":
            if mp.n_expert == 8:
                if ftype in ("Q2_K", "Q3_K_S", "Q3_K_M", "Q4_K_S", "Q4_K_M"):
                    new = "Q5_K"
            elif ftype == "Q2_K":
                new = "Q3_K"
            elif ftype == "Q3_K_M":
                new = "Q4_K"
            elif ftype == "Q3_K_L":
                new = "Q5_K"
        elif ftype == "Q3_K_L":
            new = "Q4_K"
    elif cat == "ffn_gate":
        _layer_info(st.i_ffn_gate, st.n_layer, name, mp.n_expert)
        st.i_ffn_gate += 1
    elif cat == "ffn_up":
        _layer_info(st.i_ffn_up, st.n_layer, name, mp.n_expert)
        st.i_ffn_up += 1
    return new


def _get_type(st: _State, mp: ModelParams, name: str, shape, ftype: str, *, src_type: str, pure: bool,
              overrides, output_tensor_type, token_embedding_type, quantize_output_tensor: bool) -> str:
    """llama_tensor_get_type."""
    if not tensor_allows_quantization(name, shape, mp.arch, quantize_output_tensor):
        return src_type
    cat = tensor_category(name)
    if token_embedding_type is not None and cat == "token_embd":
        named = name == "per_layer_token_embd.weight" and any(re.search(p, name) for p, _ in overrides)
        if not named:
            return token_embedding_type
    if output_tensor_type is not None and cat == "output":
        return output_tensor_type
    new = default_type(ftype)
    if new in _NOT_QUANTIZED:
        return new
    manual = False
    for pattern, qtype in overrides:
        if re.search(pattern, name):
            new, manual = qtype.upper(), True
            break
    if not manual and not pure:
        new = _get_type_impl(st, mp, new, name, shape, ftype, cat, output_tensor_type)
    return _fallback(int(shape[-1]), new)


def _order_key(name: str):
    """llama_model_loader's weight_name_comparer: by layer (non-layer tensors first), then by name."""
    m = _LAYER.match(name)
    return (int(m.group(1)) if m else -1, name)


def tensor_types(tensors: Mapping[str, Sequence[int]], ftype: str, params: ModelParams, *, has_imatrix: bool = False,
                 src_types: Mapping[str, str] | None = None, pure: bool = False,
                 overrides: Sequence[tuple[str, str]] = (), output_tensor_type: str | None = None,
                 token_embedding_type: str | None = None, quantize_output_tensor: bool = True) -> dict[str, str]:
    """GGUF type of every tensor of a model, {name: shape} -> {name: type}, with llama.cpp's counters.

    ``src_types`` gives the types tensors keep when they are not quantized (default F32); ``overrides`` are
    ``--tensor-type`` (regex, type) pairs; the other options mirror llama-quantize's.
    """
    ftype = ftype.upper()
    default_type(ftype)
    names = sorted(tensors, key=_order_key)
    st = _State(n_attention_wv=sum(_is_attn_v(tensor_category(n)) for n in names), n_layer=params.n_layer,
                has_imatrix=has_imatrix, tied_embeddings="output.weight" not in tensors)
    src_types = src_types or {}
    return {n: _get_type(st, params, n, tuple(tensors[n]), ftype, src_type=src_types.get(n, "F32"), pure=pure,
                         overrides=overrides, output_tensor_type=output_tensor_type,
                         token_embedding_type=token_embedding_type, quantize_output_tensor=quantize_output_tensor)
            for n in names}


def tensor_type(name: str, shape: Sequence[int], ftype: str, n_layer: int, *, n_expert: int = 0, n_head: int = 0,
                n_head_kv: int = 0, arch: str = "llama", model_type: str | None = None, has_imatrix: bool = False,
                tied_embeddings: bool = False, i_attention_wv: int | None = None,
                n_attention_wv: int | None = None, i_ffn_down: int | None = None, src_type: str = "F32",
                pure: bool = False, overrides: Sequence[tuple[str, str]] = (), output_tensor_type: str | None = None,
                token_embedding_type: str | None = None, quantize_output_tensor: bool = True) -> str:
    """GGUF type of one tensor. Counters default to the layer in the name (i_attention_wv, i_ffn_down) and
    n_layer (n_attention_wv); ``tied_embeddings`` means the model has no output.weight."""
    mp = ModelParams(n_layer=n_layer, n_expert=n_expert, n_head=n_head, n_head_kv=n_head_kv, arch=arch,
                     model_type=model_type)
    m = _LAYER.match(name)
    layer = int(m.group(1)) if m else 0
    st = _State(n_attention_wv=n_layer if n_attention_wv is None else n_attention_wv, n_layer=n_layer,
                has_imatrix=has_imatrix, tied_embeddings=tied_embeddings,
                i_attention_wv=layer if i_attention_wv is None else i_attention_wv,
                i_ffn_down=layer if i_ffn_down is None else i_ffn_down, i_ffn_gate=layer, i_ffn_up=layer)
    return _get_type(st, mp, name, tuple(shape), ftype.upper(), src_type=src_type, pure=pure, overrides=overrides,
                     output_tensor_type=output_tensor_type, token_embedding_type=token_embedding_type,
                     quantize_output_tensor=quantize_output_tensor)
