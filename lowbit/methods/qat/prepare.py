"""`prepare` (fake quant for training) and `convert` (real codes for deployment) from one config."""
from __future__ import annotations

import contextlib
import dataclasses

import torch
from torch import nn

from lowbit.errors import ConfigError
from lowbit.methods.qat import gguf, kv, rotate
from lowbit.methods.qat.clip import ClippedFakeQuantizer
from lowbit.methods.qat.config import QATConfig, resolve
from lowbit.methods.qat.fake_quant import FakeQuantizer, nf4_quantize
from lowbit.methods.qat.linear import (
    QATLinearMixin,
    attach,
    base_linear,
    check_mergeable,
    compute_dtype,
    detach,
    effective_weight,
    is_lora_layer,
    weight_dtype,
)
from lowbit.methods.qat.numerics import as_rows
from lowbit.methods.qat.quantized import QuantizedLinear
from lowbit.modules.linear4bit import Linear4bit
from lowbit.utils.modules import matches_module, set_module, unwrap_peft


def target_linears(model: nn.Module, exclude=()) -> list[tuple[str, nn.Module]]:
    """Linear layers to quantize: peft LoRA layers (as a whole) and plain/4-bit linears outside them."""
    out, inside_lora = [], set()
    for name, m in model.named_modules():
        if any(name.startswith(p + ".") for p in inside_lora):
            continue
        if is_lora_layer(m):
            inside_lora.add(name)
        elif not isinstance(m, nn.Linear):
            continue
        if not matches_module(name, exclude):
            out.append((name, m))
    return out


def prepare(model: nn.Module, config="w4a8kv8") -> nn.Module:
    """Insert fake quantizers in place (and return the model). `config`: a preset name, a YAML
    path, a dict or a `QATConfig`. Call after `add_lora` for QAT + LoRA (merge-aware)."""
    cfg = resolve(config)
    targets = target_linears(model, cfg.exclude)
    if not targets:
        raise ConfigError(f"QAT found no linear layers to quantize in {type(model).__name__} (exclude={cfg.exclude})")
    gguf_types = None
    if cfg.weight is not None and cfg.weight.dtype == "gguf":  # each layer: its tensor's type in the GGUF file
        gguf_types = gguf.layer_types(model, targets, cfg)
    gen = torch.Generator().manual_seed(0)  # rotations: random signs / odd factors, the same on every prepare
    shared: dict = {}
    for name, m in targets:
        wfq = afq = None
        rot = _rotation(m, name, cfg, gen, shared)
        if cfg.weight is not None:
            if is_lora_layer(m):
                check_mergeable(m, name)
            learned = cfg.weight.range in ("learned", "learned_clip")  # initialized from the (rotated) weight
            w = (effective_weight(m) if rot is None else rot.layer_weight(m)) if learned else None
            wcfg = cfg.weight if gguf_types is None else dataclasses.replace(cfg.weight, ggml_type=gguf_types[id(m)][0])
            cls = ClippedFakeQuantizer if cfg.weight.range == "learned_clip" else FakeQuantizer
            wfq = cls.from_config(wcfg, "weight", weight=w, weight_dtype=weight_dtype(m))
            if gguf_types is not None:
                wfq.gguf_layout = gguf_types[id(m)][1]
                gguf.roundtrip(torch.zeros(1, base_linear(m).in_features), wcfg.ggml_type)  # rows split into blocks
            elif w is None:  # fail at prepare, not mid-training, on a group size that does not divide
                as_rows(torch.empty(base_linear(m).out_features, base_linear(m).in_features, device="meta"),
                        cfg.weight)
        if cfg.activation is not None:
            afq = FakeQuantizer.from_config(cfg.activation, "activation")
        attach(m, weight_fq=wfq, input_fq=afq)
        if rot is not None:
            m.lowbit_rotation = rot
    if cfg.kv is not None:
        if cfg.kv_position == "pre_rope":
            n = 0
            for name, m in model.named_modules():
                if name.endswith(("k_proj", "v_proj")) and (is_lora_layer(m) or isinstance(m, nn.Linear)) \
                        and not any(name.startswith(t + ".") for t, _ in targets):
                    attach(m, output_fq=FakeQuantizer.from_config(cfg.kv, "kv"))
                    n += 1
            if n == 0:
                raise ConfigError("kv_position: pre_rope found no k_proj/v_proj layers; use kv_position: post_rope")
        else:
            kv.install(model, lambda: FakeQuantizer.from_config(cfg.kv, "kv"))
            if cfg.rotation == "hadamard":
                rotate.install_kv(model, kv.attention_modules(model), gen)
    if cfg.gguf_file_type:  # frozen embedding / output: computed with what the file will hold
        gguf.quantize_frozen(model, cfg.gguf_file_type, targets)
    model.lowbit_qat_config = cfg
    return model


def _rotation(m: nn.Module, name: str, cfg: QATConfig, gen: torch.Generator, shared: dict):
    """One Rotation per (parent module, input size): q/k/v and gate/up read one tensor, rotated once."""
    if cfg.rotation == "none":
        return None
    base = base_linear(m)
    key = (name.rpartition(".")[0], base.in_features)
    if key not in shared:
        device = next(iter([*base.parameters(), *base.buffers()])).device
        shared[key] = rotate.Rotation(base.in_features, gen).to(device)
    return shared[key]


def quantizers(model: nn.Module) -> list[FakeQuantizer]:
    return [m for m in model.modules() if isinstance(m, FakeQuantizer)]


def set_step(model: nn.Module, step: int) -> None:
    """Tell every quantizer the optimizer step (each is the identity before its start_step)."""
    for q in quantizers(model):
        q.step = step


@contextlib.contextmanager
def calibrate(model: nn.Module):
    """`with calibrate(model): model(batch) ...` records static activation ranges."""
    static = [q for q in quantizers(model) if hasattr(q, "lo")]
    saved = [(q.cfg.enabled, q.step) for q in static]
    for q in static:
        q.observing = True
    try:
        with torch.no_grad():
            yield model
    finally:
        for q, _ in zip(static, saved):
            q.observing = False


@torch.no_grad()
def convert(model: nn.Module, config=None) -> nn.Module:
    """Replace every fake-quantized linear by its deployment form, in place; returns the plain
    (non-peft) model. Weight formats: int/fp → `QuantizedLinear`; nf4 → `Linear4bit`
    (bitsandbytes layout). LoRA is merged first, exactly as the prepared forward merged it.
    Activation and KV quantizers stay: they quantize at run time in deployment too."""
    cfg = resolve(config) if config is not None else getattr(model, "lowbit_qat_config", None)
    if cfg is None:
        raise ConfigError("convert needs the QAT config: pass it, or call it on a model from lowbit.methods.qat.prepare")
    for name, m in [(n, m) for n, m in model.named_modules() if isinstance(m, QATLinearMixin)]:
        fw = m.lowbit_weight_fq
        new = _deployed(m, fw)
        if new is not m:
            new.lowbit_input_fq, new.lowbit_output_fq = m.lowbit_input_fq, m.lowbit_output_fq
            new.lowbit_rotation = getattr(m, "lowbit_rotation", None)
            set_module(model, name, new)
    model = unwrap_peft(model)
    model.lowbit_qat_config = cfg
    return model


def _deployed(m: nn.Module, fw) -> nn.Module:
    base = base_linear(m)
    bias = base.bias
    cd = compute_dtype(m)
    if fw is None:
        if not is_lora_layer(m):
            return m  # weights stay as they are; only activations/KV are quantized
        new = nn.Linear(base.in_features, base.out_features, bias is not None, dtype=weight_dtype(m))
        new.weight.data.copy_(effective_weight(m))
        if bias is not None:
            new.bias.data.copy_(bias)
        attach(new)
        return new
    fw.step = max(fw.step, fw.cfg.start_step)  # deployment always quantizes
    w = effective_weight(m)
    if fw.cfg.dtype == "gguf":  # the weights the GGUF file decodes to; export needs gguf.save_dense of the prepared model
        new = nn.Linear(base.in_features, base.out_features, bias is not None, dtype=cd)
        new.weight.data.copy_(fw(w, out_dtype=cd))
        if bias is not None:
            new.bias.data.copy_(bias.to(cd))
        attach(new)
        return new
    if fw.cfg.dtype == "nf4":
        new = Linear4bit(nf4_quantize(w, fw.cfg, weight_dtype(m)), bias, cd)
        attach(new)
        return new
    q, scale, zero = fw.quantize(rotate.layer_weight(m))  # codes of W·Rᵀ when the input is rotated
    return QuantizedLinear.from_quantized(q, scale, zero, fw.cfg, tuple(w.shape), bias, cd)


def unprepare(model: nn.Module) -> nn.Module:
    """Remove every fake quantizer (back to the original modules)."""
    for m in list(model.modules()):
        detach(m)
        m.__dict__.pop("_lowbit_rotated_base", None)
    gguf.restore_frozen(model)
    kv.uninstall(model)
    model.__dict__.pop("lowbit_qat_config", None)
    return model


__all__ = ["QATConfig", "calibrate", "convert", "prepare", "quantizers", "set_step", "target_linears", "unprepare"]
