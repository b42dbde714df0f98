"""Per-architecture GGUF conventions: llama.cpp's names (gguf-py's tensor maps) and the layout changes of
its convert_hf_to_gguf.py classes, plus the per-tensor type plan of a llama-quantize file type.

One place for what export (writing, reading back) and methods (QAT that targets a GGUF file type) both need.
"""
from __future__ import annotations

import torch
from torch import nn

from lowbit.errors import UnsupportedModelError
from lowbit.format.ggml_quants.filetypes import ModelParams, tensor_types

# model_type -> gguf MODEL_ARCH (the conventions of each follow llama.cpp's convert_hf_to_gguf.py classes)
GGUF_ARCHS = {"llama": "LLAMA", "mistral": "LLAMA", "gemma2": "GEMMA2", "gemma3_text": "GEMMA3", "qwen2": "QWEN2",
               "qwen3": "QWEN3"}
GEMMAS = ("GEMMA2", "GEMMA3")


def tensor_type_plan(items: list[tuple[str, torch.Tensor]], model, gguf_type: str, has_imatrix: bool) -> dict:
    """{gguf name: ggml type name} as llama-quantize would choose them for this file type."""
    cfg = model.config
    params = ModelParams(n_layer=cfg.num_hidden_layers, n_expert=getattr(cfg, "num_local_experts", 0) or 0,
                         n_head=cfg.num_attention_heads, n_head_kv=getattr(cfg, "num_key_value_heads", 0) or 0)
    return tensor_types({n: tuple(t.shape) for n, t in items}, gguf_type, params, has_imatrix=has_imatrix)


def permute_qk(w: torch.Tensor, n_head: int, n_head_kv: int | None = None) -> torch.Tensor:
    """llama.cpp's LlamaModel.permute: HF's half-split rotary rows → interleaved pairs."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_tensors(model: nn.Module, arch_key: str):
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
        elif arch_key in GEMMAS and hf_name.endswith("norm.weight"):
            t = t + 1  # Gemma's RMSNorm computes x·(1+w); llama.cpp stores (1+w)
        yield f"{new}.{suffix}", t


