"""Where the parts of a transformers causal LM sit: its text decoder, its MoE experts and routers.

One rule for the loader (what to quantize), LoRA (what to adapt) and export (what was quantized):
only the text decoder's plain Linear layers (and GPT-2-style Conv1D) and its experts go to 4-bit;
image/audio towers, routers and Linear subclasses with their own forward stay in 16-bit.
"""
from __future__ import annotations

import re

from torch import nn

from lowbit.modules.linear4bit import Linear4bit
from lowbit.utils.modules import matches_module


def is_conv1d(mod: nn.Module) -> bool:
    """GPT-2's `Conv1D`: a linear layer storing its weight as (in, out)."""
    return type(mod).__name__ == "Conv1D" and hasattr(mod, "nf") and getattr(mod, "weight", None) is not None


def is_plain_linear(mod: nn.Module) -> bool:
    """An `nn.Linear` whose forward is nn.Linear's (a subclass such as Llama 4's router returns top-k scores)."""
    return isinstance(mod, nn.Linear) and type(mod).forward is nn.Linear.forward


def decoder_prefix(model: nn.Module) -> str:
    """Dotted name of the text decoder inside `model` ('' when the model is the decoder)."""
    get = getattr(model, "get_decoder", None)
    dec = get() if callable(get) else None
    if dec is None:
        return ""
    for name, mod in model.named_modules():
        if mod is dec:
            return name
    return ""


def in_decoder(name: str, prefix: str) -> bool:
    return not prefix or name == prefix or name.startswith(prefix + ".")


def experts_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Fused MoE experts modules: those holding 3-D `*_proj` parameters (transformers 5 layout)."""
    out = {}
    for name, mod in model.named_modules():
        if getattr(mod, "lowbit_experts", False) or any(
                p.dim() == 3 and k.endswith("proj") for k, p in mod.named_parameters(recurse=False)):
            out[name] = mod
    return out


def routing_linears(model: nn.Module, experts: dict[str, nn.Module] | None = None) -> set[str]:
    """Linear layers that route tokens (router projections, shared-expert gates): out_features <= #experts,
    inside the module that holds the experts. They stay dense: routing decides which experts run."""
    experts = experts_modules(model) if experts is None else experts
    out = set()
    for ename, emod in experts.items():
        n_exp = getattr(emod, "num_experts", None) or next(
            p.shape[0] for p in emod.parameters() if p.dim() >= 2)
        ename = ename.replace(".base_layer", "")  # under peft the experts sit at .base_layer
        block = ename.rpartition(".")[0]
        root = model.get_submodule(block) if block else model
        for sub, mod in root.named_modules():
            full = f"{block}.{sub}" if block and sub else (sub or block)
            if full.startswith(ename) or ".lora_" in full or not isinstance(mod, nn.Linear):
                continue
            if mod.out_features <= n_exp:
                out.add(full)
    return out


def quantizable_linears(model: nn.Module, skip_modules=("lm_head",)) -> set[str]:
    """Names of the layers the 4-bit loader replaces with `Linear4bit`."""
    prefix = decoder_prefix(model)
    routers = routing_linears(model)
    return {n for n, m in model.named_modules()
            if (is_plain_linear(m) or is_conv1d(m)) and in_decoder(n, prefix) and n not in routers
            and not matches_module(n, skip_modules)}


def lora_excluded(model: nn.Module) -> list[str]:
    """Full names of Linear layers LoRA must not wrap: outside the text decoder, routers, custom Linear subclasses."""
    prefix = decoder_prefix(model)
    routers = routing_linears(model)
    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    out = []
    for n, m in model.named_modules():
        if not isinstance(m, nn.Linear) or n.endswith(".base_layer") or m is head:
            continue
        custom = not is_plain_linear(m) and not isinstance(m, Linear4bit)
        if not in_decoder(n, prefix) or n in routers or custom:
            out.append(n)
    return sorted(out)


def media_prefixes(model: nn.Module) -> list[str]:
    """Subtrees beside the text decoder (vision/audio towers, projectors), the output head left out."""
    prefix = decoder_prefix(model)
    if not prefix:
        return []
    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    path = prefix.split(".")
    out = []
    for depth in range(len(path)):
        parent = ".".join(path[:depth])
        for child, mod in (model.get_submodule(parent) if parent else model).named_children():
            full = f"{parent}.{child}" if parent else child
            if child != path[depth] and mod is not head:
                out.append(full)
    return out


def exclusion_pattern(names, subtrees=()) -> str | None:
    """One regex (full match) for `names` and everything under `subtrees`; layer indices generalized so it
    stays short for deep models."""
    gen = lambda n: re.sub(r"\\.\d+(?=\\.|$)", r"\\.\\d+", re.escape(n))  # noqa: E731
    alts = sorted({gen(n) for n in names if not any(n.startswith(t + ".") for t in subtrees)} |
                  {gen(t) + r"(?:\..*)?" for t in subtrees})
    return "|".join(f"(?:{a})" for a in alts) or None


def lora_exclusion(model: nn.Module) -> str | None:
    """peft `exclude_modules` for `model`: image/audio towers whole, routers, custom Linear subclasses."""
    return exclusion_pattern(lora_excluded(model), media_prefixes(model))
