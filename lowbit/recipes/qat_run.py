"""The QAT part of a training run: prepare after LoRA, step the quantizers, save what deploys."""
from __future__ import annotations

import json
from pathlib import Path

from transformers import TrainerCallback

from lowbit.errors import ConfigError
from lowbit.methods import qat
from lowbit.utils.io import save_safetensors
from lowbit.utils.modules import unwrap_peft


def qat_config(cfg):
    """The run's `QATConfig` (None when qat.scheme is empty), with the section's overrides."""
    if not cfg.qat.scheme:
        return None
    q = qat.resolve(cfg.qat.scheme)
    if cfg.qat.kv_position is not None:
        q.kv_position = cfg.qat.kv_position
    if cfg.qat.start_step is not None:
        for role in (q.weight, q.activation, q.kv):
            if role is not None:
                role.start_step = cfg.qat.start_step
    q.check()
    if q.weight is not None and cfg.lora.dropout:
        raise ConfigError(f"qat.scheme {cfg.qat.scheme!r} fake-quantizes the merged weight deq(W) + s·BA, which LoRA "
                          f"dropout cannot pass through; set lora.dropout: 0 (got {cfg.lora.dropout})")
    return q


class QATStep(TrainerCallback):
    """Quantizers with a start_step switch on at that optimizer step (and stay on for eval)."""

    def __init__(self, model):
        self.model = model

    def on_step_begin(self, args, state, control, **kw):
        qat.set_step(self.model, state.global_step)


def prepare(model, cfg):
    """(model with fake quantizers, QATConfig) — or (model, None) when qat.scheme is empty."""
    q = qat_config(cfg)
    if q is None:
        return model, None
    qat.prepare(model, q)
    n = len(qat.quantizers(model))
    print(f"QAT {q.name or cfg.qat.scheme}: {n} fake quantizers (kv {q.kv_position if q.kv else 'off'})", flush=True)
    return model, q


def save_state(model, out: Path) -> Path | None:
    """Learned scales and calibrated ranges (the adapter files do not hold them)."""
    state = {f"{n}.{k}": v for n, m in model.named_modules() if isinstance(m, qat.FakeQuantizer)
             for k, v in list(m.named_parameters(recurse=False)) + list(m.named_buffers(recurse=False))}
    if not state:
        return None
    cfg = getattr(model, "lowbit_qat_config", None) or getattr(unwrap_peft(model), "lowbit_qat_config", None)
    save_safetensors(state, out / "qat_state.safetensors",
                     metadata={"format": "lowbit.qat_state", "version": "1", "qat_config": json.dumps(cfg.to_dict())})
    return out / "qat_state.safetensors"


def save_quantized(model, tok, out: Path, global_step: int) -> Path:
    """convert (merges LoRA into the quantized weights, in place) and save the deployment model. A GGUF scheme
    saves the dense weights before rounding instead: `lowbit export <run> x.gguf` turns them into the trained codes."""
    qat.set_step(model, global_step)
    cfg = getattr(unwrap_peft(model), "lowbit_qat_config", None) or getattr(model, "lowbit_qat_config", None)
    if cfg is not None and cfg.weight is not None and cfg.weight.dtype == "gguf":
        return qat.save_dense(model, out / "quantized", tok)
    converted = qat.convert(model)
    return qat.save_quantized(converted, out / "quantized", tok, overwrite=True)
