"""Per-architecture GGUF conventions: llama.cpp's names (gguf-py's tensor maps), the layout changes of its
convert_hf_to_gguf.py classes and their inverses, the metadata keys, plus the per-tensor type plan of a
llama-quantize file type.

One place for what export (writing, reading back) and methods (QAT that targets a GGUF file type) both need;
one `Family` per model_type in the modules beside this one.
"""
from __future__ import annotations

import torch
from torch import nn

from lowbit.errors import UnsupportedModelError
from lowbit.format.ggml_quants.filetypes import ModelParams, tensor_types
from lowbit.models.gguf_arch.base import Family, n_experts, permute_qk, unpermute_qk
from lowbit.models.gguf_arch.deepseek import DeepseekV3
from lowbit.models.gguf_arch.gemma import Gemma2, Gemma3, Gemma3Vision, Gemma4, Gemma4Vision
from lowbit.models.gguf_arch.llama import Granite, Llama, Llama4, Mixtral
from lowbit.models.gguf_arch.other import GPT2, GPTNeoX, GptOss, Olmo2, Phi3
from lowbit.models.gguf_arch.qwen import Qwen2, Qwen3, Qwen3Moe
from lowbit.models.gguf_arch.qwen35 import Qwen35, Qwen35Moe, Qwen35Vision

__all__ = ["FAMILIES", "GEMMAS", "GGUF_ARCHS", "Family", "add_arch_metadata", "family", "gguf_layout",
           "gguf_tensors", "hf_tensors", "permute_qk", "tensor_type_plan", "unpermute_qk"]

# model_type -> its conventions (gemma3 is the image-text checkpoint; its text model is gemma3_text)
FAMILIES: dict[str, Family] = {
    "llama": Llama(), "mistral": Llama(), "mixtral": Mixtral(), "granite": Granite(), "gemma2": Gemma2(),
    "gemma3_text": Gemma3(), "gemma3": Gemma3Vision(), "qwen2": Qwen2(), "qwen3": Qwen3(), "qwen3_moe": Qwen3Moe(),
    "phi3": Phi3(), "olmo2": Olmo2(), "gpt_neox": GPTNeoX(), "gpt2": GPT2(), "gpt_oss": GptOss(),
    "llama4_text": Llama4(), "deepseek_v3": DeepseekV3(), "gemma4_text": Gemma4(), "gemma4": Gemma4Vision(),
    "qwen3_5_text": Qwen35(), "qwen3_5_moe_text": Qwen35Moe(), "qwen3_5": Qwen35Vision(),
}
# model_type -> gguf MODEL_ARCH
GGUF_ARCHS = {mt: f.arch_key for mt, f in FAMILIES.items()}
GEMMAS = ("GEMMA2", "GEMMA3")


def family(model_or_config) -> Family:
    """The model's GGUF conventions, or one clear UnsupportedModelError naming it and the exports that work."""
    cfg = getattr(model_or_config, "config", model_or_config)
    mt = cfg.model_type
    if mt in FAMILIES:
        fam = FAMILIES[mt]
        fam.check(fam.text_config(cfg))
        return fam
    raise UnsupportedModelError(f"GGUF export supports {', '.join(sorted(FAMILIES))} models, not {mt!r}; "
                                "export --format merged or bnb4 instead")


def _tied(model: nn.Module) -> bool:
    out, inp = model.get_output_embeddings(), model.get_input_embeddings()
    return out is not None and inp is not None and out.weight.data_ptr() == inp.weight.data_ptr()


def _map_name(fam: Family, name: str) -> str:
    if fam.text_prefix and name.startswith(fam.text_prefix):
        return "model." + name.removeprefix(fam.text_prefix)
    return name


def gguf_layout(model: nn.Module) -> list[tuple[str, list[tuple[str, torch.Tensor]]]]:
    """[(HF state-dict name, [(gguf name, fp32 tensor in llama.cpp's layout), ...])]: one HF tensor may become
    several GGUF tensors (fused experts split into gate / up)."""
    import gguf
    fam = family(model)
    cfg = fam.text_config(model.config)
    name_map = gguf.get_tensor_name_map(getattr(gguf.MODEL_ARCH, fam.arch_key), cfg.num_hidden_layers)
    tied = _tied(model)
    out = []
    for hf_name, t in model.state_dict().items():
        if (tied and hf_name == "lm_head.weight") or hf_name.startswith(fam.skip_prefixes):
            continue
        pieces = []
        for piece_name, piece in fam.split(_map_name(fam, hf_name), t.detach().float(), cfg):
            new = fam.gguf_name(name_map, piece_name)
            if new is None:
                raise UnsupportedModelError(f"no GGUF name for tensor {hf_name}; this layout is not a standard "
                                            f"{model.config.model_type} checkpoint")
            pieces.append((new, piece))
        out.append((hf_name, pieces))
    return out


def gguf_tensors(model: nn.Module, arch_key: str | None = None):
    """Yield (gguf name, fp32 tensor) in llama.cpp's layout (`arch_key`, when given, must be the model's)."""
    fam = family(model)
    if arch_key is not None and arch_key != fam.arch_key:
        raise UnsupportedModelError(f"{model.config.model_type} models export as GGUF {fam.arch_key}, not {arch_key}")
    for _, pieces in gguf_layout(model):
        yield from pieces
    yield from fam.extra_tensors(fam.text_config(model.config))


def hf_tensors(model: nn.Module, stored: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The inverse: {gguf name: tensor (any shape holding the right elements)} → {HF state-dict name: tensor},
    undoing permutes, norm offsets, regroupings and expert splits."""
    fam = family(model)
    cfg = fam.text_config(model.config)
    out = {}
    for hf_name, pieces in gguf_layout(model):
        missing = [g for g, _ in pieces if g not in stored]
        if missing:
            raise UnsupportedModelError(f"GGUF file lacks {', '.join(missing)} (for {hf_name})")
        parts = [stored[g].reshape(p.shape).float() for g, p in pieces]
        out[hf_name] = fam.join(_map_name(fam, hf_name), parts, cfg)
    return out


def add_arch_metadata(w, model: nn.Module) -> None:
    """The hyper-parameter keys llama.cpp reads for this architecture."""
    fam = family(model)
    fam.metadata(w, fam.text_config(model.config))


def tensor_type_plan(items: list[tuple[str, torch.Tensor]], model, gguf_type: str, has_imatrix: bool) -> dict:
    """{gguf name: ggml type name} as llama-quantize would choose them for this file type."""
    import gguf
    fam = family(model)
    cfg = fam.text_config(model.config)
    params = ModelParams(n_layer=cfg.num_hidden_layers, n_expert=n_experts(cfg),
                         n_head=cfg.num_attention_heads, n_head_kv=getattr(cfg, "num_key_value_heads", 0) or 0,
                         arch=gguf.MODEL_ARCH_NAMES[getattr(gguf.MODEL_ARCH, fam.arch_key)])
    return tensor_types({n: tuple(t.shape) for n, t in items}, gguf_type, params, has_imatrix=has_imatrix)
