"""Export a dense HF Llama / Gemma3 model (e.g. a merged checkpoint) to GGUF through the `gguf` package.

Follows llama.cpp's convert_hf_to_gguf.py: tensor names from `gguf.TensorNameMap`, Llama's
q/k rows permuted into llama.cpp's rotary layout, Gemma3 RMSNorm weights stored as w+1 (llama.cpp
multiplies by the stored weight; transformers' GGUF loader subtracts the 1 again), 1-D tensors
kept F32, and 2-D tensors whose rows do not split into the type's blocks fall back to F16.
Tokenizers: byte-level BPE → `tokenizer.ggml.model = "gpt2"`; Gemma's SentencePiece-style
vocabulary → `"llama"` with scores and token types.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from torch import nn

from lowbit.errors import ConfigError, UnsupportedModelError
from lowbit.utils.io import atomic_path

GGUF_TYPES = ("F16", "BF16", "Q8_0", "Q4_0", "F32")
_ARCHS = {"llama": "LLAMA", "mistral": "LLAMA", "gemma3_text": "GEMMA3"}
# token types (llama.cpp's llama_token_type)
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, BYTE = 1, 2, 3, 4, 6


def _qtype(name: str):
    import gguf
    if name not in GGUF_TYPES:
        raise ConfigError(f"--gguf-type {name!r} unknown; choose one of {', '.join(GGUF_TYPES[:4])}")
    return {"F16": gguf.GGMLQuantizationType.F16, "BF16": gguf.GGMLQuantizationType.BF16,
            "Q8_0": gguf.GGMLQuantizationType.Q8_0, "Q4_0": gguf.GGMLQuantizationType.Q4_0,
            "F32": gguf.GGMLQuantizationType.F32}[name]


def _file_type(name: str):
    import gguf
    return {"F16": gguf.LlamaFileType.MOSTLY_F16, "BF16": gguf.LlamaFileType.MOSTLY_BF16,
            "Q8_0": gguf.LlamaFileType.MOSTLY_Q8_0, "Q4_0": gguf.LlamaFileType.MOSTLY_Q4_0,
            "F32": gguf.LlamaFileType.ALL_F32}[name]


def permute_qk(w: torch.Tensor, n_head: int, n_head_kv: int | None = None) -> torch.Tensor:
    """llama.cpp's LlamaModel.permute: HF's half-split rotary rows → interleaved pairs."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _gguf_tensors(model: nn.Module, arch_key: str):
    """Yield (gguf name, fp32 tensor) in llama.cpp's layout."""
    import gguf
    cfg = model.config
    arch = getattr(gguf.MODEL_ARCH, arch_key)
    name_map = gguf.get_tensor_name_map(arch, cfg.num_hidden_layers)
    tied = getattr(cfg, "tie_word_embeddings", False)
    for hf_name, t in model.state_dict().items():
        if tied and hf_name == "lm_head.weight":
            continue
        base, _, suffix = hf_name.rpartition(".")
        new = name_map.get_name(base)
        if new is None:
            raise UnsupportedModelError(f"no GGUF name for tensor {hf_name}; this layout is not a standard "
                                        f"{cfg.model_type} checkpoint")
        t = t.detach().float()
        if arch_key == "LLAMA":
            if hf_name.endswith("q_proj.weight"):
                t = permute_qk(t, cfg.num_attention_heads, cfg.num_attention_heads)
            elif hf_name.endswith("k_proj.weight"):
                t = permute_qk(t, cfg.num_attention_heads, cfg.num_key_value_heads)
        elif arch_key == "GEMMA3" and hf_name.endswith("norm.weight"):
            t = t + 1  # Gemma's RMSNorm computes x·(1+w); llama.cpp stores (1+w)
        yield f"{new}.{suffix}", t


def _tensor_type(name: str, t: torch.Tensor, qtype):
    import gguf
    if t.dim() == 1 or name.endswith("_norm.weight"):
        return gguf.GGMLQuantizationType.F32
    if qtype in (gguf.GGMLQuantizationType.Q8_0, gguf.GGMLQuantizationType.Q4_0):
        block, _ = gguf.GGML_QUANT_SIZES[qtype]
        if t.shape[-1] % block:
            return gguf.GGMLQuantizationType.F16  # llama.cpp's fallback for rows that do not split into blocks
    return qtype


def _add_arch_metadata(w, model, arch_key: str, name: str, gguf_type: str) -> None:
    cfg = model.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    w.add_name(name)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_file_type(_file_type(gguf_type))
    rope = getattr(cfg, "rope_parameters", None) or {}
    if arch_key == "LLAMA":
        theta = rope.get("rope_theta", getattr(cfg, "rope_theta", 10000.0))
        w.add_rope_freq_base(float(theta))
        w.add_rope_dimension_count(head_dim)
        w.add_vocab_size(cfg.vocab_size)
    else:  # GEMMA3: as llama.cpp's Gemma3Model.set_gguf_parameters
        full = rope.get("full_attention", rope)
        w.add_rope_freq_base(float(full.get("rope_theta", 1_000_000.0)))
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
        w.add_sliding_window(cfg.sliding_window)
        w.add_vocab_size(cfg.vocab_size)
        if getattr(cfg, "final_logit_softcapping", None):
            w.add_final_logit_softcapping(cfg.final_logit_softcapping)
        if getattr(cfg, "query_pre_attn_scalar", head_dim) != head_dim:
            # llama.cpp derives the attention scale from key_length; a different scalar would be lost
            raise UnsupportedModelError(f"query_pre_attn_scalar={cfg.query_pre_attn_scalar} != head_dim={head_dim}: "
                                        "GGUF cannot express it (llama.cpp and transformers assume head_dim)")


def _tokenizer_json(tok) -> dict:
    return json.loads(tok.backend_tokenizer.to_str())


def _add_tokenizer(w, tok, arch_key: str, vocab_size: int) -> None:
    tj = _tokenizer_json(tok)
    model = tj["model"]
    vocab = model["vocab"]
    if model["type"] != "BPE":
        raise UnsupportedModelError(f"tokenizer model {model['type']!r} is not supported for GGUF export (BPE only)")
    added = {a["id"]: a for a in tj.get("added_tokens", [])}
    tokens = [None] * vocab_size
    for tok_str, i in vocab.items():
        if i < vocab_size:
            tokens[i] = tok_str
    for i, a in added.items():
        if i < vocab_size:
            tokens[i] = a["content"]
    for i, t in enumerate(tokens):
        if t is None:  # padded embedding rows: llama.cpp names them [PAD<id>]
            tokens[i] = f"[PAD{i}]"
    types = []
    for i, t in enumerate(tokens):
        if i in added:
            types.append(CONTROL if added[i].get("special") else USER_DEFINED)
        elif t.startswith("[PAD") and t.endswith("]") and t not in vocab:
            types.append(USER_DEFINED)
        elif arch_key == "GEMMA3" and len(t) == 6 and t.startswith("<0x") and t.endswith(">"):
            types.append(BYTE)
        else:
            types.append(NORMAL)
    byte_level = any(p.get("type") == "ByteLevel" for p in _walk(tj.get("pre_tokenizer")))
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    if byte_level:
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre("default")
        w.add_token_list(tokens)
        w.add_token_types(types)
        w.add_token_merges(merges)
    else:  # SentencePiece-style BPE (Gemma): llama.cpp's "llama" vocab; scores rank tokens by id
        w.add_tokenizer_model("llama")
        w.add_tokenizer_pre("default")
        w.add_token_list(tokens)
        w.add_token_scores([-float(i) for i in range(len(tokens))])
        w.add_token_types(types)
        if merges:
            w.add_token_merges(merges)
        w.add_add_space_prefix(False)
    for key, fn in (("bos_token_id", w.add_bos_token_id), ("eos_token_id", w.add_eos_token_id),
                    ("unk_token_id", w.add_unk_token_id), ("pad_token_id", w.add_pad_token_id)):
        v = getattr(tok, key, None)
        if v is not None:
            fn(int(v))
    w.add_add_bos_token(bool(getattr(tok, "add_bos_token", True)))
    w.add_add_eos_token(bool(getattr(tok, "add_eos_token", False)))
    if getattr(tok, "chat_template", None):
        w.add_chat_template(tok.chat_template)


def _walk(node):
    if not node:
        return []
    out = [node]
    for child in node.get("pretokenizers", []) or []:
        out += _walk(child)
    return out


def export_gguf(model: nn.Module, tok, out, gguf_type: str = "F16", overwrite: bool = False, name: str | None = None,
                progress: bool = True) -> dict:
    """Write `model` (dense HF Llama/Mistral/Gemma3 causal LM) + tokenizer to one GGUF file, atomically."""
    import gguf
    from tqdm.auto import tqdm
    qtype = _qtype(gguf_type)
    mt = model.config.model_type
    if mt not in _ARCHS:
        raise UnsupportedModelError(f"GGUF export supports {', '.join(_ARCHS)} models, not {mt!r}; export "
                                    "--format merged or bnb4 instead")
    arch_key = _ARCHS[mt]
    arch_name = gguf.MODEL_ARCH_NAMES[getattr(gguf.MODEL_ARCH, arch_key)]
    out = Path(out)
    if out.suffix != ".gguf":
        raise ConfigError(f"GGUF output {out} must end in .gguf")
    counts: dict[str, int] = {}
    with atomic_path(out, overwrite) as tmp:
        w = gguf.GGUFWriter(str(tmp), arch_name)
        _add_arch_metadata(w, model, arch_key, name or (model.config.name_or_path and Path(
            model.config.name_or_path).name) or mt, gguf_type)
        _add_tokenizer(w, tok, arch_key, model.config.vocab_size)
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)
        items = list(_gguf_tensors(model, arch_key))
        for gname, t in tqdm(items, desc=f"GGUF {gguf_type}", unit="tensor", disable=not progress):
            tt = _tensor_type(gname, t, qtype)
            data = t.numpy().astype(np.float32)
            if tt == gguf.GGMLQuantizationType.F32:
                w.add_tensor(gname, data)
            elif tt == gguf.GGMLQuantizationType.F16:
                w.add_tensor(gname, data.astype(np.float16))
            else:
                q = gguf.quants.quantize(data, tt)
                # quantize returns bytes; the writer turns the byte shape back into the element shape
                w.add_tensor(gname, q, raw_dtype=tt)
            counts[tt.name] = counts.get(tt.name, 0) + 1
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file(progress=False)
        w.close()
    return {"path": str(out), "gguf_type": gguf_type, "architecture": arch_name, "tensor_types": counts,
            "bytes": out.stat().st_size}


def gguf_tolerance(gguf_type: str) -> float:
    """Relative weight error budget of each type (|Δw| / max|w| per block), used to scale logit checks."""
    return {"F32": 1e-6, "F16": 2 ** -11, "BF16": 2 ** -8, "Q8_0": 1 / 127, "Q4_0": 1 / 8}[gguf_type]
