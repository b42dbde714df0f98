"""`lowbit export --format peft|merged|bnb4|gguf`: one function per format, each checked by loading it back.

The source is either a trained adapter (run folder or peft adapter folder, merged against the
4-bit base it was trained on) or, for bnb4/gguf, a dense HF model folder (e.g. `lowbit merge` output).
"""
from __future__ import annotations

import shutil
from pathlib import Path

import torch

from lowbit.errors import ConfigError, InputError, LowbitError
from lowbit.export.bnb4bit import bnb4_reference, save_bnb4
from lowbit.export.gguf_writer import export_gguf
from lowbit.export.imatrix import compute_imatrix, read_imatrix
from lowbit.export.merge import _logits, _probe_ids, load_adapter_model, merge, merge_into_dense, resolve_adapter
from lowbit.methods.loftq import LOFTQ_BASE_FILE
from lowbit.models.gguf_arch import GEMMAS, GGUF_ARCHS, gguf_tensors
from lowbit.utils.io import atomic_dir
from lowbit.utils.run_record import RUN_FILE

FORMATS = ("peft", "merged", "bnb4", "gguf")


class ExportCheckError(LowbitError, RuntimeError):
    """An export did not load back the way it was written."""


def _is_adapter(p: Path) -> bool:
    return (p / "adapter_config.json").exists() or (p / "adapter" / "adapter_config.json").exists()


def dense_source(source, base=None, progress: bool = True):
    """(dense fp32 HF model, tokenizer, info) from an adapter (merged in memory) or a dense model folder."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    p = Path(source)
    if not p.exists():
        raise InputError(f"export source {p} does not exist")
    if _is_adapter(p):
        src = resolve_adapter(p, base)
        pm, tok = load_adapter_model(src, compute_dtype="float32", progress=progress)
        return merge_into_dense(pm, torch.float32), tok, {"adapter": str(src.adapter_dir), "base": str(src.base_path)}
    if not (p / "config.json").exists():
        raise InputError(f"{p} is neither a peft adapter / lowbit run folder nor an HF model folder (no config.json)")
    if "quantization_config" in (p / "config.json").read_text():
        raise InputError(f"{p} is already quantized; export from the adapter or the merged (dense) checkpoint")
    model = AutoModelForCausalLM.from_pretrained(p, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(p), {"model": str(p)}


def export_peft(source, out, *, base=None, overwrite: bool = False, verify: bool = True) -> dict:
    """Copy the adapter (+ lowbit_run.json, LoftQ base) and check peft loads it onto its base."""
    src = resolve_adapter(source, base)
    with atomic_dir(out, overwrite) as tmp:
        for f in src.adapter_dir.iterdir():
            if f.is_file():
                shutil.copy2(f, tmp / f.name)
        for extra in (RUN_FILE, LOFTQ_BASE_FILE):
            if not (tmp / extra).exists() and (src.adapter_dir.parent / extra).exists():
                shutil.copy2(src.adapter_dir.parent / extra, tmp / extra)
    report = {"format": "peft", "path": str(out), "base": str(src.base_path)}
    if verify:
        a, tok = load_adapter_model(src, compute_dtype="float32", progress=False)
        b, _ = load_adapter_model(resolve_adapter(out, src.base_path), compute_dtype="float32", progress=False)
        ids = _probe_ids(tok)
        diff = (_logits(a, ids) - _logits(b, ids)).abs().max().item()
        if diff != 0.0:
            raise RuntimeError(f"exported adapter {out} reloads with different logits (max |Δ| {diff:.3g})")
        report["parity_max_abs_logit_diff"] = diff
    return report


def export_bnb4(source, out, *, base=None, overwrite: bool = False, verify: bool = True, quant_type: str = "nf4",
                blocksize: int = 64, double_quant: bool = True, compute_dtype="bfloat16", progress: bool = True) -> dict:
    if Path(out).exists() and not overwrite:
        raise FileExistsError(f"{out} already exists; pass --overwrite to replace it")
    model, tok, info = dense_source(source, base, progress)
    rep = save_bnb4(model, tok, out, quant_type=quant_type, blocksize=blocksize, double_quant=double_quant,
                    compute_dtype=compute_dtype, overwrite=overwrite, extra=info)
    report = {"format": "bnb4", "path": str(out), **info, **{k: v for k, v in rep.items() if k != "per_layer"}}
    if verify:
        report.update(verify_bnb4(out, model, tok, blocksize))
    return report


def verify_bnb4(out, model, tok, blocksize: int = 64) -> dict:
    """Load with transformers + bitsandbytes; logits must match what the file holds, computed by lowbit (fp32):
    deq(Q) for every layer it quantized, the rest (routers, towers, fused experts) as stored."""
    from transformers import AutoModelForCausalLM
    q = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    # train mode: bitsandbytes' eval CPU path repacks weights to a bf16 kernel (see README); dropout off by hand
    q.train()
    for m in q.modules():
        if isinstance(m, torch.nn.Dropout):
            m.eval()
        if hasattr(m, "compute_dtype"):  # bitsandbytes Linear4bit: compare in fp32, exactly
            m.compute_dtype = torch.float32
    cfg = q.config.quantization_config
    ref = bnb4_reference(model, cfg.bnb_4bit_quant_type, blocksize, cfg.bnb_4bit_use_double_quant,
                         skip_modules=cfg.llm_int8_skip_modules or ("lm_head",),
                         experts_dtype=cfg.bnb_4bit_compute_dtype).eval()
    ids = _probe_ids(tok)
    with torch.no_grad():
        got = q(input_ids=ids).logits.float()
    want = _logits(ref, ids)
    dense = _logits(model, ids)
    diff = (got - want).abs().max().item()
    if diff > 1e-3 * max(want.abs().max().item(), 1.0):
        raise ExportCheckError(f"bitsandbytes reload of {out} differs from the weights lowbit wrote by {diff:.3g}; "
                               "the file is kept for inspection — report this with the model's config")
    return {"bnb_reload_vs_lowbit_deq_max_abs_logit_diff": diff,
            "bnb_vs_dense_max_abs_logit_diff": (got - dense).abs().max().item()}


def export_gguf_file(source, out, *, base=None, gguf_type: str = "F16", overwrite: bool = False, verify: bool = True,
                     progress: bool = True, imatrix=None, calibration=None) -> dict:
    """Dense model (merged from an adapter when given one) → GGUF; `imatrix` (a llama-imatrix file) or
    `calibration` (text to compute one from) weighs the k-quants' errors as llama-quantize does."""
    if Path(out).exists() and not overwrite:
        raise FileExistsError(f"{out} already exists; pass --overwrite to replace it")
    if imatrix is not None and calibration is not None:
        raise ConfigError("give --imatrix FILE or --calibration TEXT, not both")
    model, tok, info = dense_source(source, base, progress)
    weights = None
    if imatrix is not None:
        weights = read_imatrix(imatrix)
    elif calibration is not None:
        names = {hf: g for (g, _), hf in zip(gguf_tensors(model, GGUF_ARCHS.get(model.config.model_type, "LLAMA")),
                                               _hf_names(model), strict=True)}
        weights = compute_imatrix(model, tok, calibration, names, progress=progress)
    rep = export_gguf(model, tok, out, gguf_type, overwrite=overwrite, progress=progress, imatrix=weights)
    report = {"format": "gguf", **info, **rep}
    if verify:
        report.update(verify_gguf(out, model, tok, gguf_type))
    return report


def gguf_reference(model, gguf_path):
    """A copy of `model` holding exactly the weights the GGUF file decodes to (undoing permute / +1)."""
    import copy

    import gguf
    reader = gguf.GGUFReader(str(gguf_path))
    stored = {t.name: t for t in reader.tensors}
    ref = copy.deepcopy(model)
    arch_key = GGUF_ARCHS[model.config.model_type]
    names = {}
    for (gname, _), hf_name in zip(gguf_tensors(model, arch_key), _hf_names(model), strict=True):
        names[hf_name] = gname
    sd = ref.state_dict()
    cfg = model.config
    for hf_name, gname in names.items():
        t = stored[gname]
        w = torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type).copy()).float().reshape(sd[hf_name].shape)
        if arch_key == "LLAMA" and hf_name.endswith(("q_proj.weight", "k_proj.weight")):
            n_kv = cfg.num_attention_heads if hf_name.endswith("q_proj.weight") else cfg.num_key_value_heads
            w = _unpermute(w, n_kv)
        if arch_key in GEMMAS and hf_name.endswith("norm.weight"):
            w = w - 1
        with torch.no_grad():
            sd[hf_name].copy_(w)
    return ref, reader


def _hf_names(model):
    tied = getattr(model.config, "tie_word_embeddings", False)
    return [k for k in model.state_dict() if not (tied and k == "lm_head.weight")]


def _unpermute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    dim = w.shape[0] // n_head // 2
    return w.reshape(n_head, dim, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def verify_gguf(out, model, tok, gguf_type: str) -> dict:
    """Read back with gguf.GGUFReader and transformers' GGUF loader; logits must match the decoded weights."""
    from transformers import AutoModelForCausalLM
    out = Path(out)
    ref, reader = gguf_reference(model, out)
    if len(reader.tensors) != len(_hf_names(model)):
        raise RuntimeError(f"{out} holds {len(reader.tensors)} tensors, expected {len(_hf_names(model))}")
    g = AutoModelForCausalLM.from_pretrained(out.parent, gguf_file=out.name, dtype=torch.float32).eval()
    ids = _probe_ids(tok)
    got, want, dense = _logits(g, ids), _logits(ref.eval(), ids), _logits(model, ids)
    diff = (got - want).abs().max().item()
    if diff > 1e-3 * max(want.abs().max().item(), 1.0):
        raise RuntimeError(f"transformers' GGUF load of {out} differs from the file's decoded weights by {diff:.3g}")
    return {"gguf_reload_vs_decoded_max_abs_logit_diff": diff,
            "gguf_vs_dense_max_abs_logit_diff": (got - dense).abs().max().item()}


def export(source, out, fmt: str, *, base=None, gguf_type: str = "F16", dtype: str = "bfloat16",
           overwrite: bool = False, verify: bool = True, progress: bool = True, imatrix=None,
           calibration=None) -> dict:
    if fmt not in FORMATS:
        raise ConfigError(f"--format {fmt!r} unknown; choose one of {', '.join(FORMATS)}")
    if fmt == "peft":
        return export_peft(source, out, base=base, overwrite=overwrite, verify=verify)
    if fmt == "merged":
        return {"format": "merged", "path": str(out),
                **merge(source, out, base=base, dtype=dtype, overwrite=overwrite, verify=verify, progress=progress)}
    if fmt == "bnb4":
        return export_bnb4(source, out, base=base, overwrite=overwrite, verify=verify, progress=progress)
    return export_gguf_file(source, out, base=base, gguf_type=gguf_type, overwrite=overwrite, verify=verify,
                            progress=progress, imatrix=imatrix, calibration=calibration)
