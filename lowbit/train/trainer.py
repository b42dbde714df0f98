"""The QLoRA recipe: load 4-bit base → LoRA → data → HF Trainer (chunked loss) → eval → save.

One readable function, `run(cfg)`. HF `Trainer` owns the loop, checkpoints, scheduler,
accelerate/DDP integration; we supply the model, the loss and the optimizer.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import platform
import tempfile
from pathlib import Path

import torch
from transformers import Trainer, TrainingArguments

from .. import __version__
from ..errors import ConfigError, InputError, TrainingError
from ..utils.io import atomic_dir, write_json
from . import qat_run
from .callbacks import JsonlLogger, StopOnNonFinite
from .config import RunConfig
from .data import Collator, build_datasets
from .loss import causal_lm_loss, perplexity
from .optim import build_optimizer
from ..scale.zero3 import zero3_gathered

log = logging.getLogger("lowbit")


class LowbitTrainer(Trainer):
    def __init__(self, *a, lowbit_cfg: RunConfig, teacher=None, **kw):
        self.lowbit_cfg = lowbit_cfg
        self.teacher = teacher  # frozen full-precision model for online distillation (None: CE or stored top-k)
        super().__init__(*a, **kw)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        inner = self.accelerator.unwrap_model(model)
        if inner is model:
            loss = self._loss(model, **inputs)
        else:
            # [issue 7 / lowbit.scale] a DDP/DeepSpeed wrapper only all-reduces gradients (ZeRO-3: gathers
            # params) for a forward that goes through it, so run the chunked loss as the inner forward
            inner.forward = lambda **kw: self._loss(inner, **kw)
            try:
                loss = model(**inputs)
            finally:
                del inner.forward
        if not torch.isfinite(loss):
            raise TrainingError(f"loss became {loss.item()} at step {self.state.global_step}; stopping. The last "
                                f"good checkpoint in {self.args.output_dir} is kept — lower train.lr or check the data")
        return (loss, None) if return_outputs else loss

    def _loss(self, model, input_ids, labels, attention_mask=None, topk_values=None, topk_indices=None):
        """Next-token CE, or the distillation loss when the run has a teacher (online or stored top-k)."""
        cfg = self.lowbit_cfg
        chunk = cfg.train.loss_chunk_tokens
        if not cfg.distill.teacher:
            return causal_lm_loss(model, input_ids, labels, attention_mask, chunk)
        from .distill import distill_loss
        d = cfg.distill
        return distill_loss(model, input_ids, labels, attention_mask, teacher=self.teacher,
                            topk_values=topk_values if self.teacher is None else None,
                            topk_indices=topk_indices if self.teacher is None else None,
                            temperature=d.temperature, alpha=d.alpha, chunk_tokens=chunk)

    def create_optimizer(self):
        if self.optimizer is None:
            t = self.lowbit_cfg.train
            self.optimizer = build_optimizer(t.optimizer, self.model.parameters(), t.lr, t.weight_decay)
        return self.optimizer


def base_model_hash(path: str | Path) -> str:
    """sha256 of config.json + every safetensors header: identifies the base cheaply."""
    from ..models.safetensors_stream import read_header
    h = hashlib.sha256((Path(path) / "config.json").read_bytes())
    for f in sorted(Path(path).glob("*.safetensors")):
        header, _ = read_header(f)
        h.update(json.dumps(header, sort_keys=True).encode())
    return h.hexdigest()


def _check_output_dir(cfg: RunConfig) -> Path:
    out = Path(cfg.train.output_dir)
    if (out / "adapter").exists() and not cfg.train.overwrite_output and cfg.train.resume_from == "none":
        raise ConfigError(f"{out} already holds a finished run (adapter/); set train.overwrite_output=true to "
                          "replace it, train.resume_from=auto to continue, or choose another train.output_dir")
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out):
            pass
    except OSError as e:
        raise InputError(f"train.output_dir {out} is not writable ({e.strerror}); choose another directory") from None
    return out


def _resume_arg(cfg: RunConfig, out: Path):
    # [issue 7] only checkpoints marked complete count: a kill mid-save leaves a folder that is not one
    from ..scale.checkpoints import resolve_resume
    return resolve_resume(out, cfg.train.resume_from, is_main=int(os.environ.get("RANK", "0")) == 0)


def _head_weight(model):
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return base.get_output_embeddings().weight


def _load_teacher(cfg: RunConfig):
    """The frozen full-precision teacher for online distillation (None otherwise)."""
    d = cfg.distill
    if not d.teacher or d.source == "offline":
        return None
    from ..models import load_model
    path = cfg.model.path if d.teacher == "base" else d.teacher
    teacher, _ = load_model(path, load_in_4bit=False, compute_dtype=cfg.model.quant.compute_dtype,
                            trust_remote_code=cfg.model.trust_remote_code, progress=False)
    print(f"distilling from {path} (T={d.temperature}, alpha={d.alpha})", flush=True)
    return teacher.eval().requires_grad_(False)


def _save_adapter(model, out: Path) -> Path:
    with atomic_dir(out / "adapter", overwrite=True) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
    return out / "adapter"


def run(cfg: RunConfig) -> dict:
    from transformers import set_seed

    from ..models import load_model
    from ..modules.lora import add_lora, prepare_for_kbit_training
    out = _check_output_dir(cfg)
    from ..scale import validate as scale_check
    engine = scale_check.validate(cfg)  # [issue 7] known-bad scale-out combinations, before any work
    set_seed(cfg.train.seed)
    q = cfg.model.quant
    model, tok = load_model(cfg.model.path, load_in_4bit=q.load_in_4bit, quant_type=q.quant_type,
                            blocksize=q.blocksize, double_quant=q.double_quant, storage_dtype=q.storage_dtype,
                            compute_dtype=q.compute_dtype, skip_modules=tuple(q.skip_modules),
                            keep_embeddings_in_compute_dtype=q.keep_embeddings_in_compute_dtype,
                            trust_remote_code=cfg.model.trust_remote_code)
    if cfg.model.tokenizer:
        from transformers import AutoTokenizer
        tok = AutoTokenizer.from_pretrained(cfg.model.tokenizer)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    resume = _resume_arg(cfg, out)
    loftq = None
    if cfg.lora.init == "loftq":  # [issue 6] requantize the base in place before LoRA wraps it
        from ..export.loftq import loftq_for_run
        loftq = loftq_for_run(model, tok, cfg, out, resuming=resume is not None)
    offline = bool(cfg.distill.teacher) and cfg.distill.source == "offline"
    train_ex, eval_ex = build_datasets(tok, cfg.data, cfg.train.seed, with_topk=offline)
    collate = Collator(tok.pad_token_id)
    prepare_for_kbit_training(model, cfg.train.gradient_checkpointing)
    lc = cfg.lora
    model = add_lora(model, r=lc.r, alpha=lc.alpha, dropout=lc.dropout, target_modules=lc.target_modules,
                     use_rslora=lc.use_rslora, use_dora=lc.use_dora)
    if loftq is not None and loftq.result is not None:
        from ..export.loftq import apply_loftq
        apply_loftq(model, loftq.result)
    model, qcfg = qat_run.prepare(model, cfg)
    metrics: dict = {"train_examples": len(train_ex), "eval_examples": len(eval_ex)}
    chunk = cfg.train.loss_chunk_tokens
    if eval_ex and cfg.eval.before:
        metrics["eval_ppl_before"] = perplexity(model, eval_ex, collate, cfg.eval.batch_size, chunk, "eval before")
        print(f"held-out perplexity before training: {metrics['eval_ppl_before']:.3f}", flush=True)
    t = cfg.train
    args = TrainingArguments(
        output_dir=str(out), seed=t.seed, max_steps=t.max_steps, num_train_epochs=t.epochs,
        per_device_train_batch_size=t.batch_size, gradient_accumulation_steps=t.grad_accum, learning_rate=t.lr,
        lr_scheduler_type=t.scheduler, warmup_steps=t.warmup_steps, weight_decay=t.weight_decay,
        max_grad_norm=t.max_grad_norm, logging_steps=t.logging_steps,
        save_strategy="steps" if t.save_steps else "no", save_steps=t.save_steps or 500,
        save_total_limit=None, report_to=["tensorboard"] if "tensorboard" in t.report_to else [],
        remove_unused_columns=False, use_cpu=not torch.cuda.is_available(),
        dataloader_num_workers=0, disable_tqdm=False, gradient_checkpointing=False,
        ddp_find_unused_parameters=False)
    callbacks = [StopOnNonFinite()] + ([JsonlLogger(out / "logs.jsonl")] if "jsonl" in t.report_to else [])
    if t.save_steps:  # [issue 7] mark checkpoints complete, then rotate (HF's own rotation is off above)
        from ..scale.checkpoints import CompleteCheckpoints
        callbacks.append(CompleteCheckpoints(t.save_total_limit))
    scale_check.validate_training(model, args, engine.world_size, engine)
    keep = (t.save_total_limit or 1) + 1 if t.save_steps else 0
    scale_check.check_disk_space(out, keep * scale_check.checkpoint_bytes(model, t.optimizer) +
                                 scale_check.checkpoint_bytes(model, "sgd"))
    if qcfg is not None:
        callbacks.append(qat_run.QATStep(model))
    trainer = LowbitTrainer(model=model, args=args, train_dataset=train_ex, data_collator=collate,
                            callbacks=callbacks, lowbit_cfg=cfg, teacher=_load_teacher(cfg))
    if trainer.teacher is not None:
        from .distill import _head_rows, check_vocab
        check_vocab(_head_rows(model), _head_rows(trainer.teacher))  # before any step, not at the first loss
        trainer.teacher.to(args.device)
    result = trainer.train(resume_from_checkpoint=resume)
    metrics.update({"train_loss": result.training_loss, "train_steps": result.global_step,
                    "train_runtime_s": result.metrics.get("train_runtime")})
    if not math.isfinite(result.training_loss):
        raise TrainingError(f"training loss is {result.training_loss}; adapters not saved")
    if qcfg is not None:
        from ..qat import set_step
        set_step(model, result.global_step)  # evaluate (and save) the model as it trained last
    if eval_ex and cfg.eval.after:
        with zero3_gathered([_head_weight(model)]):  # [issue 7] the chunked loss reads lm_head's weight directly
            metrics["eval_ppl_after"] = perplexity(model, eval_ex, collate, cfg.eval.batch_size, chunk, "eval after")
        before = metrics.get("eval_ppl_before")
        print(f"held-out perplexity: {before:.3f} -> {metrics['eval_ppl_after']:.3f}" if before else
              f"held-out perplexity after training: {metrics['eval_ppl_after']:.3f}", flush=True)
    with zero3_gathered([p for p in model.parameters() if p.requires_grad]):  # every rank joins the gather
        if trainer.is_world_process_zero():
            adapter = _save_adapter(model, out)
    if trainer.is_world_process_zero():
        write_json(out / "lowbit_run.json", {
            "format": "lowbit.run", "version": 1, "lowbit_version": __version__, "config": cfg.to_dict(),
            "base_model": {"path": str(cfg.model.path), "sha256": base_model_hash(cfg.model.path),
                           "model_type": model.get_base_model().config.model_type},
            "metrics": metrics, **({"loftq": loftq.record} if loftq is not None else {}),
            "torch": torch.__version__, "python": platform.python_version(),
            "world_size": int(os.environ.get("WORLD_SIZE", "1")),
            "engine": {"name": engine.name, "zero_stage": engine.zero_stage, "world_size": engine.world_size,
                       "wrapper": type(trainer.model_wrapped).__name__}})
        print(f"adapters saved to {adapter}", flush=True)
        if qcfg is not None:
            qat_run.save_state(model, out)
            if cfg.qat.save_quantized:
                print(f"quantized model saved to {qat_run.save_quantized(model, tok, out, result.global_step)}",
                      flush=True)
    return metrics
