"""Write a transformers-loadable bitsandbytes 4-bit checkpoint (safetensors + quantization_config).

Every Linear (and GPT-2 Conv1D, transposed as transformers does) of the text decoder outside
`skip_modules` is quantized with lowbit.format (bitsandbytes-identical bytes) and stored under the
keys transformers writes for a bnb 4-bit Linear; everything else is stored dense.
`AutoModelForCausalLM.from_pretrained(out)` then loads it with bitsandbytes. Routers and image
towers stay dense, as in the 4-bit base lowbit trains on, and go into `llm_int8_skip_modules`.

MoE experts: transformers' bitsandbytes integration quantizes nn.Linear/Conv1D only, so fused
3-D experts tensors cannot be expressed there; they are written dense in 16-bit (transformers
loads them as such), and `lowbit.models.load_model` reloads the file with them in 4-bit. The one
exception is Llama 4, whose experts transformers splits into one MLP per expert under
bitsandbytes: those are written as 4-bit Linear layers (`experts.<e>.gate_proj/up_proj/down_proj`).
"""
from __future__ import annotations

import copy
import re
from pathlib import Path

import torch
from torch import nn

from lowbit import kernels
from lowbit.format import quantize
from lowbit.models.load import as_dtype
from lowbit.modules.structure import (
    decoder_prefix,
    exclusion_pattern,
    experts_modules,
    in_decoder,
    is_conv1d,
    media_prefixes,
    routing_linears,
)
from lowbit.utils.io import atomic_dir, save_safetensors, write_json
from lowbit.utils.modules import matches_module


def quantization_config(quant_type: str, double_quant: bool, compute_dtype: torch.dtype, skip_modules) -> dict:
    from transformers import BitsAndBytesConfig
    cfg = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quant_type,
                             bnb_4bit_use_double_quant=double_quant, bnb_4bit_compute_dtype=compute_dtype,
                             llm_int8_skip_modules=list(skip_modules)).to_dict()
    cfg["quant_method"] = "bitsandbytes"  # the enum in to_dict() is not JSON
    return cfg


def dense_kept_patterns(model: nn.Module) -> list[str]:
    """`llm_int8_skip_modules` entries for what the 4-bit base keeps dense: routers and image/audio towers
    (transformers reads each as a regex anchored at the start of a module name)."""
    pattern = exclusion_pattern(sorted(routing_linears(model)), media_prefixes(model))
    return pattern.split("|") if pattern else []


def bnb4_quantized_names(model: nn.Module, skip_modules=("lm_head",)) -> list[str]:
    """The dense model's layers the bnb4 export quantizes: plain nn.Linear / Conv1D of the text decoder,
    outside `skip_modules`, routers and image towers."""
    prefix, kept = decoder_prefix(model), dense_kept_patterns(model)
    return [n for n, m in model.named_modules()
            if (type(m) is nn.Linear or is_conv1d(m)) and in_decoder(n, prefix) and not matches_module(n, skip_modules)
            and not any(re.fullmatch(k, n) for k in kept)]


def split_experts(model: nn.Module) -> dict[str, nn.Module]:
    """Experts modules transformers replaces by one MLP per expert when loading with bitsandbytes (Llama 4)."""
    from transformers.quantizers.base import MODULES_TO_PATCH_FOR_QUANTIZATION as patched
    return {n: m for n, m in experts_modules(model).items()
            if "bitsandbytes" in str(patched.get(type(m).__name__, {}).get("quantization_methods", ""))}


def _split_expert_weights(mod: nn.Module) -> dict[str, torch.Tensor]:
    """Llama 4: fused gate_up [E, H, 2I] and down [E, I, H] (x @ W) → per-expert MLP weights [out, in]."""
    out = {}
    for e in range(mod.gate_up_proj.shape[0]):
        gate, up = mod.gate_up_proj[e].detach().t().chunk(2, dim=0)
        out.update({f"{e}.gate_proj": gate, f"{e}.up_proj": up, f"{e}.down_proj": mod.down_proj[e].detach().t()})
    return out


def _join_expert_weights(ws: dict[str, torch.Tensor], n_exp: int) -> tuple[torch.Tensor, torch.Tensor]:
    gate_up = torch.stack([torch.cat([ws[f"{e}.gate_proj"], ws[f"{e}.up_proj"]]).t() for e in range(n_exp)])
    return gate_up, torch.stack([ws[f"{e}.down_proj"].t() for e in range(n_exp)])


def _weight_out_in(mod: nn.Module) -> torch.Tensor:
    return mod.weight.detach().t().contiguous() if is_conv1d(mod) else mod.weight.detach()


def bnb4_reference(model: nn.Module, quant_type: str = "nf4", blocksize: int = 64, double_quant: bool = True,
                   skip_modules=("lm_head",), experts_dtype: torch.dtype | None = None) -> nn.Module:
    """A copy of the dense `model` with exactly the layers the bnb4 file quantizes replaced by deq(quantize(W)),
    and its dense experts rounded to `experts_dtype` as the file stores them: what the file computes."""
    ref = copy.deepcopy(model)
    with torch.no_grad():
        if experts_dtype is not None:
            for mod in experts_modules(ref).values():
                for p in mod.parameters(recurse=False):
                    p.copy_(p.to(experts_dtype))
        for name in bnb4_quantized_names(ref, skip_modules):
            mod = ref.get_submodule(name)
            w = kernels.dequantize_4bit(quantize(_weight_out_in(mod), blocksize, double_quant, quant_type),
                                        mod.weight.dtype)
            mod.weight.copy_(w.t() if is_conv1d(mod) else w)
        for mod in split_experts(ref).values():
            ws = {k: kernels.dequantize_4bit(quantize(w.contiguous(), blocksize, double_quant, quant_type), w.dtype)
                  for k, w in _split_expert_weights(mod).items()}
            gate_up, down = _join_expert_weights(ws, mod.gate_up_proj.shape[0])
            mod.gate_up_proj.copy_(gate_up)
            mod.down_proj.copy_(down)
    return ref


def bnb4_state_dict(model: nn.Module, *, quant_type: str = "nf4", blocksize: int = 64, double_quant: bool = True,
                    skip_modules=("lm_head",), experts_dtype: torch.dtype | None = None
                    ) -> tuple[dict[str, torch.Tensor], list[dict]]:
    """(state dict in the bnb 4-bit layout, per-layer requantization errors ‖W − deq(Q)‖/‖W‖).
    MoE experts tensors are stored dense, cast to `experts_dtype` when given."""
    sd, errors = {}, []
    quantized = set()
    for name in bnb4_quantized_names(model, skip_modules):
        mod = model.get_submodule(name)
        w = _weight_out_in(mod)
        q = quantize(w, blocksize, double_quant, quant_type)
        w32 = w.float()
        err = ((w32 - kernels.dequantize_4bit(q, torch.float32)).norm() / w32.norm().clamp_min(1e-30)).item()
        errors.append({"name": name, "shape": list(w.shape), "rel_error": err})
        sd.update(q.state_dict(f"{name}.weight"))
        if mod.bias is not None:
            sd[f"{name}.bias"] = mod.bias.detach()
        quantized.add(f"{name}.weight")
        quantized.add(f"{name}.bias")
    for name, mod in split_experts(model).items():
        for k, w in _split_expert_weights(mod).items():
            q = quantize(w.contiguous(), blocksize, double_quant, quant_type)
            err = ((w.float() - kernels.dequantize_4bit(q, torch.float32)).norm() / w.float().norm().clamp_min(1e-30))
            errors.append({"name": f"{name}.{k}", "shape": list(w.shape), "rel_error": err.item()})
            sd.update(q.state_dict(f"{name}.{k}.weight"))
        quantized.update({f"{name}.gate_up_proj", f"{name}.down_proj"})
    experts = {f"{n}.{k}" for n, m in experts_modules(model).items() for k, _ in m.named_parameters(recurse=False)}
    for k, v in model.state_dict().items():
        if k not in quantized and k not in sd:
            sd[k] = v.to(experts_dtype) if experts_dtype is not None and k in experts else v
    tied = getattr(model.config, "tie_word_embeddings", False) or \
        getattr(model.config.get_text_config(), "tie_word_embeddings", False)
    if tied and "lm_head.weight" in sd:
        del sd["lm_head.weight"]  # transformers re-ties it; a duplicate would share storage
    return sd, errors


def save_bnb4(model: nn.Module, tok, out, *, quant_type: str = "nf4", blocksize: int = 64, double_quant: bool = True,
              compute_dtype="bfloat16", skip_modules=("lm_head",), overwrite: bool = False,
              extra: dict | None = None) -> dict:
    """Quantize the dense `model` and write it as an HF bitsandbytes 4-bit folder. Returns the error report."""
    compute_dtype = as_dtype(compute_dtype)
    # dense experts in the compute dtype (16-bit by default), the dtype transformers runs them in
    sd, errors = bnb4_state_dict(model, quant_type=quant_type, blocksize=blocksize, double_quant=double_quant,
                                 skip_modules=skip_modules, experts_dtype=compute_dtype)
    cfg = model.config.to_dict()
    for attr in ("lowbit_quantization", "lowbit_loftq"):
        cfg.pop(attr, None)
    cfg["quantization_config"] = quantization_config(quant_type, double_quant, compute_dtype,
                                                     [*skip_modules, *dense_kept_patterns(model)])
    tot_sq = sum(e["rel_error"] for e in errors) / max(len(errors), 1)
    report = {"quant_type": quant_type, "blocksize": blocksize, "double_quant": double_quant,
              "layers": len(errors), "mean_rel_error": tot_sq, "max_rel_error": max((e["rel_error"] for e in errors),
                                                                                    default=0.0),
              "per_layer": errors, "dense_experts_tensors": sum(1 for k, v in sd.items() if k.endswith("_proj") and v.dim() == 3)}
    with atomic_dir(out, overwrite) as tmp:
        save_safetensors(sd, Path(tmp) / "model.safetensors", metadata={"format": "pt"})
        write_json(Path(tmp) / "config.json", cfg)
        gen = getattr(model, "generation_config", None)
        if gen is not None:
            gen.save_pretrained(tmp)
        if tok is not None:
            tok.save_pretrained(tmp)
        write_json(Path(tmp) / "lowbit_export.json", {"format": "lowbit.bnb4", **(extra or {}),
                                                      **{k: v for k, v in report.items() if k != "per_layer"}})
    return report
