"""LoRA on the 4-bit base through peft: peft's LoRA layer wraps our `Linear4bit`.

peft would treat `Linear4bit` (an nn.Linear subclass) with its dense `lora.Linear`, whose
merge adds into `weight.data` — wrong for packed bytes. We register `LoraLinear4bit`,
which merges by dequantize → add → requantize, as peft does for bitsandbytes layers.
"""
from __future__ import annotations

import re

import torch
from torch import nn

from lowbit.errors import ConfigError
from lowbit.modules.linear4bit import Linear4bit
from lowbit.utils.modules import matches_module


def _lora_linear4bit_cls():
    from peft.tuners.lora.layer import Linear as LoraLinear

    class LoraLinear4bit(LoraLinear):
        """peft LoRA layer over a lowbit `Linear4bit` base."""

        def merge(self, safe_merge: bool = False, adapter_names=None) -> None:
            from peft.tuners.tuners_utils import check_adapters_to_merge
            for name in check_adapters_to_merge(self, adapter_names):
                if name not in self.lora_A:
                    continue
                base = self.get_base_layer()
                w = base.dequantize(torch.float32) + self.get_delta_weight(name).float()
                if safe_merge and not torch.isfinite(w).all():
                    raise ValueError(f"NaNs detected in the merged weights of adapter {name!r}")
                base.set_weight(w)
                if self.lora_bias[name]:
                    base.bias.data += self.lora_B[name].bias.to(base.bias.dtype)
                self.merged_adapters.append(name)

        def unmerge(self) -> None:
            while self.merged_adapters:
                name = self.merged_adapters.pop()
                if name not in self.lora_A:
                    continue
                base = self.get_base_layer()
                base.set_weight(base.dequantize(torch.float32) - self.get_delta_weight(name).float())
                if self.lora_bias[name]:
                    base.bias.data -= self.lora_B[name].bias.to(base.bias.dtype)

    return LoraLinear4bit


_CUSTOM = {}


def lora_layer_class():
    if "cls" not in _CUSTOM:
        _CUSTOM["cls"] = _lora_linear4bit_cls()
    return _CUSTOM["cls"]


def register_lowbit_layers(peft_config) -> None:
    """Make peft build `LoraLinear4bit` for our `Linear4bit` (needed before get_peft_model/from_pretrained)."""
    peft_config._register_custom_module({Linear4bit: lora_layer_class()})


def linear_module_names(model: nn.Module, exclude=("lm_head",)) -> list[str]:
    """Leaf names of every Linear (incl. Linear4bit) in the decoder, like peft's 'all-linear'."""
    names = set()
    for full, mod in model.named_modules():
        if isinstance(mod, nn.Linear) and not matches_module(full, exclude):
            names.add(full.rsplit(".", 1)[-1])
    return sorted(names)


def resolve_target_modules(model: nn.Module, target_modules) -> list[str] | str:
    all_linear = linear_module_names(model)
    if target_modules in ("all-linear", ["all-linear"]):
        if not all_linear:
            raise ConfigError("lora.target_modules='all-linear' matched no Linear layer in this model")
        return all_linear
    if isinstance(target_modules, str):
        pattern = re.compile(target_modules)
        if not any(pattern.fullmatch(n) for n, _ in model.named_modules()):
            raise ConfigError(f"lora.target_modules regex {target_modules!r} matches no module; "
                              f"linear layers here: {', '.join(all_linear)}")
        return target_modules
    targets = list(target_modules)
    missing = [t for t in targets if t not in all_linear]
    if missing:
        raise ConfigError(f"lora.target_modules {missing} match no Linear layer; "
                          f"choose from: {', '.join(all_linear)} (or 'all-linear')")
    return targets


def lora_target_names(model: nn.Module, target_modules, skip_modules=()) -> set[str]:
    """Full names of the Linear layers `add_lora(target_modules=...)` wraps (outside `skip_modules`)."""
    resolved = resolve_target_modules(model, target_modules)
    out = set()
    for name, mod in model.named_modules():
        if not isinstance(mod, nn.Linear) or matches_module(name, skip_modules):
            continue
        if re.fullmatch(resolved, name) if isinstance(resolved, str) else name.rsplit(".", 1)[-1] in resolved:
            out.add(name)
    return out


def make_lora_config(model: nn.Module, *, r: int = 16, alpha: float = 32, dropout: float = 0.05,
                     target_modules="all-linear", use_rslora: bool = False, use_dora: bool = False, bias: str = "none"):
    from peft import LoraConfig
    if use_dora and any(isinstance(m, Linear4bit) for m in model.modules()):
        raise ConfigError("lora.use_dora is not supported on a lowbit 4-bit base yet; set lora.use_dora=false")
    cfg = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, bias=bias, task_type="CAUSAL_LM",
                     target_modules=resolve_target_modules(model, target_modules), use_rslora=use_rslora,
                     use_dora=use_dora)
    register_lowbit_layers(cfg)
    return cfg


def add_lora(model: nn.Module, *, r: int = 16, alpha: float = 32, dropout: float = 0.05, target_modules="all-linear",
             use_rslora: bool = False, use_dora: bool = False, bias: str = "none"):
    """Wrap `model` with trainable LoRA adapters (fp32 weights) → `peft.PeftModel`."""
    from peft import get_peft_model
    cfg = make_lora_config(model, r=r, alpha=alpha, dropout=dropout, target_modules=target_modules,
                           use_rslora=use_rslora, use_dora=use_dora, bias=bias)
    return get_peft_model(model, cfg, autocast_adapter_dtype=True)


def load_adapter(model: nn.Module, adapter_dir, is_trainable: bool = False):
    """`PeftModel.from_pretrained` onto a lowbit base, with our LoRA layer registered."""
    from peft import PeftConfig, PeftModel
    cfg = PeftConfig.from_pretrained(str(adapter_dir))
    register_lowbit_layers(cfg)
    return PeftModel.from_pretrained(model, str(adapter_dir), config=cfg, is_trainable=is_trainable)


def prepare_for_kbit_training(model: nn.Module, gradient_checkpointing: bool = True) -> nn.Module:
    """Freeze the base, let gradients reach LoRA through checkpointed blocks.

    Unlike peft's helper we do not upcast embeddings/lm_head/norms to fp32: on a 262k
    vocabulary that alone costs ~1 GB and the fp32 logits are computed in chunks instead.
    """
    for p in model.parameters():
        p.requires_grad_(False)
    if gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if hasattr(model, "enable_input_require_grads"):
            model.enable_input_require_grads()
        if getattr(model, "config", None) is not None:
            model.config.use_cache = False
    return model

