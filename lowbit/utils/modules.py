"""Small nn.Module idioms used across the package, defined once."""
from __future__ import annotations

import torch
from torch import nn


def set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """Replace the submodule at dotted `name` with `new`."""
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, new)


def unwrap_peft(model: nn.Module) -> nn.Module:
    """The transformers model inside a peft wrapper (the model itself when it is not wrapped)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def matches_module(name: str, patterns) -> bool:
    """True when module `name` is, or sits inside, a module named by one of `patterns`.

    A pattern is a dotted name matched on whole components anywhere in the path: "lm_head" matches
    "lm_head" and "lm_head.base_layer" (peft's wrapper), "mlp.down_proj" matches
    "model.layers.3.mlp.down_proj", and "head" matches neither. This is the one rule for
    skip_modules (loading, export), LoRA's exclusions and QAT's exclude list.
    """
    path = f".{name}."
    return any(f".{p.strip('.')}." in path for p in patterns)


HALF = (torch.bfloat16, torch.float16)
# transformers' RMSNorms compute in fp32 and accept any input dtype: left alone, they normalize the fp32 stream
# itself (casting their input to bf16 first measurably slowed learning again)
FP32_SAFE = ("RMSNorm",)


def _fp32(x):
    return x.float() if isinstance(x, torch.Tensor) and x.dtype in HALF else x


def _upcast_output(module, args, out):
    return _fp32(out)


def _to_param_dtype(module, args, kwargs):
    """fp32 tensors into a half-precision module (a plain Linear, norm, router, experts) → its dtype."""
    module._lowbit_cast = False
    if getattr(module, "lowbit_casts_input", False):  # became a casting class after hooking (QAT's class swap)
        return None
    dt = module._lowbit_param_dtype

    def cast(x):
        if isinstance(x, torch.Tensor) and x.dtype == torch.float32:
            module._lowbit_cast = True
            return x.to(dt)
        return x
    return tuple(cast(a) for a in args), {k: cast(v) for k, v in kwargs.items()}


def _back_to_fp32(module, args, kwargs, out):
    """...and its outputs back to fp32, as the 4-bit linears return the input's dtype."""
    if not module._lowbit_cast:
        return None
    return tuple(_fp32(o) for o in out) if isinstance(out, tuple) else _fp32(out)


def keep_residual_in_fp32(model: nn.Module) -> bool:
    """Run the residual stream of a half-precision model in fp32 without fp32 copies of its weights: the input
    embeddings' output is upcast, and every module that owns half-precision parameters and does not cast its
    input itself (classes with `lowbit_casts_input = True`: the 4-bit and QAT linears compute in their
    compute_dtype and return the input's dtype; RMSNorms compute in fp32) gets its fp32 inputs cast to that
    dtype and its outputs cast back, so every block sees fp32 activations. No-op (False) for fp32 models and
    for models already hooked."""
    emb = _input_embeddings(model)
    if emb is None or emb.weight.dtype not in HALF or has_fp32_residual(model):
        return False
    emb.register_forward_hook(_upcast_output)
    emb._lowbit_fp32_out = True
    for m in model.modules():
        if m is emb or getattr(m, "lowbit_casts_input", False) or type(m).__name__.endswith(FP32_SAFE):
            continue
        own = [p for p in m.parameters(recurse=False) if p.is_floating_point()]
        if own and own[0].dtype in HALF:
            m._lowbit_param_dtype = own[0].dtype
            m.register_forward_pre_hook(_to_param_dtype, with_kwargs=True)
            m.register_forward_hook(_back_to_fp32, with_kwargs=True)
    return True


def _input_embeddings(model: nn.Module) -> nn.Module | None:
    return model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None


def has_fp32_residual(model: nn.Module) -> bool:
    """Whether `keep_residual_in_fp32` hooked this model (QAT checkpoints record it)."""
    return bool(getattr(_input_embeddings(model), "_lowbit_fp32_out", False))
