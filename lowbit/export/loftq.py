"""LoftQ: start QLoRA from a quantized base + LoRA factors that together approximate the dense weight.

Per weight W, for T iterations (L_0 = 0):
    Q_t = quantize(W - L_{t-1})                  (the exact base quantizer training uses)
    L_t = rank-r SVD of (W - deq(Q_t))
and the adapter is set so that peft's delta s·B·A equals L_t, with s = alpha/r (alpha/sqrt(r)
for rsLoRA): B = U·sqrt(S)/sqrt(s), A = sqrt(S)·Vh/sqrt(s). peft's own LoftQ ignores s (it is
only right for alpha == r) and runs on CUDA only; this works for any alpha, on CPU or GPU.

Calibrated (activation-aware) LoftQ replaces the SVD by one of (W - deq(Q_t))·H^{1/2}, H the
layer's input second moment on calibration text, un-whitened by H^{-1/2}: it minimises the
layer's output error instead of its weight error (see `loftq_calibration`).

Errors are ‖W − deq(Q) − s·B·A‖_F / ‖W‖_F (calibrated: ‖(…)·H^{1/2}‖_F / ‖W·H^{1/2}‖_F).
Entry 0 is plain quantization with B = 0 (zero-init QLoRA); the iterate with the lowest error is kept.

Entry points:
  * `loftq_requantize(model, path, ...)`: in place on a model `load_model(path)` built: the dense
    weights are streamed again one at a time (peak RAM ≈ 4-bit model + one layer).
  * `loftq_calibrated(model, tok, path, text_file, ...)`: the same, activation-aware.
  * `loftq_load_model(path, ...)` / `loftq_quantize_model(model, ...)`: build the base from a
    checkpoint / an in-memory dense model (these also do intN bases, fake-quantized).
  * `apply_loftq(peft_model, result)`: copy the computed A/B into the peft adapters.
  * `loftq_init(path, r=, alpha=, ...)`: all of it → (peft model, tokenizer, result).
  * `loftq_for_run(...)`: the trainer's `lora.init: loftq` (saves base + report, reuses on resume).
  * `save_loftq_base` / `load_loftq_base` / `check_loftq_base`: the LoftQ base differs from
    quantize(W), so merge and reload need it (`loftq_base.safetensors`, hashed in lowbit_run.json).
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..errors import ConfigError, InputError
from .loftq_calibration import Whitening, lapack_threads
from .quantizers import BaseQuantizer

LOFTQ_BASE_FILE = "loftq_base.safetensors"
SVD_METHODS = ("full", "lowrank")


def lora_scaling(r: int, alpha: float, use_rslora: bool = False) -> float:
    """peft's scaling: alpha/r, or alpha/sqrt(r) with rsLoRA."""
    if r <= 0:
        raise ConfigError(f"lora.r must be a positive integer, got {r}")
    return alpha / math.sqrt(r) if use_rslora else alpha / r


def _rank_r(res: torch.Tensor, r: int, svd: str, oversample: int, niter: int):
    if svd == "full":
        U, S, Vh = torch.linalg.svd(res, full_matrices=False)
        return U[:, :r], S[:r], Vh[:r]
    # randomized range finder: ~50x faster than full SVD on a 2048x640 weight at r=16
    q = min(r + oversample, *res.shape)
    U, S, V = torch.svd_lowrank(res, q=q, niter=niter)
    return U[:, :r], S[:r], V[:, :r].T


@dataclass
class LayerReport:
    name: str
    shape: tuple[int, int]
    errors: list[float]          # [zero-init, after iter 1, ..., after iter T]
    best_iter: int
    seconds: float
    metric: str = "weight"       # weight: ‖E‖/‖W‖; activation: ‖E·H^½‖/‖W·H^½‖ (calibrated)

    @property
    def zero_init_error(self) -> float:
        return self.errors[0]

    @property
    def final_error(self) -> float:
        return self.errors[self.best_iter]

    def as_dict(self) -> dict:
        return {"name": self.name, "shape": list(self.shape), "metric": self.metric, "errors": self.errors,
                "best_iter": self.best_iter, "zero_init_error": self.zero_init_error, "loftq_error": self.final_error,
                "seconds": self.seconds}


def loftq_weight(w: torch.Tensor, quantizer: BaseQuantizer, r: int, scaling: float, iters: int = 5,
                 svd: str = "full", oversample: int = 8, niter: int = 4, device=None, whiten: Whitening | None = None):
    """LoftQ on one weight → (quant state, A (r, in) fp32, B (out, r) fp32, errors, best iteration).

    `w` keeps its dtype for quantization (so the base bytes match a plain load of that
    checkpoint); residuals and SVD run in fp32 on `device` (default: w's device).
    With `whiten` (R = H^{1/2} of the layer's inputs) the low-rank step minimises the output
    error ‖(W − deq(Q) − sBA)·R‖ instead of the weight error, and `errors` are in that metric.
    """
    if iters < 1:
        raise ConfigError(f"LoftQ needs at least 1 iteration, got {iters}")
    if svd not in SVD_METHODS:
        raise ConfigError(f"loftq svd {svd!r} unknown; choose one of {', '.join(SVD_METHODS)}")
    if w.dim() != 2:
        raise ConfigError(f"LoftQ works on 2-D Linear weights, got shape {tuple(w.shape)}")
    if r > min(w.shape):
        raise ConfigError(f"lora.r={r} exceeds min(shape)={min(w.shape)} of a {tuple(w.shape)} weight; lower lora.r")
    device = torch.device(device) if device is not None else w.device
    w = w.to(device)
    w32 = w.float()
    R = Rinv = None
    if whiten is not None:
        if whiten.sqrt.shape != (w.shape[1], w.shape[1]):
            raise ConfigError(f"calibration moment of shape {tuple(whiten.sqrt.shape)} does not fit a weight of "
                              f"shape {tuple(w.shape)}")
        R, Rinv = whiten.sqrt.to(device), whiten.inv_sqrt.to(device)
    metric = (lambda e: e) if R is None else (lambda e: e @ R)  # noqa: E731
    norm = metric(w32).norm().clamp_min(1e-30)
    state, deq = quantizer(w)
    errors = [(metric(w32 - deq).norm() / norm).item()]
    best = (state, None, None)
    low = torch.zeros_like(w32)
    for _ in range(iters):
        if len(errors) > 1:  # iteration 1 reuses quantize(W) from the zero-init error above
            state, deq = quantizer((w32 - low).to(w.dtype))
        res = w32 - deq
        m = metric(res)
        with lapack_threads(device):
            U, S, Vh = _rank_r(m, r, svd, oversample, niter)
        if Rinv is not None:
            Vh = Vh @ Rinv  # un-whiten: the rank-r term of res·R, mapped back to weight space
        sq = S.sqrt() / math.sqrt(scaling)  # peft applies s·B·A: each factor carries 1/√s
        B, A = U * sq, sq[:, None] * Vh
        low = scaling * (B @ A)
        errors.append((metric(res - low).norm() / norm).item())
        if errors[-1] <= min(errors[:-1]):
            best = (state, A, B)
    best_iter = min(range(len(errors)), key=errors.__getitem__)
    state, A, B = best
    cpu = lambda t: None if t is None else t.cpu()  # noqa: E731
    if hasattr(state, "to"):
        state = state.to("cpu")
    return state, cpu(A), cpu(B), errors, best_iter


@dataclass
class LoftQResult:
    r: int
    alpha: float
    use_rslora: bool
    scaling: float
    iters: int
    svd: str
    quant_type: str
    blocksize: int
    double_quant: bool
    lora: dict[str, tuple[torch.Tensor, torch.Tensor] | None] = field(default_factory=dict)  # module -> (A, B)
    layers: list[LayerReport] = field(default_factory=list)
    seconds: float = 0.0
    calibration: dict | None = None  # file, samples, seq_len, damp, seconds (activation-aware LoftQ)

    def summary(self) -> dict:
        def rel_sum(key):  # energy-weighted over layers: Σ err² ‖W‖² would need norms; use mean
            return sum(getattr(l, key) for l in self.layers) / max(len(self.layers), 1)
        return {"r": self.r, "alpha": self.alpha, "use_rslora": self.use_rslora, "scaling": self.scaling,
                "iters": self.iters, "svd": self.svd, "quant_type": self.quant_type, "blocksize": self.blocksize,
                "double_quant": self.double_quant, "layers": len(self.layers), "seconds": self.seconds,
                "calibration": self.calibration, "metric": "activation" if self.calibration else "weight",
                "mean_zero_init_error": rel_sum("zero_init_error"), "mean_loftq_error": rel_sum("final_error")}

    def report(self) -> dict:
        return {**self.summary(), "per_layer": [l.as_dict() for l in self.layers]}


def _lora_targets(model: nn.Module, target_modules, skip_modules) -> set[str]:
    """Full names of the Linear layers LoRA will wrap (the same resolution add_lora uses)."""
    import re

    from ..modules.lora import resolve_target_modules
    resolved = resolve_target_modules(model, target_modules)
    out = set()
    for name, mod in model.named_modules():
        if not isinstance(mod, nn.Linear) or any(name == s or name.endswith("." + s) for s in skip_modules):
            continue
        leaf = name.rsplit(".", 1)[-1]
        if (isinstance(resolved, str) and re.fullmatch(resolved, name)) or \
                (not isinstance(resolved, str) and leaf in resolved):
            out.add(name)
    return out


def _new_result(r, alpha, use_rslora, iters, svd, quantizer) -> LoftQResult:
    return LoftQResult(r=r, alpha=alpha, use_rslora=use_rslora, scaling=lora_scaling(r, alpha, use_rslora),
                       iters=iters, svd=svd, quant_type=quantizer.quant_type, blocksize=quantizer.blocksize,
                       double_quant=quantizer.double_quant)


def _replace_linear(model: nn.Module, name: str, state, bias, compute_dtype, storage_dtype) -> None:
    from ..format import Quantized4bit
    from ..models.load import _set_module
    from ..modules.linear4bit import Linear4bit
    if isinstance(state, Quantized4bit):
        q = state if storage_dtype == torch.uint8 else state.with_storage(storage_dtype)
        new = Linear4bit(q, bias, compute_dtype)
    else:  # uniform intN: a dense Linear holding the fake-quantized weight (there is no packed intN module)
        w = state.dequantize(compute_dtype)
        new = nn.Linear(w.shape[1], w.shape[0], bias=bias is not None, dtype=compute_dtype)
        new.weight = nn.Parameter(w, requires_grad=False)
        if bias is not None:
            new.bias = nn.Parameter(bias.detach().to(compute_dtype), requires_grad=False)
    _set_module(model, name, new)


def _one_layer(result, quantizer, name, w, lora_targets, kw, bar):
    t0 = time.perf_counter()
    if name in lora_targets:
        state, A, B, errors, best = loftq_weight(w, quantizer, result.r, result.scaling, result.iters, result.svd, **kw)
        result.lora[name] = None if A is None else (A, B)  # None: zero-init was best, keep peft's init
        result.layers.append(LayerReport(name, tuple(w.shape), errors, best, time.perf_counter() - t0,
                                         "weight" if kw.get("whiten") is None else "activation"))
    else:  # quantized but not adapted: nothing to compensate with
        state, _ = quantizer(w)
        if hasattr(state, "to"):
            state = state.to("cpu")
    if bar is not None:
        rep = result.layers[-1] if result.layers and result.layers[-1].name == name else None
        if rep:
            bar.set_postfix(err=f"{rep.zero_init_error:.4f}->{rep.final_error:.4f}")
    return state


def loftq_quantize_model(model: nn.Module, *, r: int = 16, alpha: float = 32, use_rslora: bool = False,
                         target_modules="all-linear", iters: int = 5, svd: str = "full", quant_type: str = "nf4",
                         blocksize: int = 64, double_quant: bool = True, compute_dtype=torch.bfloat16,
                         storage_dtype=torch.uint8, skip_modules=("lm_head",), device=None, progress: bool = True,
                         oversample: int = 8, niter: int = 4) -> LoftQResult:
    """LoftQ every Linear of an in-memory dense model, replacing it in place (one layer at a time)."""
    from tqdm.auto import tqdm

    from ..models.load import as_dtype
    quantizer = BaseQuantizer(quant_type, blocksize, double_quant)
    compute_dtype, storage_dtype = as_dtype(compute_dtype), as_dtype(storage_dtype)
    lora_targets = _lora_targets(model, target_modules, skip_modules)
    names = sorted(n for n, m in model.named_modules() if isinstance(m, nn.Linear) and type(m) is nn.Linear
                   and not any(n == s or n.endswith("." + s) for s in skip_modules))
    result = _new_result(r, alpha, use_rslora, iters, svd, quantizer)
    t0 = time.perf_counter()
    bar = tqdm(names, desc=f"LoftQ r={r} T={iters}", unit="layer", disable=not progress)
    for name in bar:
        lin = model.get_submodule(name)
        state = _one_layer(result, quantizer, name, lin.weight.detach(), lora_targets,
                           dict(oversample=oversample, niter=niter, device=device), bar)
        _replace_linear(model, name, state, lin.bias, compute_dtype, storage_dtype)
        del lin
    result.seconds = time.perf_counter() - t0
    _record(model, result, skip_modules, storage_dtype, compute_dtype)
    return result


def _record(model, result: LoftQResult, skip_modules, storage_dtype, compute_dtype) -> None:
    if result.quant_type in ("nf4", "fp4"):
        model.config.lowbit_quantization = dict(
            quant_type=result.quant_type, blocksize=result.blocksize, double_quant=result.double_quant,
            storage_dtype=str(storage_dtype).removeprefix("torch."),
            compute_dtype=str(compute_dtype).removeprefix("torch."), skip_modules=list(skip_modules))
    model.config.lowbit_loftq = {k: v for k, v in result.summary().items() if k != "seconds"}


def loftq_load_model(path, *, r: int = 16, alpha: float = 32, use_rslora: bool = False, target_modules="all-linear",
                     iters: int = 5, svd: str = "full", quant_type: str = "nf4", blocksize: int = 64,
                     double_quant: bool = True, compute_dtype="bfloat16", storage_dtype="uint8",
                     skip_modules=("lm_head",), keep_embeddings_in_compute_dtype: bool = True, device=None,
                     trust_remote_code: bool = False, progress: bool = True, oversample: int = 8, niter: int = 4):
    """Stream an HF safetensors checkpoint into the 4-bit base with LoftQ → (model, tokenizer, LoftQResult).

    Mirrors `lowbit.models.load_4bit_weights` (same skeleton, same byte layout) but each
    Linear weight goes through LoftQ as it is read, so the dense model is never in memory.
    """
    from accelerate import init_empty_weights
    from tqdm.auto import tqdm
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ..models.load import (_read_config, _release_freed_memory, _set_tensor, _targets, _weight_files, as_dtype)
    from ..models.safetensors_stream import iter_tensors, tensor_names
    quantizer = BaseQuantizer(quant_type, blocksize, double_quant)
    path = Path(path)
    cfg = _read_config(path, trust_remote_code)
    compute_dtype, storage_dtype = as_dtype(compute_dtype), as_dtype(storage_dtype)
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(cfg, dtype=compute_dtype, trust_remote_code=trust_remote_code)
    targets = _targets(model, skip_modules)
    lora_targets = _lora_targets(model, target_modules, skip_modules)
    expected = dict(model.state_dict(keep_vars=True))
    result = _new_result(r, alpha, use_rslora, iters, svd, quantizer)
    files = _weight_files(path)
    bar = tqdm(total=sum(len(tensor_names(f)) for f in files), desc=f"LoftQ r={r} T={iters}", unit="tensor",
               disable=not progress)
    t0 = time.perf_counter()
    for f in files:
        for key, t in iter_tensors(f):
            bar.update(1)
            if key not in expected:
                continue
            mod_name, _, leaf = key.rpartition(".")
            if mod_name in targets and leaf == "weight":
                old = model.get_submodule(mod_name)
                if tuple(t.shape) != (old.out_features, old.in_features):
                    raise InputError(f"checkpoint tensor {key} has shape {tuple(t.shape)}, the model expects "
                                     f"{(old.out_features, old.in_features)}")
                state = _one_layer(result, quantizer, mod_name, t, lora_targets,
                                   dict(oversample=oversample, niter=niter, device=device), bar)
                bias = None if old.bias is None or old.bias.device.type == "meta" else old.bias.data
                _replace_linear(model, mod_name, state, bias, compute_dtype, storage_dtype)
                del t, state
                _release_freed_memory()
            else:
                _set_tensor(model, key, t.to(compute_dtype) if keep_embeddings_in_compute_dtype else t)
    bar.close()
    result.seconds = time.perf_counter() - t0
    if getattr(cfg, "tie_word_embeddings", False):
        model.tie_weights()
    missing = [k for k, p in model.named_parameters() if p.device.type == "meta"]
    if missing:
        raise InputError(f"checkpoint {path} lacks {len(missing)} tensors the model needs, e.g. {missing[:3]}")
    model.eval()
    _record(model, result, skip_modules, storage_dtype, compute_dtype)
    return model, AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code), result


def apply_loftq(peft_model, result: LoftQResult, adapter_name: str = "default") -> int:
    """Copy LoftQ's A/B into the peft adapters; refuses a peft config whose r/scaling differ."""
    n = 0
    base = peft_model.get_base_model()
    prefix_len = len("base_model.model.")
    for full, mod in peft_model.named_modules():
        if not (hasattr(mod, "lora_A") and adapter_name in getattr(mod, "lora_A", {})):
            continue
        name = full[prefix_len:] if full.startswith("base_model.model.") else full
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
    del base
    return n


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
    from tqdm.auto import tqdm

    from ..models.load import _release_freed_memory, _weight_files
    from ..models.safetensors_stream import iter_tensors
    from ..modules.linear4bit import Linear4bit
    from .loftq_calibration import whitening
    if hasattr(model, "get_base_model"):
        raise ConfigError("run LoftQ on the 4-bit model before add_lora (then apply_loftq to the peft model)")
    q4 = {n: m for n, m in model.named_modules() if isinstance(m, Linear4bit)}
    if not q4:
        raise ConfigError("LoftQ needs a 4-bit base: load the model with model.quant.load_in_4bit=true")
    targets = _lora_targets(model, target_modules, ()) & set(q4)
    if not targets:
        raise ConfigError(f"lora.target_modules={target_modules!r} matches no 4-bit Linear; nothing for LoftQ to do")
    if moments is not None and set(moments) != targets:
        raise ConfigError("calibration moments were collected for other layers than the LoRA targets")
    first = q4[min(targets)]
    # the exact settings the model was loaded with, so a LoftQ base is byte-compatible with training's
    quantizer = BaseQuantizer(first._meta["quant_type"], first._meta["blocksize"], first.nested_absmax is not None)
    result = _new_result(r, alpha, use_rslora, iters, svd, quantizer)
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
    model.config.lowbit_loftq = {k: v for k, v in result.summary().items() if k != "seconds"}
    return result


def loftq_calibrated(model: nn.Module, tok, path, calibration, *, samples: int = 64, seq_len: int = 256,
                     damp: float = 0.01, progress: bool = True, **kw) -> LoftQResult:
    """Activation-aware LoftQ: collect H from `calibration` (a text file) on `model`, then `loftq_requantize`."""
    from .loftq_calibration import calibration_batches, input_moments
    t0 = time.perf_counter()
    targets = _lora_targets(model, kw.get("target_modules", "all-linear"), ())
    ids = calibration_batches(tok, calibration, samples, seq_len)
    moments = input_moments(model, ids, targets, progress=progress)
    t_cal = time.perf_counter() - t0
    result = loftq_requantize(model, path, moments=moments, damp=damp, progress=progress, **kw)
    result.calibration = {"file": str(calibration), "samples": samples, "seq_len": seq_len, "damp": damp,
                          "tokens": int(ids.numel()), "seconds": round(t_cal, 2)}
    result.seconds += t_cal
    model.config.lowbit_loftq = {k: v for k, v in result.summary().items() if k != "seconds"}
    return result


def loftq_init(path, *, r: int = 16, alpha: float = 32, dropout: float = 0.05, target_modules="all-linear",
               use_rslora: bool = False, iters: int = 5, svd: str = "full", quant_type: str = "nf4",
               blocksize: int = 64, double_quant: bool = True, compute_dtype="bfloat16", storage_dtype="uint8",
               skip_modules=("lm_head",), gradient_checkpointing: bool = False, device=None, progress: bool = True,
               calibration=None, calibration_samples: int = 64, calibration_seq_len: int = 256,
               damp: float = 0.01):
    """Load `path` with LoftQ and wrap it in LoRA adapters initialized from it → (peft_model, tok, result).

    `calibration` (a text file) selects activation-aware LoftQ (see `loftq_calibration`).
    """
    from ..models import load_model
    from ..modules.lora import add_lora, prepare_for_kbit_training
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


def save_loftq_base(model: nn.Module, path, overwrite: bool = True) -> Path:
    """Write every `Linear4bit` of `model` (bitsandbytes layout) to one safetensors file.

    The keys are the model's own (`model.layers.0.self_attn.q_proj.weight...`); a peft model
    is unwrapped first.
    """
    from ..modules.linear4bit import Linear4bit
    from ..utils.io import save_safetensors
    if hasattr(model, "get_base_model"):
        model = model.get_base_model()
    sd = {}
    for name, mod in model.named_modules():
        if isinstance(mod, Linear4bit):  # under peft the layer sits at <module>.base_layer
            sd.update(mod.quant.state_dict(f"{name.removesuffix('.base_layer')}.weight"))
    if not sd:
        raise ConfigError("model has no 4-bit Linear layers to save; load it with lowbit (load_in_4bit=True)")
    from .bnb4bit import unshare
    sd = unshare(sd)
    path = Path(path)
    save_safetensors(sd, path, metadata={"format": "lowbit.loftq_base"}, overwrite=overwrite)
    return path


def load_loftq_base(model: nn.Module, path) -> int:
    """Replace the 4-bit bytes of `model`'s `Linear4bit` layers with those saved by `save_loftq_base`."""
    from safetensors.torch import load_file

    from ..format import Quantized4bit
    from ..modules.linear4bit import Linear4bit
    if hasattr(model, "get_base_model"):
        model = model.get_base_model()
    sd = load_file(str(path))
    n = 0
    for name, mod in model.named_modules():
        if not isinstance(mod, Linear4bit):
            continue
        key = f"{name.removesuffix('.base_layer')}.weight"
        mine = {k: v for k, v in sd.items() if k == key or k.startswith(key + ".")}
        if not mine:
            raise InputError(f"{path} has no entry for {key}; it was saved from a different model")
        q = Quantized4bit.from_state_dict(mine, key)
        if tuple(q.shape) != (mod.out_features, mod.in_features):
            raise InputError(f"{path}: {key} has shape {q.shape}, the model expects "
                             f"{(mod.out_features, mod.in_features)}; it was saved from a different model")
        mod._set_quant(q.to(mod.weight.device) if mod.weight.dtype == torch.uint8
                       else q.to(mod.weight.device).with_storage(mod.weight.dtype))
        n += 1
    return n


LOFTQ_REPORT_FILE = "loftq_report.json"


def file_sha256(path) -> str:
    import hashlib
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


@dataclass
class RunLoftQ:
    """What the trainer needs from LoftQ: the factors to copy into the adapters (None when resuming
    from a checkpoint, which holds trained ones) and the record for lowbit_run.json."""

    result: LoftQResult | None
    record: dict


def loftq_for_run(model: nn.Module, tok, cfg, out, resuming: bool = False, progress: bool = True) -> RunLoftQ:
    """`lora.init: loftq` in the trainer: requantize the freshly loaded 4-bit `model` in place and save
    its base (`loftq_base.safetensors`, hashed into the record) and the per-layer error report in `out`.

    A resumed run reloads the saved base instead: its checkpoints were trained against those bytes.
    """
    import os

    from ..utils.io import write_json
    out = Path(out)
    lc, lq = cfg.lora, cfg.lora.loftq
    base_file = out / LOFTQ_BASE_FILE
    if resuming and base_file.exists():
        load_loftq_base(model, base_file)
        report = out / LOFTQ_REPORT_FILE
        summary = json.loads(report.read_text()) if report.exists() else {}
        summary = {k: v for k, v in summary.items() if k != "per_layer"}
        return RunLoftQ(None, {**summary, "base_file": LOFTQ_BASE_FILE, "base_sha256": file_sha256(base_file),
                               "reused_on_resume": True})
    if resuming:
        raise InputError(f"resuming a lora.init=loftq run needs the LoftQ base it trained on, {base_file}, which is "
                         "missing; start a fresh run (train.resume_from=none)")
    kw = dict(r=lc.r, alpha=lc.alpha, use_rslora=lc.use_rslora, target_modules=lc.target_modules, iters=lq.iters,
              svd=lq.svd, progress=progress)
    if lq.calibration:
        result = loftq_calibrated(model, tok, cfg.model.path, lq.calibration, samples=lq.calibration_samples,
                                  seq_len=lq.calibration_seq_len, damp=lq.damp, **kw)
    else:
        result = loftq_requantize(model, cfg.model.path, **kw)
    s = result.summary()
    print(f"LoftQ ({s['metric']} error, {s['layers']} layers, {result.seconds:.1f} s): mean error "
          f"{s['mean_zero_init_error']:.4f} (zero init) -> {s['mean_loftq_error']:.4f}", flush=True)
    s["peak_rss_mb"] = round(_peak_rss_mb(), 1)  # the process so far: load + LoftQ (training comes later)
    sha = None
    if int(os.environ.get("RANK", "0")) == 0:  # every rank computes the same base; one writes it (and the run record)
        write_json(out / LOFTQ_REPORT_FILE, result.report())
        save_loftq_base(model, base_file)
        sha = file_sha256(base_file)
    return RunLoftQ(result, {**s, "base_file": LOFTQ_BASE_FILE, "base_sha256": sha, "report_file": LOFTQ_REPORT_FILE})


def _peak_rss_mb() -> float:
    import resource
    import sys
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kb / 1024 / (1024 if sys.platform == "darwin" else 1)  # bytes on macOS, KiB on Linux


def check_loftq_base(run: dict | None, base_file: Path | None) -> None:
    """Refuse to rebuild a LoftQ run's model without the exact base it trained on.

    Its adapters start from (and were trained against) the LoftQ bytes, so merging them onto
    plain quantize(W), or onto another run's LoftQ base, would be silently wrong.
    """
    rec = (run or {}).get("loftq") or {}
    want = rec.get("base_sha256")
    if not want:
        return
    if base_file is None:
        raise InputError(f"this adapter was trained from a LoftQ base ({rec.get('base_file', LOFTQ_BASE_FILE)}) "
                         "that is not next to it; copy that file from the run folder into the adapter folder")
    got = file_sha256(base_file)
    if got != want:
        raise InputError(f"{base_file} (sha256 {got[:12]}…) is not the LoftQ base this adapter was trained on "
                         f"(sha256 {want[:12]}…); use the loftq_base.safetensors of the same run")
