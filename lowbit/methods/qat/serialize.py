"""Save / load converted QAT models: one safetensors file whose metadata says how to rebuild it."""
from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from lowbit.errors import ConfigError, InputError
from lowbit.format import quantize
from lowbit.methods.qat import kv, rotate
from lowbit.methods.qat.config import QuantizerConfig, from_dict
from lowbit.methods.qat.fake_quant import FakeQuantizer
from lowbit.methods.qat.linear import attach
from lowbit.methods.qat.quantized import QuantizedLinear
from lowbit.modules.linear4bit import Linear4bit
from lowbit.utils.io import atomic_dir, save_safetensors
from lowbit.utils.modules import has_fp32_residual, keep_residual_in_fp32, set_module

FORMAT, VERSION = "lowbit.methods.qat", 1


def _layer_kinds(model: nn.Module) -> dict[str, dict]:
    """Every linear that differs from the plain model: its weight form and its run-time quantizers."""
    kinds = {}
    for name, m in model.named_modules():
        if not hasattr(m, "lowbit_input_fq"):
            continue
        info = {"in_fq": m.lowbit_input_fq is not None, "out_fq": m.lowbit_output_fq is not None,
                "bias": m.bias is not None}
        if getattr(m, "lowbit_rotation", None) is not None:  # its signs / odd factor are in the state dict
            info["rotation"] = m.lowbit_rotation.n
        if isinstance(m, QuantizedLinear):
            info.update(kind="codes", n_rows=m.n_rows, cfg=m.cfg.__dict__)
        else:
            info["kind"] = "nf4" if isinstance(m, Linear4bit) else "dense"
        kinds[name] = info
    return kinds


def save_quantized(model: nn.Module, out_dir: str | Path, tokenizer=None, overwrite: bool = False) -> Path:
    """config.json (+ tokenizer) and model.safetensors with {format, version, qat_config, layers} metadata."""
    cfg = getattr(model, "lowbit_qat_config", None)
    if cfg is None:
        raise InputError("save_quantized needs a model from lowbit.methods.qat.convert")
    if cfg.weight is not None and cfg.weight.dtype == "gguf":
        raise ConfigError("a GGUF QAT model deploys as a .gguf file: save it with lowbit.methods.qat.save_dense(model, "
                          "dir) and run `lowbit export dir out.gguf --format gguf`")
    state, seen, tied = {}, {}, {}
    for k, v in model.state_dict().items():
        if v is None:
            continue
        key = (v.data_ptr(), v.shape, v.dtype) if v.numel() else None
        if key is not None and key in seen:  # tied weights (Gemma's lm_head) are stored once
            tied[k] = seen[key]
            continue
        seen[key] = k
        state[k] = v.detach().contiguous()
    meta = {"format": FORMAT, "version": str(VERSION), "qat_config": json.dumps(cfg.to_dict()),
            "layers": json.dumps(_layer_kinds(model)), "tied": json.dumps(tied),
            "compute_dtype": str(model.get_input_embeddings().weight.dtype),
            # the residual stream's dtype is part of the model's numerics: reload it as it ran
            "fp32_residual": str(int(has_fp32_residual(model)))}
    with atomic_dir(Path(out_dir), overwrite=overwrite) as tmp:
        model.config.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        save_safetensors(state, Path(tmp) / "model.safetensors", metadata=meta)
    return Path(out_dir)


def load_quantized(path: str | Path, dtype: torch.dtype | None = None) -> nn.Module:
    """Rebuild a converted model saved by `save_quantized` (its quantizers included), in the dtype it
    was saved in (metadata compute_dtype) unless `dtype` is given. The model is built in that dtype, so
    computed buffers (Gemma's embed_scale, RoPE) match the trained model's."""
    from safetensors import safe_open
    from transformers import AutoConfig, AutoModelForCausalLM

    path = Path(path)
    f = path / "model.safetensors"
    if not f.exists():
        raise InputError(f"{path} holds no model.safetensors; expected a directory written by save_quantized")
    with safe_open(str(f), "pt") as sf:
        meta = sf.metadata() or {}
        if meta.get("format") != FORMAT:
            raise InputError(f"{f} is not a lowbit QAT checkpoint (metadata format={meta.get('format')!r})")
        if int(meta["version"]) > VERSION:
            raise InputError(f"{f} was written by a newer lowbit (format version {meta['version']}); upgrade lowbit")
        state = {k: sf.get_tensor(k) for k in sf.keys()}
    cfg = from_dict(json.loads(meta["qat_config"]))
    dtype = dtype or getattr(torch, meta.get("compute_dtype", "torch.bfloat16").removeprefix("torch."))
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path), dtype=dtype)
    for name, info in json.loads(meta["layers"]).items():
        old = model.get_submodule(name)
        if info["kind"] == "nf4":
            q = quantize(torch.zeros(old.out_features, old.in_features, dtype=dtype), cfg.weight.group_size,
                         cfg.weight.double_quant, "nf4")
            new = Linear4bit(q, old.bias, dtype)
        elif info["kind"] == "codes":
            new = QuantizedLinear(old.in_features, old.out_features, QuantizerConfig(**info["cfg"]), info["n_rows"],
                                  info["bias"], dtype)
        else:
            new = old
        if not isinstance(new, QuantizedLinear):
            attach(new)
        if info["in_fq"]:
            new.lowbit_input_fq = FakeQuantizer(cfg.activation, "activation")
        if info["out_fq"]:
            new.lowbit_output_fq = FakeQuantizer(cfg.kv, "kv")
        if info.get("rotation"):
            new.lowbit_rotation = rotate.Rotation(info["rotation"])
        set_module(model, name, new)
    if cfg.kv is not None and cfg.kv_position == "post_rope":
        kv.install(model, lambda: FakeQuantizer(cfg.kv, "kv"))
        if cfg.rotation == "hadamard":
            rotate.install_kv(model, kv.attention_modules(model))
    tied = json.loads(meta["tied"])
    for k, src in tied.items():  # shared tensors stored once (a rotation shared by q/k/v): fill every user
        if src in state and k not in state:
            state[k] = state[src]
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if k not in tied]
    if missing or unexpected:
        raise InputError(f"{f} does not match its config: missing {missing[:5]}, unexpected {unexpected[:5]}")
    model.tie_weights()
    if meta.get("fp32_residual") == "1":  # as the trained model ran (load_model / prepare_for_kbit_training)
        keep_residual_in_fp32(model)
    model.lowbit_qat_config = cfg
    return model.eval()
