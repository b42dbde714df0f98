"""Stream a safetensors HF checkpoint of any causal LM into a model whose Linear layers are `Linear4bit`
and whose MoE experts are `Experts4bit`.

The model skeleton is built with empty (meta) parameters; each tensor is then read from
disk, renamed/fused as transformers' conversion mapping says (keys.py), quantized if it
belongs to a targeted Linear or experts module, and placed — so peak memory is about the
4-bit model plus one dense tensor, never the dense model. Which models load: arch.py.
"""
from __future__ import annotations

import ctypes
import json
from pathlib import Path

import torch
from torch import nn

from lowbit import kernels
from lowbit.errors import ConfigError, InputError
from lowbit.format.blockwise import check_blocksize, check_quant_type
from lowbit.models.arch import check_layers, read_config
from lowbit.models.keys import CheckpointKeys
from lowbit.models.prequant import PrequantizedBnb, quantization_settings
from lowbit.modules.linear4bit import Linear4bit
from lowbit.modules.moe4bit import Experts4bit, quantize_experts
from lowbit.modules.structure import decoder_prefix, in_decoder, is_conv1d, is_plain_linear, quantizable_linears
from lowbit.utils.device import auto_compute_dtype
from lowbit.utils.modules import keep_residual_in_fp32, set_module
from lowbit.utils.safetensors_stream import iter_tensors, tensor_names

_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32, "uint8": torch.uint8}


def as_dtype(d) -> torch.dtype:
    """A torch dtype from its name; "auto" = the fast compute dtype here (bf16 on GPUs and on CPUs
    with AVX512-BF16/AMX, fp32 on other CPUs)."""
    if isinstance(d, torch.dtype):
        return d
    if d == "auto":
        return auto_compute_dtype()
    if d not in _DTYPES:
        raise ConfigError(f"unknown dtype {d!r}; choose one of auto, {', '.join(_DTYPES)}")
    return _DTYPES[d]


def _read_config(path: Path, trust_remote_code: bool):
    if not path.exists():
        raise InputError(f"model path {path} does not exist; run scripts/prepare_model.py or fix model.path")
    if not (path / "config.json").exists():
        raise InputError(f"{path} has no config.json; model.path must be a Hugging Face model folder")
    return read_config(path, trust_remote_code)


def _weight_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.exists():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [path / f for f in files]
    single = path / "model.safetensors"
    if single.exists():
        return [single]
    if list(path.glob("*.bin")) or list(path.glob("*.pt")):
        raise InputError(f"{path} holds only pickle weights (.bin/.pt); lowbit loads safetensors only — "
                         "convert with `model.save_pretrained(dir, safe_serialization=True)`")
    raise InputError(f"no model.safetensors (or index) in {path}")


def _set_tensor(model: nn.Module, key: str, t: torch.Tensor) -> None:
    # assign in place of the meta tensor without the copy accelerate's helper makes
    mod_name, _, leaf = key.rpartition(".")
    mod = model.get_submodule(mod_name) if mod_name else model
    if leaf in mod._parameters:
        old = mod._parameters[leaf]
        if tuple(old.shape) != tuple(t.shape):
            raise InputError(f"checkpoint tensor {key} has shape {tuple(t.shape)}, the model expects {tuple(old.shape)}")
        mod._parameters[leaf] = nn.Parameter(t, requires_grad=old.requires_grad)
    else:
        mod._buffers[leaf] = t


def _release_freed_memory() -> None:
    # glibc keeps freed quantization temporaries in its arenas; hand them back so RSS
    # tracks the model actually built (no-op off glibc)
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def load_model(path, *, trust_remote_code: bool = False, fp32_residual: bool = True, **kw):
    """Load an HF causal LM with its Linear layers in NF4/FP4 → (model, tokenizer).

    Keyword arguments are those of `load_4bit_weights`. With bf16/fp16 compute the residual stream runs in
    fp32 (the embedding's output upcast, the head's input cast back; `keep_residual_in_fp32`), in training,
    evaluation and inference alike (`fp32_residual=False`: as stored, as transformers runs it).
    """
    from transformers import AutoTokenizer
    model = load_4bit_weights(path, trust_remote_code=trust_remote_code, **kw)
    if fp32_residual:
        keep_residual_in_fp32(model)
    return model, AutoTokenizer.from_pretrained(Path(path), trust_remote_code=trust_remote_code)


def load_4bit_weights(path, *, load_in_4bit: bool = True, quant_type: str = "nf4", blocksize: int = 64,
                      double_quant: bool = True, storage_dtype="uint8", compute_dtype="auto",
                      skip_modules=("lm_head",), keep_embeddings_in_compute_dtype: bool = True,
                      trust_remote_code: bool = False, progress: bool = True, quantize_linear=None):
    """Build the model with its Linear layers in NF4/FP4, streamed tensor by tensor.

    Non-quantized tensors (embeddings, norms, lm_head) are stored in `compute_dtype`
    (or kept as saved when keep_embeddings_in_compute_dtype=False). `quantize_linear(model, name,
    weight, old_linear) -> nn.Module` replaces how each targeted Linear is built from its dense weight
    (LoftQ uses it); the default is `Linear4bit.from_linear` with the settings above. A pre-quantized
    bitsandbytes 4-bit checkpoint keeps its bytes and its quant type / double quant (prequant.py).
    """
    from tqdm.auto import tqdm

    check_blocksize(blocksize)
    check_quant_type(quant_type)
    path = Path(path)
    cfg = _read_config(path, trust_remote_code)
    prequantized = quantization_settings(cfg)
    if prequantized:
        if not load_in_4bit:
            raise InputError(f"{path} is a bitsandbytes 4-bit checkpoint; load_in_4bit=False needs the dense one")
        quant_type, double_quant = prequantized["quant_type"], prequantized["double_quant"]
    compute_dtype, storage_dtype = as_dtype(compute_dtype), as_dtype(storage_dtype)
    model = _skeleton(cfg, compute_dtype, trust_remote_code)
    expected = dict(model.state_dict(keep_vars=True))  # the dense layout the checkpoint is converted to
    targets = quantizable_linears(model, skip_modules) if load_in_4bit else set()
    experts = check_layers(model, skip_modules) if load_in_4bit else {}
    for name in experts:  # empty 4-bit experts, filled as their fused tensors arrive
        set_module(model, name, Experts4bit(model.get_submodule(name), compute_dtype, blocksize, double_quant,
                                            quant_type, storage_dtype))
    if quantize_linear is None:
        def quantize_linear(model, name, w, old):
            return _quantized_linear(old, w, blocksize, double_quant, quant_type, storage_dtype, compute_dtype)
    files = _weight_files(path)
    names = [n for f in files for n in tensor_names(f)]
    keys = CheckpointKeys(model, expected, names)
    pre = PrequantizedBnb(names, lambda k: keys.rename(k)[0], experts) if prequantized else None
    bar = tqdm(total=len(names), desc="quantizing to 4-bit" if load_in_4bit else "loading", unit="tensor",
               disable=not progress)
    for f in files:
        for key, t in iter_tensors(f):
            bar.update(1)
            if pre is not None and pre.claims(key):
                for name, q in pre.feed(key, t):
                    _place_prequantized(model, name, q, experts, storage_dtype, compute_dtype)
                continue
            for mkey, tensor in keys.feed(key, t):
                _place(model, mkey, tensor, targets, experts, expected, quantize_linear, keep_embeddings_in_compute_dtype)
            del t
    bar.close()
    unfinished = keys.unfinished() + (pre.unfinished() if pre is not None else [])
    if unfinished:
        raise InputError(f"checkpoint {path} holds only part of the tensors of {unfinished[:3]}; "
                         "is it a complete checkpoint for this config?")
    model._weight_conversions = keys.used_conversions()  # save_pretrained reverts them, as after from_pretrained
    if prequantized:
        del model.config.quantization_config  # now lowbit's 4-bit base; a merge must not look bitsandbytes-quantized
    _finish(model, cfg, path)
    model.config.lowbit_quantization = dict(quant_type=quant_type, blocksize=blocksize, double_quant=double_quant,
                                            storage_dtype=str(storage_dtype).removeprefix("torch."),
                                            compute_dtype=str(compute_dtype).removeprefix("torch."),
                                            skip_modules=list(skip_modules)) if load_in_4bit else None
    return model


def _place(model, key, t, targets, experts, expected, quantize_linear, cast: bool) -> None:
    mod_name, _, leaf = key.rpartition(".")
    if mod_name in targets and leaf == "weight":
        old = model.get_submodule(mod_name)
        set_module(model, mod_name, quantize_linear(model, mod_name, *_checked_linear(old, mod_name, t)))
        _release_freed_memory()
    elif mod_name in experts and leaf in experts[mod_name]["projs"]:
        model.get_submodule(mod_name).set_projection(leaf, t)
        _release_freed_memory()
    elif key in expected:  # a one-to-many conversion may also yield tensors this model does not hold
        want = expected[key].dtype
        _set_tensor(model, key, t.to(want) if cast and t.is_floating_point() and want.is_floating_point else t)


def _skeleton(cfg, compute_dtype: torch.dtype, trust_remote_code: bool) -> nn.Module:
    """The model with every parameter on the meta device (no memory), buffers real."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM
    with init_empty_weights(include_buffers=False):
        return AutoModelForCausalLM.from_config(cfg, dtype=compute_dtype, trust_remote_code=trust_remote_code)


def _place_prequantized(model, name, q, experts, storage_dtype, compute_dtype) -> None:
    if name in experts:  # Llama 4's per-expert 4-bit MLPs, decoded and re-fused
        for p, w in q.items():
            model.get_submodule(name).set_projection(p, w)
        return
    old = model.get_submodule(name)
    shape = tuple(old.weight.shape[::-1]) if is_conv1d(old) else tuple(old.weight.shape)
    if tuple(q.shape) != shape:
        raise InputError(f"checkpoint tensor {name}.weight holds a 4-bit {tuple(q.shape)} weight, the model expects "
                         f"{shape}")
    if not (is_plain_linear(old) or is_conv1d(old)):  # e.g. a router subclass: keep its own forward, dense
        w = kernels.dequantize_4bit(q, compute_dtype)
        old.weight = nn.Parameter(w.t().contiguous() if is_conv1d(old) else w, requires_grad=False)
        return
    new = Linear4bit(q if storage_dtype == torch.uint8 else q.with_storage(storage_dtype), None, compute_dtype)
    if old.bias is not None:
        new.bias = nn.Parameter(old.bias.data.to(compute_dtype), requires_grad=False)
    if is_conv1d(old):
        new.lowbit_conv1d = True
    set_module(model, name, new)


def _checked_linear(old: nn.Module, name: str, w: torch.Tensor) -> tuple[torch.Tensor, nn.Module]:
    """(weight as [out, in], the layer as an nn.Linear): GPT-2's Conv1D stores (in, out) and gets a stand-in."""
    if is_conv1d(old):
        want = tuple(old.weight.shape)
        if tuple(w.shape) != want:
            raise InputError(f"checkpoint tensor {name}.weight has shape {tuple(w.shape)}, the model expects {want}")
        lin = nn.Linear(want[0], want[1], bias=old.bias is not None, device="meta")
        lin.bias, lin.lowbit_conv1d = old.bias, True
        return w.t(), lin
    if tuple(w.shape) != (old.out_features, old.in_features):
        raise InputError(f"checkpoint tensor {name}.weight has shape {tuple(w.shape)}, "
                         f"the model expects {(old.out_features, old.in_features)}")
    return w, old


def _quantized_linear(old: nn.Module, w: torch.Tensor, blocksize, double_quant, quant_type, storage_dtype,
                      compute_dtype) -> Linear4bit:
    dense = nn.Linear(old.in_features, old.out_features, bias=False, device="meta")
    dense.weight = nn.Parameter(w, requires_grad=False)
    new = Linear4bit.from_linear(dense, blocksize, double_quant, quant_type, storage_dtype, compute_dtype)
    if getattr(old, "lowbit_conv1d", False):
        new.lowbit_conv1d = True  # merge writes it back as a Conv1D
    if old.bias is not None:  # may already be loaded ("bias" can come before "weight"), else loaded later
        new.bias = nn.Parameter(old.bias.data.to(compute_dtype), requires_grad=False)
    return new


def _finish(model: nn.Module, cfg, path: Path) -> None:
    """Tie the head to the embeddings where the config says so; refuse a checkpoint that left tensors unset."""
    if getattr(cfg, "tie_word_embeddings", False) or getattr(cfg.get_text_config(), "tie_word_embeddings", False):
        model.tie_weights()
    prefix = decoder_prefix(model)
    for name, p in model.named_parameters():  # image/audio towers: frozen, in 16-bit
        if not in_decoder(name, prefix) and not name.startswith("lm_head"):
            p.requires_grad_(False)
    missing = [k for k, p in model.named_parameters() if p.device.type == "meta"]
    if missing:
        raise InputError(f"checkpoint {path} lacks {len(missing)} tensors the model needs, e.g. {missing[:3]}; "
                         "is it a complete checkpoint for this config?")
    model.eval()


def quantize_model(model: nn.Module, *, quant_type: str = "nf4", blocksize: int = 64, double_quant: bool = True,
                   storage_dtype="uint8", compute_dtype="bfloat16", skip_modules=("lm_head",)) -> nn.Module:
    """Replace the Linear layers (and MoE experts) of an in-memory model with 4-bit ones (in place)."""
    compute_dtype, storage_dtype = as_dtype(compute_dtype), as_dtype(storage_dtype)
    for name in sorted(check_layers(model, skip_modules)):
        set_module(model, name, quantize_experts(model.get_submodule(name), compute_dtype, blocksize=blocksize,
                                                 double_quant=double_quant, quant_type=quant_type,
                                                 storage_dtype=storage_dtype))
    for name in sorted(quantizable_linears(model, skip_modules)):
        old = model.get_submodule(name)
        w, lin = _checked_linear(old, name, old.weight.detach())
        set_module(model, name, _quantized_linear(lin, w, blocksize, double_quant, quant_type, storage_dtype,
                                                  compute_dtype))
    return model
