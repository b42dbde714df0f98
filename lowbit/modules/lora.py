"""LoRA on the 4-bit base through peft: peft's LoRA layer wraps our `Linear4bit`.

peft would treat `Linear4bit` (an nn.Linear subclass) with its dense `lora.Linear`, whose
merge adds into `weight.data` — wrong for packed bytes. We register `LoraLinear4bit`,
which merges by dequantize → add → requantize, as peft does for bitsandbytes layers.

MoE experts (`Experts4bit`) take LoRA through peft's `target_parameters` (its `ParamWrapper`,
one low-rank pair per expert): we register `LoraExperts4bit`, which hands the factors to the
4-bit experts' forward (applied to the routed experts only) instead of adding a delta to the
packed bytes, so the adapter file is exactly what peft writes for the dense model.
"""
from __future__ import annotations

import re
from contextlib import contextmanager

import torch
from torch import nn

from lowbit.errors import ConfigError
from lowbit.kernels import lora_fusable, lora_matmul_4bit
from lowbit.modules.linear4bit import Linear4bit
from lowbit.modules.moe4bit import Experts4bit
from lowbit.modules.structure import experts_modules, lora_excluded, lora_exclusion
from lowbit.utils.modules import keep_residual_in_fp32, matches_module


def _lora_linear4bit_cls():
    from peft.tuners.lora.layer import Linear as LoraLinear

    class LoraLinear4bit(LoraLinear):
        """peft LoRA layer over a lowbit `Linear4bit` base."""

        def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
            name = self._fused_adapter(x, args, kwargs)
            if name is None:
                return super().forward(x, *args, **kwargs)
            base, a, b = self.get_base_layer(), self.lora_A[name].weight, self.lora_B[name].weight
            drop = self.lora_dropout[name]
            p = drop.p if isinstance(drop, nn.Dropout) and drop.training else 0.0
            mask = keep_mask(x.shape, p, x.device) if p else None
            bias = None if base.bias is None else base.bias.to(base.compute_dtype)
            return lora_matmul_4bit(x, base.quant, bias, a, b, self.scaling[name] / (1 - p), mask)

        def _fused_adapter(self, x, args, kwargs) -> str | None:
            """The one plain adapter the fused path can run, else None (peft's own forward)."""
            if not FUSED["enabled"] or args or kwargs or self.disable_adapters or self.merged:
                return None
            names = [n for n in self.active_adapters if n in self.lora_A]
            if len(names) != 1 or names[0] in self.lora_variant or self.lora_bias[names[0]]:
                return None
            base, a = self.get_base_layer(), self.lora_A[names[0]].weight
            if x.dtype != base.compute_dtype or not lora_fusable(x, base.quant, a):
                return None
            return names[0]

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


def _lora_experts4bit_cls():
    from peft.tuners.lora.layer import ParamWrapper

    class LoraExperts4bit(ParamWrapper):
        """peft LoRA (target_parameters) over one projection of a lowbit `Experts4bit`."""

        def _get_in_out_features(self, module):
            # peft reads (E, in, out) off the 3-D parameter; ours is packed, so give the dense layout
            n_exp, d1, d2 = self.get_base_layer().storage_shapes[self.parameter_name]
            self.num_experts, self._param_ndim = n_exp, 3
            return d1, d2

        def factors(self, name: str):
            """(L [E, out, r], R [E, r, in], scale): expert e's delta is scale·L[e]·R[e] as an [out, in] weight."""
            a, b = self.lora_A[name].weight, self.lora_B[name].weight
            a = a.reshape(self.num_experts, -1, a.shape[-1])
            b = b.reshape(b.shape[0], -1, self.num_experts).permute(2, 0, 1)
            base = self.get_base_layer()
            # peft's product B·A is in its own (in, out) reading of the dense layout; map it to [out, in]
            if base.stored_transposed == base.is_transposed:
                return b, a, self.scaling[name]
            return a.transpose(1, 2), b.transpose(1, 2), self.scaling[name]

        @contextmanager
        def _activate_lora(self, active_adapters):
            names = [a for a in active_adapters if a in self.lora_A]
            base = self.get_base_layer()
            if names:
                base._lora[self.parameter_name] = [self.factors(n) for n in names]
            try:
                yield
            finally:
                base._lora.pop(self.parameter_name, None)

        def get_delta_weight(self, adapter_name, *args, **kwargs) -> torch.Tensor:
            """The delta in the dense module's [E, d1, d2] layout (what peft adds on a dense model)."""
            lhs, rhs, scale = self.factors(adapter_name)
            delta = scale * (lhs.float() @ rhs.float())
            return delta.transpose(1, 2) if self.get_base_layer().stored_transposed else delta

        def merge(self, safe_merge: bool = False, adapter_names=None) -> None:
            from peft.tuners.tuners_utils import check_adapters_to_merge
            base, p = self.get_base_layer(), self.parameter_name
            for name in check_adapters_to_merge(self, adapter_names):
                if name not in self.lora_A:
                    continue
                w = base.dequantize(p, torch.float32) + self.get_delta_weight(name)
                if safe_merge and not torch.isfinite(w).all():
                    raise ValueError(f"NaNs detected in the merged experts of adapter {name!r}")
                base.set_weight(p, w)
                self.merged_adapters.append(name)

        def unmerge(self) -> None:
            base, p = self.get_base_layer(), self.parameter_name
            while self.merged_adapters:
                name = self.merged_adapters.pop()
                if name in self.lora_A:
                    base.set_weight(p, base.dequantize(p, torch.float32) - self.get_delta_weight(name))

    LoraExperts4bit.__name__ = "ParamWrapper"  # peft tells parameter wrappers (nestable) by class name
    return LoraExperts4bit


_CUSTOM = {}
# the fused LoRA forward (lowbit.kernels.lora_matmul_4bit); off = peft's own Linear.forward
FUSED = {"enabled": True}
_KEEP_BITS = 31  # int32 random_() draws uniformly from [0, 2**31)


def keep_mask(shape, p: float, device=None) -> torch.Tensor:
    """Dropout keep-mask: each entry kept with probability 1 - p (to 2**-31), drawn from torch's generator.

    Comparing int32 draws against p * 2**31 costs about half of `bernoulli_` on CPU (no float
    conversion), and the mask is bool (1 byte) where nn.Dropout keeps a scaled copy of its input."""
    r = torch.empty(shape, dtype=torch.int32, device=device).random_()
    return r >= round(p * 2 ** _KEEP_BITS)


def lora_layer_class():
    if "cls" not in _CUSTOM:
        _CUSTOM["cls"] = _lora_linear4bit_cls()
    return _CUSTOM["cls"]


def lora_experts_class():
    if "experts" not in _CUSTOM:
        _CUSTOM["experts"] = _lora_experts4bit_cls()
    return _CUSTOM["experts"]


def register_lowbit_layers(peft_config) -> None:
    """Make peft build `LoraLinear4bit` / `LoraExperts4bit` for our 4-bit layers (before get_peft_model/from_pretrained)."""
    peft_config._register_custom_module({Linear4bit: lora_layer_class(), Experts4bit: lora_experts_class()})


def linear_module_names(model: nn.Module, exclude=("lm_head",)) -> list[str]:
    """Leaf names of every Linear (incl. Linear4bit) in the decoder, like peft's 'all-linear' (routers, image
    towers and Linear subclasses with their own forward left out)."""
    names = set()
    excluded = set(lora_excluded(model))
    for full, mod in model.named_modules():
        if isinstance(mod, nn.Linear) and not matches_module(full, exclude) and full not in excluded:
            names.add(full.rsplit(".", 1)[-1])
    return sorted(names)


def expert_parameter_names(model: nn.Module) -> list[str]:
    """`target_parameters` for every fused experts projection ('experts.gate_up_proj', 'experts.down_proj')."""
    out = set()
    for name, mod in experts_modules(model).items():
        leaf = name.rsplit(".", 1)[-1]
        out.update(f"{leaf}.{p}" for p in getattr(mod, "projs", [k for k, v in mod.named_parameters(recurse=False)
                                                                 if v.dim() == 3]))
    return sorted(out)


def resolve_target_parameters(model: nn.Module, target_parameters, dropout: float) -> list[str] | None:
    if target_parameters in (None, [], ()):
        return None
    names = expert_parameter_names(model)
    if target_parameters in ("all-experts", ["all-experts"]):
        if not names:
            raise ConfigError("lora.target_parameters='all-experts' but this model has no MoE experts")
        target_parameters = names
    target_parameters = list(target_parameters)
    if dropout:
        raise ConfigError("LoRA on MoE experts (lora.target_parameters) needs lora.dropout=0: peft's adapter on "
                          "a parameter (its ParamWrapper, whose format lowbit writes) has no dropout")
    return target_parameters


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
    excluded = set(lora_excluded(model))
    out = set()
    for name, mod in model.named_modules():
        if not isinstance(mod, nn.Linear) or matches_module(name, skip_modules) or name in excluded:
            continue
        if re.fullmatch(resolved, name) if isinstance(resolved, str) else name.rsplit(".", 1)[-1] in resolved:
            out.add(name)
    return out


def make_lora_config(model: nn.Module, *, r: int = 16, alpha: float = 32, dropout: float = 0.05,
                     target_modules="all-linear", use_rslora: bool = False, use_dora: bool = False, bias: str = "none",
                     target_parameters=None):
    """peft LoraConfig for `model`; `target_parameters='all-experts'` (or peft names such as
    'experts.gate_up_proj') also adapts the MoE experts, one low-rank pair per expert."""
    from peft import LoraConfig
    if use_dora and any(isinstance(m, (Linear4bit, Experts4bit)) for m in model.modules()):
        raise ConfigError("lora.use_dora is not supported on a lowbit 4-bit base yet; set lora.use_dora=false")
    extra = {}
    params = resolve_target_parameters(model, target_parameters, dropout)
    if params:
        extra["target_parameters"] = params
    exclude = lora_exclusion(model)
    if exclude:
        extra["exclude_modules"] = exclude
    cfg = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, bias=bias, task_type="CAUSAL_LM",
                     target_modules=resolve_target_modules(model, target_modules), use_rslora=use_rslora,
                     use_dora=use_dora, **extra)
    if not params and _peft_adds_experts(model, cfg):
        # transformers v4 kept these experts as Linear layers named like the dense MLP's: peft maps
        # 'gate_proj'/'up_proj'/'down_proj' targets onto them, so say so instead of failing inside peft
        if dropout:
            raise ConfigError(f"peft also adapts the MoE experts of {model.config.model_type!r} when "
                              f"{sorted(cfg.target_modules)} are targeted, and LoRA on experts needs lora.dropout=0; set "
                              "lora.dropout=0 or leave the MLP projections out of lora.target_modules")
        cfg.target_parameters = expert_parameter_names(model)
    register_lowbit_layers(cfg)
    return cfg


def _peft_adds_experts(model: nn.Module, cfg) -> bool:
    import copy
    try:
        from peft.utils.transformers_weight_conversion import convert_peft_config_for_transformers
    except ImportError:  # transformers < 5: no fused experts
        return False
    trial = copy.deepcopy(cfg)
    convert_peft_config_for_transformers(trial, model, None)
    return bool(trial.target_parameters)


def add_lora(model: nn.Module, *, r: int = 16, alpha: float = 32, dropout: float = 0.05, target_modules="all-linear",
             use_rslora: bool = False, use_dora: bool = False, bias: str = "none", target_parameters=None):
    """Wrap `model` with trainable LoRA adapters (fp32 weights) → `peft.PeftModel`."""
    from peft import get_peft_model
    cfg = make_lora_config(model, r=r, alpha=alpha, dropout=dropout, target_modules=target_modules,
                           use_rslora=use_rslora, use_dora=use_dora, bias=bias, target_parameters=target_parameters)
    return get_peft_model(model, cfg, autocast_adapter_dtype=True)


def load_adapter(model: nn.Module, adapter_dir, is_trainable: bool = False):
    """`PeftModel.from_pretrained` onto a lowbit base, with our LoRA layer registered."""
    from peft import PeftConfig, PeftModel
    cfg = PeftConfig.from_pretrained(str(adapter_dir))
    register_lowbit_layers(cfg)
    return PeftModel.from_pretrained(model, str(adapter_dir), config=cfg, is_trainable=is_trainable)


def prepare_for_kbit_training(model: nn.Module, gradient_checkpointing: bool = True,
                              checkpoint_layers: int | None = None, fp32_residual: bool = True) -> nn.Module:
    """Freeze the base, let gradients reach LoRA through checkpointed blocks.

    `fp32_residual`: with bf16/fp16 weights, the residual stream still runs in fp32 (the embedding's
    output is upcast, the head's input cast back), as it does after peft's helper — which gets there by
    upcasting the embeddings and lm_head themselves (~1 GB more on a 262k vocabulary; we keep them as
    stored; `load_model` already hooks the models it loads, so training, eval and a reloaded export agree).
    The 4-bit matmuls compute in compute_dtype either way; a half-precision residual stream measurably
    slowed learning (BENCHMARKS.md, QLoRA training step, bf16 loss curves).
    `checkpoint_layers`: checkpoint only that many decoder layers, evenly spaced (None: all).
    """
    for p in model.parameters():
        p.requires_grad_(False)
    if fp32_residual:
        keep_residual_in_fp32(model)
    if gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if hasattr(model, "enable_input_require_grads"):
            model.enable_input_require_grads()
        if getattr(model, "config", None) is not None:
            model.config.use_cache = False
        if checkpoint_layers is not None:
            set_checkpointed_layers(model, checkpoint_layers)
    return model


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The layers transformers checkpoints (its GradientCheckpointingLayer blocks), in order."""
    from transformers.modeling_layers import GradientCheckpointingLayer
    return [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]


def set_checkpointed_layers(model: nn.Module, n: int) -> list[int]:
    """Checkpoint `n` evenly spaced decoder layers and run the rest plainly; returns their indices."""
    layers = decoder_layers(model)
    n = max(0, min(int(n), len(layers)))
    chosen = sorted({i * len(layers) // n for i in range(n)}) if n else []
    for i, layer in enumerate(layers):
        layer.gradient_checkpointing = i in chosen
    return chosen

