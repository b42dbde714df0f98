"""Stream a safetensors HF checkpoint into a model whose Linear layers are `Linear4bit`.

The model skeleton is built with empty (meta) parameters; each tensor is then read from
disk, quantized if it belongs to a targeted Linear, and placed — so peak memory is about
the 4-bit model plus one dense tensor, never the dense model.
"""
from __future__ import annotations

import ctypes
import json
from pathlib import Path

import torch
from torch import nn

from lowbit.errors import ConfigError, InputError, UnsupportedModelError
from lowbit.format.blockwise import check_blocksize, check_quant_type
from lowbit.modules.linear4bit import Linear4bit
from lowbit.utils.device import auto_compute_dtype
from lowbit.utils.modules import matches_module, set_module
from lowbit.utils.safetensors_stream import iter_tensors, tensor_names

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "gemma3_text")
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
    from transformers import AutoConfig
    if not path.exists():
        raise InputError(f"model path {path} does not exist; run scripts/prepare_model.py or fix model.path")
    if not (path / "config.json").exists():
        raise InputError(f"{path} has no config.json; model.path must be a Hugging Face model folder")
    cfg = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    if cfg.model_type not in SUPPORTED_MODEL_TYPES:
        raise UnsupportedModelError(f"architecture {cfg.model_type!r} is not supported; supported: "
                                    f"{', '.join(SUPPORTED_MODEL_TYPES)}")
    return cfg


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


def _targets(model: nn.Module, skip_modules) -> set[str]:
    return {n for n, m in model.named_modules()
            if isinstance(m, nn.Linear) and not matches_module(n, skip_modules)}


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


def load_model(path, *, trust_remote_code: bool = False, **kw):
    """Load an HF causal LM with its Linear layers in NF4/FP4 → (model, tokenizer).

    Keyword arguments are those of `load_4bit_weights`.
    """
    from transformers import AutoTokenizer
    model = load_4bit_weights(path, trust_remote_code=trust_remote_code, **kw)
    return model, AutoTokenizer.from_pretrained(Path(path), trust_remote_code=trust_remote_code)


def load_4bit_weights(path, *, load_in_4bit: bool = True, quant_type: str = "nf4", blocksize: int = 64,
                      double_quant: bool = True, storage_dtype="uint8", compute_dtype="auto",
                      skip_modules=("lm_head",), keep_embeddings_in_compute_dtype: bool = True,
                      trust_remote_code: bool = False, progress: bool = True, quantize_linear=None):
    """Build the model with its Linear layers in NF4/FP4, streamed tensor by tensor.

    Non-quantized tensors (embeddings, norms, lm_head) are stored in `compute_dtype`
    (or kept as saved when keep_embeddings_in_compute_dtype=False). `quantize_linear(model, name,
    weight, old_linear) -> nn.Module` replaces how each targeted Linear is built from its dense weight
    (LoftQ uses it); the default is `Linear4bit.from_linear` with the settings above.
    """
    from tqdm.auto import tqdm

    check_blocksize(blocksize)
    check_quant_type(quant_type)
    path = Path(path)
    cfg = _read_config(path, trust_remote_code)
    compute_dtype, storage_dtype = as_dtype(compute_dtype), as_dtype(storage_dtype)
    model = _skeleton(cfg, compute_dtype, trust_remote_code)
    targets = _targets(model, skip_modules) if load_in_4bit else set()
    if quantize_linear is None:
        def quantize_linear(model, name, w, old):
            return _quantized_linear(old, w, blocksize, double_quant, quant_type, storage_dtype, compute_dtype)
    files = _weight_files(path)
    bar = tqdm(total=sum(len(tensor_names(f)) for f in files), desc="quantizing to 4-bit" if load_in_4bit else
               "loading", unit="tensor", disable=not progress)
    expected = dict(model.state_dict(keep_vars=True))
    for f in files:
        for key, t in iter_tensors(f):
            bar.update(1)
            if key not in expected:
                continue  # e.g. rotary buffers saved by older versions
            mod_name, _, leaf = key.rpartition(".")
            if mod_name in targets and leaf == "weight":
                set_module(model, mod_name, quantize_linear(model, mod_name, t, _checked_linear(model, mod_name, t)))
                del t
                _release_freed_memory()
            else:
                _set_tensor(model, key, t.to(compute_dtype) if keep_embeddings_in_compute_dtype else t)
    bar.close()
    _finish(model, cfg, path)
    model.config.lowbit_quantization = dict(quant_type=quant_type, blocksize=blocksize, double_quant=double_quant,
                                            storage_dtype=str(storage_dtype).removeprefix("torch."),
                                            compute_dtype=str(compute_dtype).removeprefix("torch."),
                                            skip_modules=list(skip_modules)) if load_in_4bit else None
    return model


def _skeleton(cfg, compute_dtype: torch.dtype, trust_remote_code: bool) -> nn.Module:
    """The model with every parameter on the meta device (no memory), buffers real."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM
    with init_empty_weights(include_buffers=False):
        return AutoModelForCausalLM.from_config(cfg, dtype=compute_dtype, trust_remote_code=trust_remote_code)


def _checked_linear(model: nn.Module, name: str, w: torch.Tensor) -> nn.Module:
    old = model.get_submodule(name)
    if tuple(w.shape) != (old.out_features, old.in_features):
        raise InputError(f"checkpoint tensor {name}.weight has shape {tuple(w.shape)}, "
                         f"the model expects {(old.out_features, old.in_features)}")
    return old


def _quantized_linear(old: nn.Module, w: torch.Tensor, blocksize, double_quant, quant_type, storage_dtype,
                      compute_dtype) -> Linear4bit:
    dense = nn.Linear(old.in_features, old.out_features, bias=False, device="meta")
    dense.weight = nn.Parameter(w, requires_grad=False)
    new = Linear4bit.from_linear(dense, blocksize, double_quant, quant_type, storage_dtype, compute_dtype)
    if old.bias is not None:  # may already be loaded ("bias" can come before "weight"), else loaded later
        new.bias = nn.Parameter(old.bias.data.to(compute_dtype), requires_grad=False)
    return new


def _finish(model: nn.Module, cfg, path: Path) -> None:
    """Tie the head to the embeddings where the config says so; refuse a checkpoint that left tensors unset."""
    if getattr(cfg, "tie_word_embeddings", False) or getattr(cfg.get_text_config(), "tie_word_embeddings", False):
        model.tie_weights()
    missing = [k for k, p in model.named_parameters() if p.device.type == "meta"]
    if missing:
        raise InputError(f"checkpoint {path} lacks {len(missing)} tensors the model needs, e.g. {missing[:3]}; "
                         "is it a complete checkpoint for this config?")
    model.eval()


def quantize_model(model: nn.Module, *, quant_type: str = "nf4", blocksize: int = 64, double_quant: bool = True,
                   storage_dtype="uint8", compute_dtype="bfloat16", skip_modules=("lm_head",)) -> nn.Module:
    """Replace the Linear layers of an in-memory model with `Linear4bit` (in place)."""
    compute_dtype, storage_dtype = as_dtype(compute_dtype), as_dtype(storage_dtype)
    for name in sorted(_targets(model, skip_modules)):
        lin = model.get_submodule(name)
        if isinstance(lin, Linear4bit):
            continue
        set_module(model, name, Linear4bit.from_linear(lin, blocksize, double_quant, quant_type, storage_dtype,
                                                        compute_dtype))
    return model
