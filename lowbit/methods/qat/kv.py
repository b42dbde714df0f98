"""Post-RoPE key/value fake quant: the keys and values attention reads (what a serving engine
caches), for any transformers model whose attention calls `ALL_ATTENTION_FUNCTIONS` — Llama,
Gemma3, Qwen2/3, Mistral. Pre-RoPE quantization is an output quantizer on k_proj/v_proj
(see `linear.py`), as in LLM-QAT."""
from __future__ import annotations

import sys

from torch import nn

from lowbit.errors import UnsupportedModelError

PREFIX = "lowbit_kvq_"


def _inner_function(module: nn.Module, inner: str):
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
    if inner == "eager":  # each model family has its own eager attention (Gemma: softcapping)
        return sys.modules[type(module).__module__].eager_attention_forward
    return ALL_ATTENTION_FUNCTIONS[inner]


def _register(inner: str) -> str:
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, AttentionInterface
    name = PREFIX + inner
    if name in ALL_ATTENTION_FUNCTIONS:
        return name

    def attention(module, query, key, value, attention_mask, **kwargs):
        rot = getattr(module, "lowbit_kv_rotation", None)
        if rot is not None:  # same R on queries and keys (q·k kept), R on values, Rᵀ on the output
            query, key, value = rot.rotate(query), rot.rotate(key), rot.rotate(value)
        kq = getattr(module, "lowbit_k_fq", None)
        if kq is not None:
            key, value = kq(key), module.lowbit_v_fq(value)
        out, *rest = _inner_function(module, inner)(module, query, key, value, attention_mask, **kwargs)
        return (rot.rotate(out, inverse=True) if rot is not None else out, *rest)

    AttentionInterface.register(name, attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(name, ALL_MASK_ATTENTION_FUNCTIONS[inner])
    return name


def attention_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(n, m) for n, m in model.named_modules()
            if hasattr(m, "k_proj") and hasattr(m, "v_proj") and hasattr(m, "config")]


def install(model: nn.Module, make_quantizer) -> int:
    """Attach key/value quantizers to every attention module and route attention through them."""
    mods = attention_modules(model)
    if not mods:
        raise UnsupportedModelError(f"{type(model).__name__} has no attention modules with k_proj/v_proj; post-RoPE "
                                    "KV quantization supports the Llama, Gemma3, Qwen and Mistral families "
                                    "(use kv_position: pre_rope for others)")
    for _, m in mods:
        m.lowbit_k_fq = make_quantizer()
        m.lowbit_v_fq = make_quantizer()
    configs = {id(m.config): m.config for _, m in mods}
    for c in configs.values():
        current = c._attn_implementation or "sdpa"
        if not current.startswith(PREFIX):
            c._attn_implementation = _register(current)
    return len(mods)


def uninstall(model: nn.Module) -> None:
    for _, m in attention_modules(model):
        for a in ("lowbit_k_fq", "lowbit_v_fq", "lowbit_kv_rotation"):
            if hasattr(m, a):
                delattr(m, a)
        if m.config._attn_implementation and m.config._attn_implementation.startswith(PREFIX):
            m.config._attn_implementation = m.config._attn_implementation[len(PREFIX):]
