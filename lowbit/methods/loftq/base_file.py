"""The LoftQ base on disk: its 4-bit bytes differ from quantize(W), so merge and reload need them.

`loftq_base.safetensors` holds every `Linear4bit` in the bitsandbytes layout under the model's
own keys; a run records its sha256, and rebuilding that run's model refuses a missing or other file.
"""
from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from lowbit.errors import ConfigError, InputError
from lowbit.format import Quantized4bit
from lowbit.modules.linear4bit import Linear4bit
from lowbit.utils.hashing import file_sha256
from lowbit.utils.io import save_safetensors
from lowbit.utils.modules import unwrap_peft

LOFTQ_BASE_FILE = "loftq_base.safetensors"
LOFTQ_REPORT_FILE = "loftq_report.json"


def save_loftq_base(model: nn.Module, path, overwrite: bool = True) -> Path:
    """Write every `Linear4bit` of `model` (bitsandbytes layout) to one safetensors file.

    The keys are the model's own (`model.layers.0.self_attn.q_proj.weight...`); a peft model
    is unwrapped first.
    """
    model = unwrap_peft(model)
    sd = {}
    for name, mod in model.named_modules():
        if isinstance(mod, Linear4bit):  # under peft the layer sits at <module>.base_layer
            sd.update(mod.quant.state_dict(f"{name.removesuffix('.base_layer')}.weight"))
    if not sd:
        raise ConfigError("model has no 4-bit Linear layers to save; load it with lowbit (load_in_4bit=True)")
    path = Path(path)
    save_safetensors(sd, path, metadata={"format": "lowbit.loftq_base"}, overwrite=overwrite)
    return path


def load_loftq_base(model: nn.Module, path) -> int:
    """Replace the 4-bit bytes of `model`'s `Linear4bit` layers with those saved by `save_loftq_base`."""
    model = unwrap_peft(model)
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


def check_loftq_base(loftq_record: dict | None, base_file: Path | None) -> None:
    """Refuse to rebuild a LoftQ run's model without the exact base it trained on.

    Its adapters start from (and were trained against) the LoftQ bytes, so merging them onto
    plain quantize(W), or onto another run's LoftQ base, would be silently wrong.
    """
    want = (loftq_record or {}).get("base_sha256")
    if not want:
        return
    if base_file is None:
        raise InputError(f"this adapter was trained from a LoftQ base ({loftq_record.get('base_file', LOFTQ_BASE_FILE)}) "
                         "that is not next to it; copy that file from the run folder into the adapter folder")
    got = file_sha256(base_file)
    if got != want:
        raise InputError(f"{base_file} (sha256 {got[:12]}…) is not the LoftQ base this adapter was trained on "
                         f"(sha256 {want[:12]}…); use the loftq_base.safetensors of the same run")
