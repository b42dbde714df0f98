"""QAT that targets a llama.cpp GGUF file type: fake quant = the exporter's own bytes, decoded.

Each targeted linear rounds as `dequantize(quantize(w, T), T)` with the byte-identical quantizers of
`lowbit.format.ggml_quants` (gguf-py's for the few types those lack), T the type llama-quantize gives its
GGUF tensor under the chosen file type (`tensor_type_plan`: the Q4_K_M mix, the Q5_0/Q8_0 fallbacks for
rows that do not split into 256). Blocks run along a row and rows are quantized independently, so
llama.cpp's q/k row permutation commutes with the rounding and it is done in HF layout. Frozen 2-D tensors
that the file also quantizes (the token embedding, the tied or separate output) are rounded once, in place,
so the model trains against what the file holds; `restore_frozen` puts the originals back.

`save_dense` writes what `lowbit export --format gguf` needs to reproduce the trained codes: the weights
before rounding (fp32 for the trained linears, original frozen tensors) as a plain HF safetensors folder.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from torch import nn

from lowbit.errors import ConfigError, UnsupportedModelError
from lowbit.format import ggml_quants
from lowbit.methods.qat.config import GGUF_FILE_TYPES
from lowbit.utils.modules import unwrap_peft

MARKER = "lowbit_gguf_qat.json"  # in a save_dense folder: the file type the weights were trained for
DENSE_DIR = "quantized"  # <run>/quantized: where a GGUF QAT run saves its dense weights
_BLOCK = {"Q4_0": 32, "Q4_1": 32, "Q5_0": 32, "Q5_1": 32, "Q8_0": 32, "Q2_K": 256, "Q3_K": 256, "Q4_K": 256,
          "Q5_K": 256, "Q6_K": 256, "F16": 1, "BF16": 1, "F32": 1}


def _native_quantizer():
    """The C++ ggml quantizer (same bytes, much faster k-quant search) when this build has it."""
    try:
        from lowbit.kernels.ggml import quantize_ggml
    except ImportError:
        return None
    return quantize_ggml


def quantize_rows(x: torch.Tensor, ggml_type: str) -> torch.Tensor:
    """(rows, row_bytes) uint8: llama.cpp's bytes for fp32 rows `x`."""
    native = _native_quantizer()
    if native is not None and ggml_type in ggml_quants.SUPPORTED_TYPES:
        return native(x, ggml_type)
    return ggml_quants.quantize(x, ggml_type)


@torch.no_grad()
def roundtrip(w: torch.Tensor, ggml_type: str) -> torch.Tensor:
    """fp32 values of `w` as a GGUF tensor of `ggml_type` decodes them (rows = the last dim)."""
    t = ggml_type.upper()
    x = w.detach().float().contiguous().reshape(-1, w.shape[-1])
    if x.shape[-1] % _BLOCK[t]:
        raise ConfigError(f"rows of {x.shape[-1]} values do not split into {t} blocks of {_BLOCK[t]}; choose "
                          "another ggml_type or use qat.gguf_file_type (llama-quantize's fallbacks)")
    if t == "F32":
        out = x.clone()
    elif t == "F16":
        out = x.half().float()
    elif t in ggml_quants.SUPPORTED_TYPES:
        out = ggml_quants.dequantize(quantize_rows(x, t), t, x.shape)
    else:  # Q4_1 / Q5_1 / Q2_K / Q3_K / BF16: gguf-py's quantizer, which the exporter uses for them too
        import gguf
        gt = getattr(gguf.GGMLQuantizationType, t)
        out = torch.from_numpy(gguf.quants.dequantize(gguf.quants.quantize(x.numpy(), gt), gt).copy()).float()
    return out.reshape(w.shape)


class Layout:
    """One linear's weight as the file stores it: the family's convert_hf_to_gguf changes (q/k row permutes,
    splits) applied, each piece rounded to its own type, and undone — exact whatever the convention."""

    def __init__(self, fam, name: str, text_cfg, types: list[str]):
        self.fam, self.name, self.text_cfg, self.types = fam, name, text_cfg, types

    def __call__(self, w: torch.Tensor) -> torch.Tensor:
        pieces = self.fam.split(self.name, w.detach().float(), self.text_cfg)
        parts = [roundtrip(p, t) for (_, p), t in zip(pieces, self.types, strict=True)]
        return self.fam.join(self.name, parts, self.text_cfg)


class RoundtripCache:
    """The last input and its rounding: evaluation (and recomputation under gradient checkpointing) sees the
    same weight many times, and one comparison is far cheaper than the k-quant search."""

    def __init__(self):
        self.x = self.y = None

    def __call__(self, x: torch.Tensor, ggml_type: str, layout: Layout | None = None) -> torch.Tensor:
        x = x.detach()
        if self.x is None or self.x.shape != x.shape or not torch.equal(self.x, x):
            self.x = x.float().clone()
            self.y = roundtrip(x, ggml_type) if layout is None else layout(x)
        return self.y


def _skeleton(hf: nn.Module) -> nn.Module:
    """An uninitialised copy of the HF model (bf16, tied as the original): what the exporter walks over, so names,
    ties and types come out exactly as `lowbit export` will see them."""
    with torch.device("meta"):
        m = type(hf)(hf.config)
    m = m.to(torch.bfloat16).to_empty(device="cpu")
    m.tie_weights()
    return m


def _family(hf: nn.Module):
    from lowbit.models.gguf_arch import family
    return family(hf)


def _file_name(fam, hf_name: str) -> str:  # gguf_arch's text-tower renaming (gemma3 image-text → text model)
    if fam.text_prefix and hf_name.startswith(fam.text_prefix):
        return "model." + hf_name.removeprefix(fam.text_prefix)
    return hf_name


def type_plan(model: nn.Module, file_type: str) -> dict[str, list[str]]:
    """{HF parameter name: [ggml type of each GGUF tensor it becomes]} as `lowbit export --gguf-type file_type`
    writes them."""
    from lowbit.models.gguf_arch import gguf_layout, tensor_type_plan
    skel = _skeleton(unwrap_peft(model))
    layout = gguf_layout(skel)
    plan = tensor_type_plan([p for _, pieces in layout for p in pieces], skel, file_type.upper(), False)
    return {hf_name: [plan[g] for g, _ in pieces] for hf_name, pieces in layout}


def layer_types(model: nn.Module, targets: list[tuple[str, nn.Module]], qcfg) -> dict[int, tuple[str, Layout | None]]:
    """{id(target module): (ggml type, Layout)}; `qcfg` is the QATConfig (gguf_file_type, or one weight.ggml_type
    for every layer, rounded in HF layout)."""
    if not qcfg.gguf_file_type:
        return {id(m): (qcfg.weight.ggml_type.upper(), None) for _, m in targets}
    hf = unwrap_peft(model)
    fam = _family(hf)
    text_cfg = fam.text_config(hf.config)
    plan = type_plan(model, qcfg.gguf_file_type)
    names = {id(m): n for n, m in hf.named_modules()}
    out = {}
    for name, m in targets:
        key = f"{names.get(id(m), name)}.weight"
        if key not in plan:
            raise ConfigError(f"{name}: no GGUF tensor {key} in the {qcfg.gguf_file_type} export of this model; add it "
                              "to qat.exclude")
        types = plan[key]
        out[id(m)] = (types[0], Layout(fam, _file_name(fam, key), text_cfg, types))
    return out


@torch.no_grad()
def quantize_frozen(model: nn.Module, file_type: str, targets: list[tuple[str, nn.Module]]) -> dict[str, str]:
    """Round, in place, every 2-D tensor the file quantizes and no fake quantizer covers (token embedding, output)
    and freeze it there: a fake-quantized embedding would need the k-quant search on 100M+ values per step for a
    tensor fine-tuning leaves alone. The originals are kept for `restore_frozen` / `save_dense`.
    → {HF name: ggml type}."""
    hf = unwrap_peft(model)
    covered = {f"{n}.weight" for n, m in hf.named_modules() if any(m is t for _, t in targets)}
    params = dict(hf.named_parameters(remove_duplicate=False))
    originals = hf.__dict__.setdefault("lowbit_gguf_frozen", {})
    done, seen = {}, {}
    for name, types in type_plan(model, file_type).items():
        p, t = params.get(name), types[0]
        if name in covered or p is None or p.dim() != 2 or len(types) != 1 or t == "F32":
            continue
        if p.requires_grad:
            print(f"GGUF QAT: {name} is frozen at its {t} values (the file stores it so)", flush=True)
            p.requires_grad_(False)
        if id(p) not in seen:
            originals.setdefault(name, p.detach().clone())
            p.copy_(roundtrip(originals[name], t).to(p.dtype))
            seen[id(p)] = name
        done[name] = t
    return done


@torch.no_grad()
def restore_frozen(model: nn.Module) -> None:
    hf = unwrap_peft(model)
    params = dict(hf.named_parameters(remove_duplicate=False))
    for name, w in hf.__dict__.pop("lowbit_gguf_frozen", {}).items():
        params[name].copy_(w)


def file_type_of(model: nn.Module) -> str:
    cfg = getattr(model, "lowbit_qat_config", None) or getattr(unwrap_peft(model), "lowbit_qat_config", None)
    if cfg is None or cfg.weight is None or cfg.weight.dtype != "gguf":
        raise ConfigError("save_dense needs a model prepared with a GGUF QAT scheme (gguf-q4_k_m, ...)")
    return cfg.gguf_file_type or cfg.weight.ggml_type


@torch.no_grad()
def save_dense(model: nn.Module, out_dir, tokenizer=None) -> Path:
    """HF folder (config.json, model.safetensors, tokenizer, lowbit_gguf_qat.json) holding the weights before
    rounding: `lowbit export <it> x.gguf --gguf-type T` then writes exactly the codes the model trained with."""
    from lowbit.methods.qat.linear import QATLinearMixin, base_linear, effective_weight
    from lowbit.utils.io import atomic_dir, save_safetensors, write_json
    ftype = file_type_of(model)
    hf = unwrap_peft(model)
    meta = _skeleton(hf)  # the plain HF layout: keys as from_pretrained expects them
    live = hf.state_dict()
    frozen = hf.__dict__.get("lowbit_gguf_frozen", {})
    dense = {}
    for name, m in hf.named_modules():
        if isinstance(m, QATLinearMixin) and m.lowbit_weight_fq is not None:
            dense[f"{name}.weight"] = effective_weight(m).float()
            if base_linear(m).bias is not None:
                dense[f"{name}.bias"] = base_linear(m).bias
    if not dense:
        raise ConfigError("save_dense needs the prepared model (fake quantizers in place), not a converted one: "
                          "convert stores the rounded weights, which llama-quantize would round again")
    state, seen = {}, set()
    for k, skel_v in meta.state_dict().items():
        if skel_v.numel() and skel_v.data_ptr() in seen:  # tied (Gemma's lm_head): stored once, as HF saves it
            continue
        seen.add(skel_v.data_ptr())
        v = dense.get(k, frozen.get(k, live.get(k)))
        if v is None:
            raise UnsupportedModelError(f"save_dense: no dense value for {k} (a 4-bit layer without a fake quantizer?); "
                                        "export the run's adapter instead")
        state[k] = v.detach().contiguous()
    config = hf.config.to_dict()
    config.pop("quantization_config", None)
    with atomic_dir(Path(out_dir), overwrite=True) as tmp:
        (Path(tmp) / "config.json").write_text(json.dumps(config, indent=2, default=str))
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        save_safetensors(state, Path(tmp) / "model.safetensors", metadata={"format": "pt"})
        cfg = getattr(model, "lowbit_qat_config", None) or hf.lowbit_qat_config
        write_json(Path(tmp) / MARKER, {"gguf_file_type": ftype, "qat_config": cfg.to_dict()})
    return Path(out_dir)


def trained_for(source) -> tuple[Path, str] | None:
    """(dense folder, file type) when `source` is a GGUF QAT run folder or its save_dense output."""
    p = Path(source)
    for d in (p, p / DENSE_DIR):
        if (d / MARKER).exists():
            return d, json.loads((d / MARKER).read_text())["gguf_file_type"]
    return None


def export_source(source, gguf_type: str | None) -> tuple[Path, str]:
    """What `lowbit export --format gguf` should read and write: a GGUF QAT run exports its dense weights (the
    adapter alone cannot say whether the base was 16-bit); no --gguf-type = the type it trained for."""
    found = trained_for(source)
    if found is None:
        return Path(source), gguf_type or "F16"
    dense, trained = found
    if gguf_type is None:
        if trained.upper() not in GGUF_FILE_TYPES:
            raise ConfigError(f"{source} trained every layer as {trained}, which is no llama-quantize file type; pass "
                              "--gguf-type")
        return dense, trained
    if gguf_type.upper() != trained.upper():
        print(f"warning: {source} was trained with QAT for GGUF {trained}; exporting it as {gguf_type} rounds the "
              f"trained weights afresh (not the codes they trained with) — pass --gguf-type {trained}",
              file=sys.stderr, flush=True)
    return dense, gguf_type
