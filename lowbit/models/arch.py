"""Which checkpoints the 4-bit loader takes, and the one-line reason when it does not.

Any decoder-only causal LM transformers builds with `AutoModelForCausalLM.from_config` loads:
its text decoder's Linear layers (and GPT-2-style Conv1D) and fused MoE experts go to 4-bit,
everything else stays in the compute dtype. Image-text checkpoints load when transformers'
AutoModelForCausalLM builds them (Gemma 3/4: the full model, vision tower frozen in 16-bit;
Qwen3.5: the text model only, as transformers does). Refused: encoder-only and seq2seq models,
image-text models with no causal-LM class, unknown experts modules, remote code not asked for.
"""
from __future__ import annotations

from torch import nn

from lowbit.errors import UnsupportedModelError
from lowbit.modules.moe4bit import Experts4bit, experts_layout
from lowbit.modules.structure import decoder_prefix, experts_modules, in_decoder
from lowbit.utils.modules import matches_module


def read_config(path, trust_remote_code: bool):
    from transformers import AutoConfig
    try:
        cfg = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    except ValueError as e:
        msg = str(e).strip().splitlines()[0]
        if "trust_remote_code" in str(e):
            raise UnsupportedModelError(f"{path} needs its own modeling code: pass trust_remote_code=True "
                                        "(model.trust_remote_code: true) if you trust it") from None
        raise UnsupportedModelError(f"transformers cannot read the config in {path}: {msg}") from None
    check_causal_lm(cfg, trust_remote_code)
    return cfg


def check_causal_lm(cfg, trust_remote_code: bool = False) -> None:
    """Refuse what is not a decoder-only causal LM, in one line naming the model type and why."""
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES,
        MODEL_FOR_MASKED_LM_MAPPING_NAMES,
    )
    mt = cfg.model_type
    if getattr(cfg, "is_encoder_decoder", False):
        raise UnsupportedModelError(f"{mt!r} is an encoder-decoder (seq2seq) model; lowbit fine-tunes decoder-only "
                                    "causal LMs")
    remote = trust_remote_code and "AutoModelForCausalLM" in (getattr(cfg, "auto_map", None) or {})
    if mt not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and not remote:
        if mt in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES:
            raise UnsupportedModelError(f"{mt!r} is an image-text model with no causal-LM class in transformers "
                                        "(AutoModelForCausalLM cannot build it); lowbit loads image-text checkpoints "
                                        "whose causal LM transformers builds (gemma3, gemma4, qwen3_5, ...)")
        raise UnsupportedModelError(f"{mt!r} is not a causal LM transformers can build (no AutoModelForCausalLM "
                                    "class); lowbit fine-tunes decoder-only causal LMs")
    if mt in MODEL_FOR_MASKED_LM_MAPPING_NAMES and not getattr(cfg, "is_decoder", False):
        raise UnsupportedModelError(f"{mt!r} is an encoder-only (masked LM) model; lowbit fine-tunes decoder-only "
                                    "causal LMs")


def check_layers(model: nn.Module, skip_modules=()) -> dict[str, dict]:
    """Experts modules of the decoder → their layout; refuse 3-D weights lowbit cannot quantize."""
    prefix = decoder_prefix(model)
    out = {}
    for name, mod in experts_modules(model).items():
        if not in_decoder(name, prefix) or matches_module(name, skip_modules) or isinstance(mod, Experts4bit):
            continue
        try:
            out[name] = experts_layout(mod)
        except ValueError as e:
            raise UnsupportedModelError(f"layer {name}: {e}") from None
    for name, mod in model.named_modules():
        if name in out or not in_decoder(name, prefix) or matches_module(name, skip_modules):
            continue
        if isinstance(mod, Experts4bit) or any(name.startswith(e + ".") for e in out):
            continue
        for k, p in mod.named_parameters(recurse=False):
            if p.dim() > 2 and not isinstance(mod, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
                raise UnsupportedModelError(f"layer {name}: parameter {k} of shape {tuple(p.shape)} is neither a "
                                            "Linear weight nor a transformers experts tensor; lowbit cannot quantize "
                                            "it (load with load_in_4bit=False, or skip it via skip_modules)")
    return out
