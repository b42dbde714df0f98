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
from lowbit.methods.qat import gguf as gguf_qat
from lowbit.models.gguf_arch import family, gguf_layout, gguf_tensors, hf_tensors
from lowbit.utils.io import atomic_dir
from lowbit.utils.run_record import RUN_FILE

FORMATS = ("peft", "merged", "bnb4", "gguf")


class ExportCheckError(LowbitError, RuntimeError):
    """An export did not load back the way it was written."""


def _is_adapter(p: Path) -> bool:
    return (p / "adapter_config.json").exists() or (p / "adapter" / "adapter_config.json").exists()


MERGE_INTO = ("trained", "16bit")


def dense_source(source, base=None, progress: bool = True, merge_into: str = "trained"):
    """(dense fp32 HF model, tokenizer, info) from an adapter (merged in memory) or a dense model folder.

    merge_into="trained": the adapter lands on the dequantized 4-bit base it trained on (the trained model exactly);
    "16bit": on the base's original 16-bit weights (for a re-quantized export, where the NF4 rounding would otherwise
    be paid twice; measured to keep more of a QLoRA gain through Q4_K_M, BENCHMARKS "QAT toward GGUF file types")."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    if merge_into not in MERGE_INTO:
        raise ConfigError(f"merge_into {merge_into!r} unknown; choose one of {', '.join(MERGE_INTO)}")
    p = Path(source)
    if not p.exists():
        raise InputError(f"export source {p} does not exist")
    if _is_adapter(p):
        src = resolve_adapter(p, base)
        info = {"adapter": str(src.adapter_dir), "base": str(src.base_path), "merged_into": merge_into}
        if merge_into == "16bit":
            return *_merge_16bit(src, progress), info
        pm, tok = load_adapter_model(src, compute_dtype="float32", progress=progress)
        return merge_into_dense(pm, torch.float32), tok, info
    if merge_into != "trained":
        raise ConfigError(f"--merge-into {merge_into}: {p} is a dense model, not an adapter; nothing to merge")
    if not (p / "config.json").exists():
        raise InputError(f"{p} is neither a peft adapter / lowbit run folder nor an HF model folder (no config.json)")
    if "quantization_config" in (p / "config.json").read_text():
        raise InputError(f"{p} is already quantized; export from the adapter or the merged (dense) checkpoint")
    model = AutoModelForCausalLM.from_pretrained(p, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(p), {"model": str(p)}


def _merge_16bit(src, progress: bool):
    """The adapter merged into the base's original (unquantized) weights → (fp32 HF model, tokenizer)."""
    from lowbit.models import load_model
    from lowbit.modules.lora import load_adapter
    if src.loftq_base() is not None or (src.run is not None and src.run.loftq):
        raise ConfigError("--merge-into 16bit: this adapter was initialized by LoftQ to correct its NF4 base's rounding; "
                          "on the 16-bit weights that correction would be applied twice. Use --merge-into trained")
    scheme = ((src.run.config.get("qat") or {}).get("scheme") if src.run is not None else None)
    if scheme:
        raise ConfigError(f"--merge-into 16bit: this run trained through fake quantization ({scheme}); its adapter fits "
                          "those rounded weights. Use --merge-into trained")
    model, tok = load_model(src.base_path, load_in_4bit=False, compute_dtype="float32", progress=progress)
    pm = load_adapter(model, src.adapter_dir)
    return pm.merge_and_unload().eval(), tok


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
                blocksize: int = 64, double_quant: bool = True, compute_dtype="bfloat16", progress: bool = True,
                merge_into: str = "trained") -> dict:
    if Path(out).exists() and not overwrite:
        raise FileExistsError(f"{out} already exists; pass --overwrite to replace it")
    model, tok, info = dense_source(source, base, progress, merge_into)
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


def export_gguf_file(source, out, *, base=None, gguf_type: str | None = "F16", overwrite: bool = False, verify: bool = True,
                     progress: bool = True, imatrix=None, calibration=None, merge_into: str = "trained") -> dict:
    """Dense model (merged from an adapter when given one) → GGUF; `imatrix` (a llama-imatrix file) or
    `calibration` (text to compute one from) weighs the k-quants' errors as llama-quantize does."""
    if Path(out).exists() and not overwrite:
        raise FileExistsError(f"{out} already exists; pass --overwrite to replace it")
    # a GGUF QAT run exports its saved dense weights (exactly the trained codes); no type given = the trained one
    source, gguf_type = gguf_qat.export_source(source, gguf_type)
    if imatrix is not None and calibration is not None:
        raise ConfigError("give --imatrix FILE or --calibration TEXT, not both")
    model, tok, info = dense_source(source, base, progress, merge_into)
    weights = None
    if imatrix is not None:
        weights = read_imatrix(imatrix)
    elif calibration is not None:
        family(model)  # an unsupported family fails here, before the calibration run
        names = {hf: pieces[0][0] for hf, pieces in gguf_layout(model) if len(pieces) == 1}
        weights = compute_imatrix(model, tok, calibration, names, progress=progress)
    rep = export_gguf(model, tok, out, gguf_type, overwrite=overwrite, progress=progress, imatrix=weights)
    report = {"format": "gguf", **info, **rep}
    if verify:
        report.update(verify_gguf(out, model, tok, gguf_type))
    return report


def gguf_reference(model, gguf_path):
    """A copy of `model` holding exactly the weights the GGUF file decodes to (the family's inverse conventions
    undo permutes / norm offsets / splits); towers the GGUF does not hold keep the model's weights."""
    import copy

    import gguf
    reader = gguf.GGUFReader(str(gguf_path))
    stored = {t.name: torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type).copy()) for t in reader.tensors}
    ref = copy.deepcopy(model)
    sd = ref.state_dict()
    with torch.no_grad():
        for hf_name, w in hf_tensors(model, stored).items():
            sd[hf_name].copy_(w)
    return ref, reader


def _hf_names(model):
    return [hf for hf, _ in gguf_layout(model)]


def _gguf_names(model):
    return [g for g, _ in gguf_tensors(model)]


# model_types whose GGUF transformers' loader (modeling_gguf_pytorch_utils) rebuilds as the same model; the
# others are checked through gguf-py alone (mixtral: it reads a LLAMA file as dense llama; gpt-oss: its reader
# of the rope.scaling keys fails on any file that has them)
TRANSFORMERS_GGUF = ("llama", "mistral", "qwen2", "qwen3", "qwen3_moe", "gemma2", "gemma3_text", "gemma3", "phi3", "gpt2")


# config settings transformers' GGUF loader must rebuild as the model has them for its logits to be comparable
_LOADER_KEYS = ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim",
                "intermediate_size", "moe_intermediate_size", "num_experts", "num_local_experts", "num_experts_per_tok",
                "n_positions", "vocab_size", "query_pre_attn_scalar", "sliding_window", "final_logit_softcapping",
                "attn_logit_softcapping")


def _loader_config_mismatch(model, loaded) -> str:
    cfg = getattr(model.config, "text_config", None) or model.config
    loaded = getattr(loaded, "text_config", None) or loaded
    diffs = [f"{k}={getattr(loaded, k)!r} (model: {getattr(cfg, k)!r})" for k in _LOADER_KEYS
             if hasattr(cfg, k) and hasattr(loaded, k) and getattr(cfg, k) != getattr(loaded, k)]
    kinds = [(getattr(c, "rope_parameters", None) or {}).get("rope_type", "default") for c in (cfg, loaded)]
    if kinds[0] != kinds[1]:  # e.g. llama3 rope scaling, which llama.cpp reads from rope_freqs
        diffs.append(f"rope_type={kinds[1]!r} (model: {kinds[0]!r})")
    return ", ".join(diffs)


def verify_gguf(out, model, tok, gguf_type: str) -> dict:
    """Read back with gguf.GGUFReader (decoded through the family's inverse conventions) and, where it knows
    the family, transformers' GGUF loader; its logits must match the decoded weights'."""
    out = Path(out)
    ref, reader = gguf_reference(model, out)
    want_names = _gguf_names(model)
    if sorted(t.name for t in reader.tensors) != sorted(want_names):
        raise ExportCheckError(f"{out} holds {len(reader.tensors)} tensors, expected {len(want_names)}")
    ids = _probe_ids(tok)
    want, dense = _logits(ref.eval(), ids), _logits(model, ids)
    report = {"gguf_decoded_vs_dense_max_abs_logit_diff": (want - dense).abs().max().item()}
    if gguf_type == "F32" and report["gguf_decoded_vs_dense_max_abs_logit_diff"] > 1e-4 * max(dense.abs().max().item(), 1):
        raise ExportCheckError(f"{out} (F32) decodes to a model whose logits differ from the source by "
                               f"{report['gguf_decoded_vs_dense_max_abs_logit_diff']:.3g}; the layout conventions of "
                               f"{model.config.model_type} are wrong — report this with the model's config")
    if model.config.model_type not in TRANSFORMERS_GGUF:
        report["transformers_gguf_load"] = f"skipped: transformers' GGUF loader does not read {model.config.model_type}"
        return report
    from transformers import AutoConfig, AutoModelForCausalLM
    differs = _loader_config_mismatch(model, AutoConfig.from_pretrained(out.parent, gguf_file=out.name))
    if differs:  # e.g. a head_dim it does not read from the file: its model would not be this one
        report["transformers_gguf_load"] = f"skipped: transformers' GGUF loader would rebuild {differs}"
        return report
    g = AutoModelForCausalLM.from_pretrained(out.parent, gguf_file=out.name, dtype=torch.float32).eval()
    got = _logits(g, ids)
    diff = (got - want).abs().max().item()
    if diff > 1e-3 * max(want.abs().max().item(), 1.0):
        raise ExportCheckError(f"transformers' GGUF load of {out} differs from the file's decoded weights by "
                               f"{diff:.3g}; the file is kept for inspection")
    report["transformers_gguf_load"] = "ok"
    report.update({"gguf_reload_vs_decoded_max_abs_logit_diff": diff,
                   "gguf_vs_dense_max_abs_logit_diff": (got - dense).abs().max().item()})
    return report


def export(source, out, fmt: str, *, base=None, gguf_type: str | None = "F16", dtype: str = "bfloat16",
           overwrite: bool = False, verify: bool = True, progress: bool = True, imatrix=None,
           calibration=None, merge_into: str = "trained") -> dict:
    if fmt not in FORMATS:
        raise ConfigError(f"--format {fmt!r} unknown; choose one of {', '.join(FORMATS)}")
    if merge_into != "trained" and fmt not in ("bnb4", "gguf"):
        raise ConfigError(f"--merge-into {merge_into} re-bases a quantized export; use it with --format gguf or bnb4")
    if fmt == "peft":
        return export_peft(source, out, base=base, overwrite=overwrite, verify=verify)
    if fmt == "merged":
        return {"format": "merged", "path": str(out),
                **merge(source, out, base=base, dtype=dtype, overwrite=overwrite, verify=verify, progress=progress)}
    if fmt == "bnb4":
        return export_bnb4(source, out, base=base, overwrite=overwrite, verify=verify, progress=progress,
                           merge_into=merge_into)
    return export_gguf_file(source, out, base=base, gguf_type=gguf_type, overwrite=overwrite, verify=verify,
                            progress=progress, imatrix=imatrix, calibration=calibration, merge_into=merge_into)
