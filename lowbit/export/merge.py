"""Merge LoRA adapters into the dequantized 4-bit base they were trained against.

The merged weight is deq(Q) + s·B·A in fp32, then cast once to the output dtype — the base
is the same 4-bit weights training saw (including a LoftQ base saved beside the adapter),
not the original dense checkpoint.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from lowbit.errors import InputError
from lowbit.methods.loftq import LOFTQ_BASE_FILE, check_loftq_base, load_loftq_base
from lowbit.models import load_model
from lowbit.models.load import as_dtype
from lowbit.modules.linear4bit import Linear4bit
from lowbit.modules.lora import load_adapter
from lowbit.modules.moe4bit import Experts4bit
from lowbit.modules.structure import experts_modules, is_conv1d
from lowbit.utils.hashing import model_folder_hash
from lowbit.utils.io import atomic_dir, write_json
from lowbit.utils.modules import set_module
from lowbit.utils.run_record import RunRecord


class BaseMismatchError(InputError):
    """The adapter was trained on a different base model than the one given."""


@dataclass
class AdapterSource:
    adapter_dir: Path
    run: RunRecord | None     # lowbit_run.json, when the trainer wrote one
    adapter_config: dict
    base_path: Path

    @property
    def quant(self) -> dict:
        if self.run is not None:
            return self.run.quant
        return {"quant_type": "nf4", "blocksize": 64, "double_quant": True, "skip_modules": ("lm_head",)}

    def loftq_base(self) -> Path | None:
        for d in (self.adapter_dir, self.adapter_dir.parent):
            if (d / LOFTQ_BASE_FILE).exists():
                return d / LOFTQ_BASE_FILE
        return None


def resolve_adapter(adapter, base=None) -> AdapterSource:
    """Accept a run dir (adapter/ + lowbit_run.json) or an adapter dir; find the base and check it."""
    p = Path(adapter)
    if not p.exists():
        raise InputError(f"adapter path {p} does not exist")
    if not (p / "adapter_config.json").exists() and (p / "adapter" / "adapter_config.json").exists():
        p = p / "adapter"
    if not (p / "adapter_config.json").exists():
        raise InputError(f"{p} has no adapter_config.json; pass a peft adapter folder or a lowbit run folder")
    adapter_config = json.loads((p / "adapter_config.json").read_text())
    run = RunRecord.find(p, p.parent)
    base_path = base or (run.base_model.path if run else None) or adapter_config.get("base_model_name_or_path")
    if not base_path:
        raise InputError(f"cannot tell which base model {p} was trained on; pass --base <HF model folder>")
    src = AdapterSource(p, run, adapter_config, Path(base_path))
    check_base(src)
    return src


def check_base(src: AdapterSource) -> None:
    """Refuse a base whose hash (if recorded), architecture or Linear shapes differ from training's."""
    from transformers import AutoConfig
    base = src.base_path
    if not (base / "config.json").exists():
        raise InputError(f"base model {base} is not an HF model folder (no config.json); pass --base")
    recorded = src.run.base_model if src.run is not None else None
    if recorded is not None and recorded.sha256 and model_folder_hash(base) != recorded.sha256:
        raise BaseMismatchError(f"base model {base} does not match the one the adapter was trained on "
                                f"({recorded.path}, sha256 {recorded.sha256[:12]}…): its config or "
                                "weights differ; pass the original base with --base")
    cfg = AutoConfig.from_pretrained(base)
    # image-text checkpoints: the run records the model it trained (e.g. the text model of qwen3_5)
    if recorded is not None and recorded.model_type and \
            recorded.model_type not in (cfg.model_type, cfg.get_text_config().model_type):
        raise BaseMismatchError(f"adapter was trained on a {recorded.model_type!r} model but {base} is "
                                f"{cfg.model_type!r}; pass the original base with --base")
    _check_adapter_shapes(src.adapter_dir, cfg, base)


def _check_adapter_shapes(adapter_dir: Path, cfg, base: Path) -> None:
    from accelerate import init_empty_weights
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM
    f = adapter_dir / "adapter_model.safetensors"
    if not f.exists():
        raise InputError(f"{adapter_dir} has no adapter_model.safetensors (lowbit reads safetensors adapters only)")
    with init_empty_weights():
        skeleton = AutoModelForCausalLM.from_config(cfg)
    mods = dict(skeleton.named_modules())
    with safe_open(str(f), "pt") as sf:
        for key in sf.keys():
            # base_model.model.<module>.lora_A.weight; nested expert wrappers add .base_layer
            if ".lora_A." not in key and ".lora_B." not in key:
                continue
            mod_name = key.removeprefix("base_model.model.").split(".lora_")[0].replace(".base_layer", "")
            mod = mods.get(mod_name)
            shape = tuple(sf.get_slice(key).get_shape())
            if mod is None:
                raise BaseMismatchError(f"adapter tensor {key} targets {mod_name}, which base {base} does not have; "
                                        "pass the base the adapter was trained on with --base")
            want = shape[1] if ".lora_A." in key else shape[0]
            ins, outs = _in_out_features(mod)
            if want not in (ins if ".lora_A." in key else outs):
                raise BaseMismatchError(f"adapter tensor {key} has shape {shape} but {mod_name} in base {base} takes "
                                        f"inputs of size {sorted(ins)} and gives {sorted(outs)}; pass the matching "
                                        "base with --base")


def _in_out_features(mod: nn.Module) -> tuple[set[int], set[int]]:
    """Possible (input, output) sizes of a LoRA on `mod`: a Linear/Conv1D, or each 3-D experts tensor as peft reads it."""
    if is_conv1d(mod):
        return {mod.weight.shape[0]}, {mod.weight.shape[1]}
    if hasattr(mod, "in_features"):
        return {mod.in_features}, {mod.out_features}
    ins, outs = set(), set()
    for p in mod.parameters(recurse=False):
        if p.dim() == 3:
            d1, d2 = p.shape[1:]
            i, o = (d1, d2) if getattr(mod, "is_transposed", False) else (d2, d1)
            ins.add(i)
            outs.add(o)
    return ins, outs


def load_adapter_model(src: AdapterSource, compute_dtype="float32", progress: bool = False):
    """The model the adapter was trained on: 4-bit base (+ LoftQ bytes if saved) + adapter → (peft, tok)."""
    q = src.quant
    model, tok = load_model(src.base_path, quant_type=q["quant_type"], blocksize=q["blocksize"],
                            double_quant=q["double_quant"], skip_modules=q["skip_modules"],
                            compute_dtype=compute_dtype, progress=progress)
    lb = src.loftq_base()
    # a trainer LoftQ run records its base's hash: refuse a missing or other base file
    check_loftq_base(src.run.loftq if src.run is not None else None, lb)
    if lb is not None:
        load_loftq_base(model, lb)
    pm = load_adapter(model, src.adapter_dir)
    pm.eval()
    return pm, tok


def merge_into_dense(peft_model, dtype=torch.bfloat16, adapter_name: str = "default") -> nn.Module:
    """Replace every LoRA-wrapped and plain 4-bit layer with its dense transformers form (in place) → HF model:
    `nn.Linear` (GPT-2's `Conv1D` where it was one), and the family's fused experts module for `Experts4bit`."""
    from peft.tuners.lora import LoraLayer

    dtype = as_dtype(dtype)
    base = peft_model.get_base_model() if hasattr(peft_model, "get_base_model") else peft_model
    for name, mod in list(base.named_modules()):
        if isinstance(mod, LoraLayer) and isinstance(mod.get_base_layer(), Experts4bit) and \
                not name.endswith(".base_layer"):
            set_module(base, name, _merged_experts(mod, adapter_name, dtype))
    for name, mod in list(base.named_modules()):
        if isinstance(mod, LoraLayer):
            layer = mod.get_base_layer()
            w = _dense_weight(layer)
            if adapter_name in mod.lora_A:
                w = w + mod.get_delta_weight(adapter_name).float()
            conv1d = getattr(layer, "lowbit_conv1d", False) or is_conv1d(layer)
            set_module(base, name, _linear(w, layer.bias, dtype, conv1d))
    for name, mod in list(base.named_modules()):
        if isinstance(mod, Linear4bit):
            set_module(base, name, _linear(_dense_weight(mod), mod.bias, dtype, getattr(mod, "lowbit_conv1d", False)))
        elif isinstance(mod, Experts4bit):
            set_module(base, name, mod.to_dense(dtype))
    base.to(dtype)
    for attr in ("lowbit_quantization", "lowbit_loftq"):
        if hasattr(base.config, attr):
            delattr(base.config, attr)
    base.config.dtype = dtype
    return base


def _merged_experts(wrapper, adapter_name: str, dtype) -> nn.Module:
    """deq(experts) + each wrapped projection's LoRA delta (nested peft wrappers, one per parameter) → dense module."""
    from peft.tuners.lora import LoraLayer
    experts, deltas = wrapper.get_base_layer(), {}
    while isinstance(wrapper, LoraLayer):
        if adapter_name in wrapper.lora_A:
            deltas[wrapper.parameter_name] = wrapper.get_delta_weight(adapter_name).float()
        wrapper = wrapper.base_layer
    weights = {p: experts.dequantize(p, torch.float32) + d for p, d in deltas.items()}
    return experts.to_dense(dtype, weights)


def _dense_weight(layer) -> torch.Tensor:
    if isinstance(layer, Linear4bit):
        return layer.dequantize(torch.float32)
    return layer.weight.detach().float().t() if is_conv1d(layer) else layer.weight.detach().float()


def _linear(w: torch.Tensor, bias, dtype, conv1d: bool = False) -> nn.Module:
    if conv1d:  # GPT-2 keeps (in, out): write it back in its own layout so transformers reloads it
        from transformers.pytorch_utils import Conv1D
        layer = Conv1D(w.shape[0], w.shape[1])
        layer.weight = nn.Parameter(w.t().contiguous().to(dtype), requires_grad=False)
        layer.bias = nn.Parameter(bias.detach().to(dtype), requires_grad=False)
        return layer
    lin = nn.Linear(w.shape[1], w.shape[0], bias=bias is not None, device="meta")
    lin.weight = nn.Parameter(w.to(dtype), requires_grad=False)
    if bias is not None:
        lin.bias = nn.Parameter(bias.detach().to(dtype), requires_grad=False)
    return lin


def save_hf_model(model: nn.Module, tok, out, overwrite: bool = False, extra: dict | None = None) -> Path:
    """save_pretrained (safetensors) + tokenizer into `out`, atomically."""
    with atomic_dir(out, overwrite) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        if tok is not None:
            tok.save_pretrained(tmp)
        if extra:
            write_json(tmp / "lowbit_export.json", extra)
    return Path(out)


def merge(adapter, out, *, base=None, dtype="bfloat16", overwrite: bool = False, verify: bool = True,
          progress: bool = True) -> dict:
    """`lowbit merge`: adapter + its 4-bit base → dense HF checkpoint in `dtype`. Returns a report."""
    out = Path(out)
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} already exists; pass --overwrite to replace it")
    src = resolve_adapter(adapter, base)
    pm, tok = load_adapter_model(src, compute_dtype="float32", progress=progress)
    ids = _probe_ids(tok) if verify else None
    ref = _logits(pm, ids) if verify else None
    model = merge_into_dense(pm, dtype)
    report = {"adapter": str(src.adapter_dir), "base": str(src.base_path), "dtype": str(as_dtype(dtype)),
              "loftq_base": str(src.loftq_base()) if src.loftq_base() else None}
    save_hf_model(model, tok, out, overwrite, extra={"format": "lowbit.merged", **report})
    if verify:
        report.update(verify_merged(out, ids, ref, as_dtype(dtype), merged=model))
    return report


def _probe_ids(tok) -> torch.Tensor:
    text = "Fair is foul, and foul is fair: hover through the fog and filthy air. To be, or not to be."
    return tok([text], return_tensors="pt").input_ids


@torch.no_grad()
def _logits(model, ids) -> torch.Tensor:
    return model(input_ids=ids).logits.float()


def merge_tolerance(dtype: torch.dtype, ref: torch.Tensor) -> float:
    """Allowed max |Δlogit|: the output dtype's rounding of weights and activations, scaled by the logit range."""
    eps = {torch.float32: 1e-5, torch.bfloat16: 2 ** -7, torch.float16: 2 ** -10}[dtype]
    return 4 * eps * max(ref.abs().max().item(), 1.0) + (1e-4 if dtype == torch.float32 else 0.0)


def verify_merged(out: Path, ids, ref, dtype, merged: nn.Module | None = None) -> dict:
    """Reload the merged folder with plain transformers and compare logits to the adapter model's.

    MoE in 16-bit: rounding the merged weights moves router scores, and a token whose top-k experts were
    nearly tied may switch experts, which no logit tolerance bounds. There the check is that transformers
    reloads exactly the merged weights (the fused ↔ per-expert conversion included); the merge itself is
    the same computation as in float32, where the logits must match.
    """
    from transformers import AutoModelForCausalLM
    m = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    m.eval()
    got = _logits(m, ids)
    diff = (got - ref).abs().max().item()
    tol = merge_tolerance(dtype, ref)
    rep = {"parity_max_abs_logit_diff": diff, "parity_tolerance": tol}
    if diff <= tol:
        return rep
    if dtype != torch.float32 and merged is not None and experts_modules(merged):
        want = merged.state_dict()
        bad = [k for k, v in m.state_dict().items() if k in want and not torch.equal(v, want[k].float())]
        if not bad:
            return {**rep, "parity_note": "MoE: logits beyond the 16-bit tolerance, as rounding can flip near-tied "
                                          "top-k expert choices; checked instead: transformers reloads exactly the "
                                          "merged weights"}
        raise RuntimeError(f"merged checkpoint {out} reloads with different weights, e.g. {bad[:3]}")
    raise RuntimeError(f"merged checkpoint {out} logits differ from the adapter model by {diff:.3g} > {tol:.3g}")
