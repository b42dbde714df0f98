"""Write a transformers-loadable bitsandbytes 4-bit checkpoint (safetensors + quantization_config).

Every Linear outside `skip_modules` is quantized with lowbit.format (bitsandbytes-identical
bytes) and stored under the keys transformers writes for a bnb 4-bit Linear; everything else
is stored dense. `AutoModelForCausalLM.from_pretrained(out)` then loads it with bitsandbytes.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from lowbit import kernels
from lowbit.format import quantize
from lowbit.models.load import as_dtype
from lowbit.utils.io import atomic_dir, save_safetensors, write_json
from lowbit.utils.modules import matches_module


def quantization_config(quant_type: str, double_quant: bool, compute_dtype: torch.dtype, skip_modules) -> dict:
    from transformers import BitsAndBytesConfig
    cfg = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quant_type,
                             bnb_4bit_use_double_quant=double_quant, bnb_4bit_compute_dtype=compute_dtype,
                             llm_int8_skip_modules=list(skip_modules)).to_dict()
    cfg["quant_method"] = "bitsandbytes"  # the enum in to_dict() is not JSON
    return cfg


def bnb4_state_dict(model: nn.Module, *, quant_type: str = "nf4", blocksize: int = 64, double_quant: bool = True,
                    skip_modules=("lm_head",)) -> tuple[dict[str, torch.Tensor], list[dict]]:
    """(state dict in the bnb 4-bit layout, per-layer requantization errors ‖W − deq(Q)‖/‖W‖)."""
    sd, errors = {}, []
    quantized = set()
    for name, mod in model.named_modules():
        if type(mod) is not nn.Linear or matches_module(name, skip_modules):
            continue
        w = mod.weight.detach()
        q = quantize(w, blocksize, double_quant, quant_type)
        w32 = w.float()
        err = ((w32 - kernels.dequantize_4bit(q, torch.float32)).norm() / w32.norm().clamp_min(1e-30)).item()
        errors.append({"name": name, "shape": list(w.shape), "rel_error": err})
        sd.update(q.state_dict(f"{name}.weight"))
        if mod.bias is not None:
            sd[f"{name}.bias"] = mod.bias.detach()
        quantized.add(f"{name}.weight")
        quantized.add(f"{name}.bias")
    for k, v in model.state_dict().items():
        if k not in quantized and k not in sd:
            sd[k] = v
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
    sd, errors = bnb4_state_dict(model, quant_type=quant_type, blocksize=blocksize, double_quant=double_quant,
                                 skip_modules=skip_modules)
    cfg = model.config.to_dict()
    for attr in ("lowbit_quantization", "lowbit_loftq"):
        cfg.pop(attr, None)
    cfg["quantization_config"] = quantization_config(quant_type, double_quant, compute_dtype, skip_modules)
    tot_sq = sum(e["rel_error"] for e in errors) / max(len(errors), 1)
    report = {"quant_type": quant_type, "blocksize": blocksize, "double_quant": double_quant,
              "layers": len(errors), "mean_rel_error": tot_sq, "max_rel_error": max((e["rel_error"] for e in errors),
                                                                                    default=0.0),
              "per_layer": errors}
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
