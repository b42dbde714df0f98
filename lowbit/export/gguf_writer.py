"""Export a dense HF causal LM (e.g. a merged checkpoint) to GGUF through the `gguf` package.

Follows llama.cpp's convert_hf_to_gguf.py; what differs per architecture (tensor names, q/k permutes,
norm offsets, fused qkv / expert layouts, metadata keys) lives in lowbit.models.gguf_arch. Here: the
file itself, the tokenizer, and per-tensor encoding (1-D tensors kept F32, 2-D tensors whose rows do not
split into the type's blocks fall back as llama-quantize does).
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
from lowbit.format import ggml_quants
from lowbit.kernels.ggml import quantize_ggml
from lowbit.models.gguf_arch import GEMMAS, add_arch_metadata, family, gguf_tensors, tensor_type_plan
from lowbit.utils.io import atomic_path

# file types (llama-quantize's names); each tensor's type follows llama.cpp's rules (ggml_quants.filetypes)
GGUF_TYPES = ("F16", "BF16", "Q8_0", "Q4_0", "Q4_K_M", "Q4_K_S", "Q5_K_M", "Q6_K", "F32")
# token types (llama.cpp's llama_token_type)
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, BYTE = 1, 2, 3, 4, 6


def _check_type(name: str) -> str:
    if name not in GGUF_TYPES:
        raise ConfigError(f"--gguf-type {name!r} unknown; choose one of {', '.join(GGUF_TYPES)}")
    return name


def _file_type(name: str):
    import gguf
    return gguf.LlamaFileType.ALL_F32 if name == "F32" else getattr(gguf.LlamaFileType, f"MOSTLY_{name}")


def encode_tensor(t: torch.Tensor, qtype: str, quant_weights: torch.Tensor | None = None) -> np.ndarray:
    """The tensor's data in ggml type `qtype`: our byte-identical quantizers; gguf-py's for the types we lack."""
    import gguf
    data = t.detach().float()
    if qtype == "F32":
        return data.numpy()
    if qtype == "F16":
        return data.numpy().astype(np.float16)
    if qtype == "BF16":
        return gguf.quants.quantize(data.numpy(), gguf.GGMLQuantizationType.BF16)
    if qtype in ggml_quants.SUPPORTED_TYPES:
        return quantize_ggml(data.reshape(-1, data.shape[-1]), qtype, quant_weights).numpy()  # C++ when built
    return gguf.quants.quantize(data.numpy(), getattr(gguf.GGMLQuantizationType, qtype))


def _tokenizer_json(tok) -> dict:
    return json.loads(tok.backend_tokenizer.to_str())


def _add_tokenizer(w, tok, arch_key: str, vocab_size: int) -> None:
    tj = _tokenizer_json(tok)
    model = tj["model"]
    vocab = model["vocab"]
    if model["type"] != "BPE":
        raise UnsupportedModelError(f"tokenizer model {model['type']!r} is not supported for GGUF export (BPE only); "
                                    "export --format merged or bnb4 instead")
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
        elif (arch_key in GEMMAS or arch_key == "GEMMA4") and len(t) == 6 and t.startswith("<0x") and t.endswith(">"):
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
    elif arch_key == "GEMMA4":  # Gemma 4's SentencePiece-style BPE: llama.cpp's own "gemma4" vocab (merges required)
        if not merges:
            raise UnsupportedModelError("a Gemma 4 tokenizer without BPE merges cannot be written to GGUF; export "
                                        "--format merged or bnb4 instead")
        w.add_tokenizer_model("gemma4")
        w.add_token_list(tokens)
        w.add_token_scores([-float(i) for i in range(len(tokens))])
        w.add_token_types(types)
        w.add_token_merges(merges)
        w.add_add_space_prefix(False)
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
            fn(_in_vocab(int(v), key, vocab_size))
    eot = _end_of_turn_id(tok)
    if eot is not None:  # llama.cpp stops a chat turn at EOT (Gemma's <end_of_turn>, ChatML's <|im_end|>)
        w.add_eot_token_id(_in_vocab(eot, "end-of-turn token", vocab_size))
    w.add_add_bos_token(bool(getattr(tok, "add_bos_token", True)))
    w.add_add_eos_token(bool(getattr(tok, "add_eos_token", False)))
    if getattr(tok, "chat_template", None):
        w.add_chat_template(tok.chat_template)


def _in_vocab(i: int, what: str, vocab_size: int) -> int:
    if not 0 <= i < vocab_size:  # the GGUF token list has one entry per embedding row
        raise UnsupportedModelError(f"tokenizer {what}={i} lies outside the model's {vocab_size} embedding rows; "
                                    "resize the embeddings (model.resize_token_embeddings) before GGUF export")
    return i


EOT_TOKENS = ("<end_of_turn>", "<|im_end|>", "<|eot_id|>", "<|end|>")


def _end_of_turn_id(tok) -> int | None:
    vocab = tok.get_vocab()
    return next((vocab[t] for t in EOT_TOKENS if t in vocab), None)


def _walk(node):
    if not node:
        return []
    out = [node]
    for child in node.get("pretokenizers", []) or []:
        out += _walk(child)
    return out


def export_gguf(model: nn.Module, tok, out, gguf_type: str = "F16", overwrite: bool = False, name: str | None = None,
                progress: bool = True, imatrix: dict[str, torch.Tensor] | None = None) -> dict:
    """Write `model` (dense HF causal LM of a family `lowbit.models.gguf_arch` knows) + tokenizer to one GGUF
    file, atomically."""
    import gguf
    from tqdm.auto import tqdm
    _check_type(gguf_type)
    fam = family(model)  # one clear line for families GGUF export does not cover
    arch_key = fam.arch_key
    arch_name = gguf.MODEL_ARCH_NAMES[getattr(gguf.MODEL_ARCH, arch_key)]
    out = Path(out)
    if out.suffix != ".gguf":
        raise ConfigError(f"GGUF output {out} must end in .gguf")
    counts: dict[str, int] = {}
    items = list(gguf_tensors(model))
    plan = tensor_type_plan(items, model, gguf_type, imatrix is not None)
    mt = model.config.model_type
    with atomic_path(out, overwrite) as tmp:
        w = gguf.GGUFWriter(str(tmp), arch_name)
        w.add_name(name or (model.config.name_or_path and Path(model.config.name_or_path).name) or mt)
        add_arch_metadata(w, model)
        w.add_file_type(_file_type(gguf_type))
        _add_tokenizer(w, tok, arch_key, fam.text_config(model.config).vocab_size)
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)
        for gname, t in tqdm(items, desc=f"GGUF {gguf_type}", unit="tensor", disable=not progress):
            tt = plan[gname]
            qw = None if imatrix is None else imatrix.get(gname)
            data = encode_tensor(t, tt, qw)
            if tt in ("F32", "F16"):
                w.add_tensor(gname, data)
            else:  # raw bytes; the writer turns the byte shape back into the element shape
                w.add_tensor(gname, data.reshape(*t.shape[:-1], -1), raw_dtype=getattr(gguf.GGMLQuantizationType, tt))
            counts[tt] = counts.get(tt, 0) + 1
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file(progress=False)
        w.close()
    return {"path": str(out), "gguf_type": gguf_type, "architecture": arch_name, "tensor_types": counts,
            "imatrix": imatrix is not None, "bytes": out.stat().st_size}


def gguf_tolerance(gguf_type: str) -> float:
    """Relative weight error budget of each type (|Δw| / max|w| per block), used to scale logit checks."""
    return {"F32": 1e-6, "F16": 2 ** -11, "BF16": 2 ** -8, "Q8_0": 1 / 127, "Q6_K": 1 / 32, "Q5_K_M": 1 / 16,
            "Q4_K_M": 1 / 8, "Q4_K_S": 1 / 8, "Q4_0": 1 / 8}[gguf_type]
