"""LoftQ on a whole model: build or requantize the 4-bit base, then hand the factors to the adapters.

  * `loftq_requantize(model, path, ...)`: in place on a model `load_model(path)` built: the dense
    weights are streamed again one at a time (peak RAM ≈ 4-bit model + one layer).
  * `loftq_calibrated(model, tok, path, text_file, ...)`: the same, activation-aware.
  * `loftq_load_model(path, ...)` / `loftq_quantize_model(model, ...)`: build the base from a
    checkpoint (through the streaming loader's `quantize_linear` hook) / an in-memory dense model
    (these also do intN bases, fake-quantized).
  * `apply_loftq(peft_model, result)`: copy the computed A/B into the peft adapters.
  * `loftq_init(path, r=, alpha=, ...)`: all of it → (peft model, tokenizer, result).
"""
from __future__ import annotations

import math
import time
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from lowbit.errors import ConfigError, InputError
from lowbit.format import Quantized4bit
from lowbit.methods.loftq.algorithm import LayerReport, LoftQResult, loftq_weight, new_result
from lowbit.methods.loftq.calibration import Whitening, calibration_batches, input_moments, whitening
from lowbit.methods.loftq.quantizers import BaseQuantizer
from lowbit.models.load import _release_freed_memory, _weight_files, as_dtype, load_4bit_weights, load_model
from lowbit.modules.linear4bit import Linear4bit
from lowbit.modules.lora import add_lora, lora_target_names, prepare_for_kbit_training
from lowbit.utils.modules import matches_module, set_module
from lowbit.utils.safetensors_stream import iter_tensors


def _base_linear(state, bias, compute_dtype, storage_dtype) -> nn.Module:
    """The module that holds a LoftQ base weight: `Linear4bit`, or for uniform intN a dense Linear
    holding the fake-quantized weight (there is no packed intN module)."""
    if isinstance(state, Quantized4bit):
        q = state if storage_dtype == torch.uint8 else state.with_storage(storage_dtype)
        return Linear4bit(q, bias, compute_dtype)
    w = state.dequantize(compute_dtype)
    new = nn.Linear(w.shape[1], w.shape[0], bias=bias is not None, dtype=compute_dtype)
    new.weight = nn.Parameter(w, requires_grad=False)
    if bias is not None:
        new.bias = nn.Parameter(bias.detach().to(compute_dtype), requires_grad=False)
    return new


def _one_layer(result: LoftQResult, quantizer: BaseQuantizer, name: str, w, lora_targets, kw, bar):
    """The base state for one weight: LoftQ where LoRA will adapt it, plain quantization elsewhere."""
    t0 = time.perf_counter()
    if name not in lora_targets:  # quantized but not adapted: nothing to compensate with
        state, _ = quantizer(w)
        return state.to("cpu") if hasattr(state, "to") else state
    state, A, B, errors, best = loftq_weight(w, quantizer, result.r, result.scaling, result.iters, result.svd, **kw)
    result.lora[name] = None if A is None else (A, B)  # None: zero-init was best, keep peft's init
    rep = LayerReport(name, tuple(w.shape), errors, best, time.perf_counter() - t0,
                      "weight" if kw.get("whiten") is None else "activation")
    result.layers.append(rep)
    if bar is not None:
        bar.set_postfix(err=f"{rep.zero_init_error:.4f}->{rep.final_error:.4f}")
    return state


def _record(model, result: LoftQResult) -> None:
    model.config.lowbit_loftq = {k: v for k, v in result.summary().items() if k != "seconds"}


def loftq_quantize_model(model: nn.Module, *, r: int = 16, alpha: float = 32, use_rslora: bool = False,
                         target_modules="all-linear", iters: int = 5, svd: str = "full", quant_type: str = "nf4",
                         blocksize: int = 64, double_quant: bool = True, compute_dtype=torch.bfloat16,
                         storage_dtype=torch.uint8, skip_modules=("lm_head",), device=None, progress: bool = True,
                         oversample: int = 8, niter: int = 4) -> LoftQResult:
    """LoftQ every Linear of an in-memory dense model, replacing it in place (one layer at a time)."""
    quantizer = BaseQuantizer(quant_type, blocksize, double_quant)
    compute_dtype, storage_dtype = as_dtype(compute_dtype), as_dtype(storage_dtype)
    lora_targets = lora_target_names(model, target_modules, skip_modules)
    names = sorted(n for n, m in model.named_modules() if type(m) is nn.Linear and not matches_module(n, skip_modules))
    result = new_result(r, alpha, use_rslora, iters, svd, quantizer)
    t0 = time.perf_counter()
    bar = tqdm(names, desc=f"LoftQ r={r} T={iters}", unit="layer", disable=not progress)
    for name in bar:
        lin = model.get_submodule(name)
        state = _one_layer(result, quantizer, name, lin.weight.detach(), lora_targets,
                           dict(oversample=oversample, niter=niter, device=device), bar)
        set_module(model, name, _base_linear(state, lin.bias, compute_dtype, storage_dtype))
        del lin
    result.seconds = time.perf_counter() - t0
    if quantizer.is_4bit_format:
        model.config.lowbit_quantization = dict(
            quant_type=quant_type, blocksize=blocksize, double_quant=double_quant,
            storage_dtype=str(storage_dtype).removeprefix("torch."),
            compute_dtype=str(compute_dtype).removeprefix("torch."), skip_modules=list(skip_modules))
    _record(model, result)
    return result


def loftq_load_model(path, *, r: int = 16, alpha: float = 32, use_rslora: bool = False, target_modules="all-linear",
                     iters: int = 5, svd: str = "full", quant_type: str = "nf4", blocksize: int = 64,
                     double_quant: bool = True, compute_dtype="bfloat16", storage_dtype="uint8",
                     skip_modules=("lm_head",), keep_embeddings_in_compute_dtype: bool = True, device=None,
                     trust_remote_code: bool = False, progress: bool = True, oversample: int = 8, niter: int = 4):
    """Stream an HF safetensors checkpoint into the base with LoftQ → (model, tokenizer, LoftQResult).

    The streaming loader builds the model; its `quantize_linear` hook runs LoftQ on each Linear
    weight as it is read, so the dense model is never in memory.
    """
    from transformers import AutoTokenizer
    quantizer = BaseQuantizer(quant_type, blocksize, double_quant)
    compute_dtype, storage_dtype = as_dtype(compute_dtype), as_dtype(storage_dtype)
    result = new_result(r, alpha, use_rslora, iters, svd, quantizer)
    kw = dict(oversample=oversample, niter=niter, device=device)
    lora_targets: set[str] | None = None
    bar = tqdm(desc=f"LoftQ r={r} T={iters}", unit="layer", disable=not progress)

    def quantize_linear(model, name, w, old):
        nonlocal lora_targets
        if lora_targets is None:  # resolved on the skeleton, as add_lora will resolve them on the loaded model
            lora_targets = lora_target_names(model, target_modules, skip_modules)
        bar.update(1)
        bias = None if old.bias is None or old.bias.device.type == "meta" else old.bias.data
        return _base_linear(_one_layer(result, quantizer, name, w, lora_targets, kw, bar), bias, compute_dtype,
                            storage_dtype)

    t0 = time.perf_counter()
    model = load_4bit_weights(path, quant_type=quant_type if quantizer.is_4bit_format else "nf4",
                              blocksize=blocksize if quantizer.is_4bit_format else 64, double_quant=double_quant,
                              storage_dtype=storage_dtype, compute_dtype=compute_dtype, skip_modules=skip_modules,
                              keep_embeddings_in_compute_dtype=keep_embeddings_in_compute_dtype,
                              trust_remote_code=trust_remote_code, progress=False, quantize_linear=quantize_linear)
    bar.close()
    result.seconds = time.perf_counter() - t0
    if not quantizer.is_4bit_format:
        model.config.lowbit_quantization = None  # a dense, fake-quantized base
    _record(model, result)
    return model, AutoTokenizer.from_pretrained(Path(path), trust_remote_code=trust_remote_code), result


def apply_loftq(peft_model, result: LoftQResult, adapter_name: str = "default") -> int:
    """Copy LoftQ's A/B into the peft adapters; refuses a peft config whose r/scaling differ."""
    n = 0
    prefix = "base_model.model."
    for full, mod in peft_model.named_modules():
        if not (hasattr(mod, "lora_A") and adapter_name in getattr(mod, "lora_A", {})):
            continue
        name = full.removeprefix(prefix)
        if name not in result.lora:
            raise ConfigError(f"LoRA layer {name} has no LoftQ initialization; run LoftQ with the same "
                              "lora.target_modules as add_lora")
        if mod.r[adapter_name] != result.r or not math.isclose(mod.scaling[adapter_name], result.scaling):
            raise ConfigError(f"peft adapter has r={mod.r[adapter_name]}, scaling={mod.scaling[adapter_name]} but "
                              f"LoftQ ran with r={result.r}, scaling={result.scaling}; use the same "
                              "lora.r/alpha/use_rslora")
        n += 1
        if result.lora[name] is None:  # plain quantization was already the best start: peft's zero-init B
            continue
        A, B = result.lora[name]
        la, lb = mod.lora_A[adapter_name].weight, mod.lora_B[adapter_name].weight
        with torch.no_grad():
            la.copy_(A.to(la.dtype))
            lb.copy_(B.to(lb.dtype))
    if n != len(result.lora):
        raise ConfigError(f"peft model has {n} LoRA layers but LoftQ computed {len(result.lora)}; "
                          "use the same lora.target_modules for both")
    return n


def _requantize_targets(model: nn.Module, target_modules, moments) -> tuple[dict, set[str]]:
    if hasattr(model, "get_base_model"):
        raise ConfigError("run LoftQ on the 4-bit model before add_lora (then apply_loftq to the peft model)")
    q4 = {n: m for n, m in model.named_modules() if isinstance(m, Linear4bit)}
    if not q4:
        raise ConfigError("LoftQ needs a 4-bit base: load the model with model.quant.load_in_4bit=true")
    targets = lora_target_names(model, target_modules) & set(q4)
    if not targets:
        raise ConfigError(f"lora.target_modules={target_modules!r} matches no 4-bit Linear; nothing for LoftQ to do")
    if moments is not None and set(moments) != targets:
        raise ConfigError("calibration moments were collected for other layers than the LoRA targets")
    return q4, targets


def loftq_requantize(model: nn.Module, path, *, r: int = 16, alpha: float = 32, use_rslora: bool = False,
                     target_modules="all-linear", iters: int = 5, svd: str = "lowrank", moments: dict | None = None,
                     damp: float = 0.01, device=None, progress: bool = True, oversample: int = 8,
                     niter: int = 4) -> LoftQResult:
    """LoftQ in place on a model `lowbit.models.load_model` built from checkpoint `path`.

    The dense weights are streamed from `path` again one tensor at a time and each adapted
    `Linear4bit` gets new bytes (same quant type/blocksize/double quant it was loaded with), so
    peak RAM is the 4-bit model plus one dense layer (plus the calibration moments, if any).
    `moments` (name → H from `input_moments`) switches to activation-aware LoftQ.
    """
    q4, targets = _requantize_targets(model, target_modules, moments)
    first = q4[min(targets)]
    # the exact settings the model was loaded with, so a LoftQ base is byte-compatible with training's
    quantizer = BaseQuantizer(first._meta["quant_type"], first._meta["blocksize"], first.nested_absmax is not None)
    result = new_result(r, alpha, use_rslora, iters, svd, quantizer)
    white: dict[int, Whitening] = {}  # per distinct H: q/k/v (gate/up) share one
    keys = {f"{n}.weight": n for n in targets}
    t0 = time.perf_counter()
    bar = tqdm(total=len(keys), desc=f"LoftQ r={r} T={iters}" + (" calibrated" if moments else ""), unit="layer",
               disable=not progress)
    for f in _weight_files(Path(path)):
        for key, w in iter_tensors(f, keys=set(keys)):
            name = keys.pop(key)
            mod = q4[name]
            if tuple(w.shape) != (mod.out_features, mod.in_features):
                raise InputError(f"checkpoint tensor {key} has shape {tuple(w.shape)}, the model expects "
                                 f"{(mod.out_features, mod.in_features)}; pass the checkpoint the model was "
                                 "loaded from")
            wh = None
            if moments is not None:
                H = moments[name]
                wh = white.get(id(H)) or white.setdefault(id(H), whitening(H, damp))
            state = _one_layer(result, quantizer, name, w, targets,
                               dict(oversample=oversample, niter=niter, device=device, whiten=wh), bar)
            dev = mod.weight.device
            mod._set_quant(state.to(dev) if mod.weight.dtype == torch.uint8
                           else state.to(dev).with_storage(mod.weight.dtype))
            bar.update(1)
            del w, state
            _release_freed_memory()
    bar.close()
    if keys:
        raise InputError(f"checkpoint {path} lacks {len(keys)} weights LoftQ needs, e.g. {sorted(keys)[:3]}")
    result.seconds = time.perf_counter() - t0
    _record(model, result)
    return result


def loftq_calibrated(model: nn.Module, tok, path, calibration, *, samples: int = 64, seq_len: int = 256,
                     damp: float = 0.01, progress: bool = True, **kw) -> LoftQResult:
    """Activation-aware LoftQ: collect H from `calibration` (a text file) on `model`, then `loftq_requantize`."""
    t0 = time.perf_counter()
    targets = lora_target_names(model, kw.get("target_modules", "all-linear"))
    ids = calibration_batches(tok, calibration, samples, seq_len)
    moments = input_moments(model, ids, targets, progress=progress)
    t_cal = time.perf_counter() - t0
    result = loftq_requantize(model, path, moments=moments, damp=damp, progress=progress, **kw)
    result.calibration = {"file": str(calibration), "samples": samples, "seq_len": seq_len, "damp": damp,
                          "tokens": int(ids.numel()), "seconds": round(t_cal, 2)}
    result.seconds += t_cal
    _record(model, result)
    return result


def loftq_init(path, *, r: int = 16, alpha: float = 32, dropout: float = 0.05, target_modules="all-linear",
               use_rslora: bool = False, iters: int = 5, svd: str = "full", quant_type: str = "nf4",
               blocksize: int = 64, double_quant: bool = True, compute_dtype="bfloat16", storage_dtype="uint8",
               skip_modules=("lm_head",), gradient_checkpointing: bool = False, device=None, progress: bool = True,
               calibration=None, calibration_samples: int = 64, calibration_seq_len: int = 256,
               damp: float = 0.01):
    """Load `path` with LoftQ and wrap it in LoRA adapters initialized from it → (peft_model, tok, result).

    `calibration` (a text file) selects activation-aware LoftQ (see `calibration`).
    """
    if quant_type not in ("nf4", "fp4"):
        raise ConfigError(f"a trainable 4-bit base needs quant_type nf4 or fp4, got {quant_type!r}; intN LoftQ is "
                          "available through loftq_quantize_model for fake-quantized dense bases")
    model, tok = load_model(path, quant_type=quant_type, blocksize=blocksize, double_quant=double_quant,
                            compute_dtype=compute_dtype, storage_dtype=storage_dtype, skip_modules=skip_modules,
                            progress=progress)
    kw = dict(r=r, alpha=alpha, use_rslora=use_rslora, target_modules=target_modules, iters=iters, svd=svd,
              device=device, progress=progress)
    if calibration is not None:
        result = loftq_calibrated(model, tok, path, calibration, samples=calibration_samples,
                                  seq_len=calibration_seq_len, damp=damp, **kw)
    else:
        result = loftq_requantize(model, path, **kw)
    prepare_for_kbit_training(model, gradient_checkpointing)
    pm = add_lora(model, r=r, alpha=alpha, dropout=dropout, target_modules=target_modules, use_rslora=use_rslora)
    apply_loftq(pm, result)
    return pm, tok, result
