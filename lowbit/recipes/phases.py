"""The training recipe as named phases: data → model → evaluate (before) → trainer → train → evaluate (after) → save.

`run(cfg)` calls them in order on one `Run`, the state they hand each other; each phase is short
enough to read at once, and a script can call them one by one (e.g. to stop after `data`).
"""
from __future__ import annotations

import math
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import AutoTokenizer, set_seed

from lowbit.distributed import validate as scale_check
from lowbit.distributed.checkpoints import CompleteCheckpoints, resolve_resume
from lowbit.distributed.zero3 import zero3_gathered
from lowbit.errors import ConfigError, InputError, TrainingError
from lowbit.methods import qat
from lowbit.methods.loftq import apply_loftq
from lowbit.models import load_model
from lowbit.models.load import _read_config
from lowbit.modules.lora import add_lora, prepare_for_kbit_training
from lowbit.recipes import qat_run
from lowbit.recipes.callbacks import JsonlLogger, StopOnNonFinite
from lowbit.recipes.config import RunConfig
from lowbit.recipes.data import build_datasets
from lowbit.recipes.distill import check_vocab, head_rows
from lowbit.recipes.loftq_init import RunLoftQ, loftq_for_run
from lowbit.recipes.loss import perplexity
from lowbit.recipes.trainer import LowbitTrainer, method_config, method_trainer, resolve_checkpoint_layers
from lowbit.utils.batching import Collator
from lowbit.utils.hashing import model_folder_hash
from lowbit.utils.io import atomic_dir
from lowbit.utils.modules import unwrap_peft
from lowbit.utils.run_record import BaseModelRecord, EngineRecord, RunRecord

PHASES = ("data", "model", "evaluate", "trainer", "train", "evaluate", "save")


@dataclass
class Run:
    """What the phases hand each other."""
    cfg: RunConfig
    out: Path
    engine: scale_check.Engine
    resume: str | None = None
    model: object = None
    tok: object = None
    loftq: RunLoftQ | None = None
    qat_config: object = None
    train_examples: list = field(default_factory=list)
    eval_examples: list = field(default_factory=list)
    collate: Collator | None = None
    trainer: LowbitTrainer | None = None
    metrics: dict = field(default_factory=dict)


def run(cfg: RunConfig) -> dict:
    """The whole recipe; returns the metrics also written to lowbit_run.json."""
    r = start(cfg)
    data_phase(r)  # before the model: a bad row or a missing file stops the run before the expensive part
    model_phase(r)
    evaluate_phase(r, "before")
    trainer_phase(r)
    train_phase(r)
    evaluate_phase(r, "after")
    save_phase(r)
    return r.metrics


def start(cfg: RunConfig) -> Run:
    """Refuse what cannot run (output folder, scale-out combinations) before any work; seed everything."""
    out = _check_output_dir(cfg)
    engine = scale_check.validate(cfg)
    set_seed(cfg.train.seed)
    # only checkpoints marked complete count: a kill mid-save leaves a folder that is not one
    resume = resolve_resume(out, cfg.train.resume_from, is_main=int(os.environ.get("RANK", "0")) == 0)
    if resume is None and int(os.environ.get("RANK", "0")) == 0:
        (out / "logs.jsonl").unlink(missing_ok=True)  # a fresh run's log holds only its own steps
    return Run(cfg=cfg, out=out, engine=engine, resume=resume)


def model_phase(r: Run) -> None:
    """4-bit base (LoftQ-requantized when asked) → LoRA adapters → QAT fake quantizers."""
    cfg, q = r.cfg, r.cfg.model.quant
    r.model, _ = load_model(cfg.model.path, load_in_4bit=q.load_in_4bit, quant_type=q.quant_type,
                                blocksize=q.blocksize, double_quant=q.double_quant, storage_dtype=q.storage_dtype,
                                compute_dtype=q.compute_dtype, skip_modules=tuple(q.skip_modules),
                                keep_embeddings_in_compute_dtype=q.keep_embeddings_in_compute_dtype,
                                trust_remote_code=cfg.model.trust_remote_code)
    if cfg.lora.init == "loftq":  # requantize the base in place before LoRA wraps it
        r.loftq = loftq_for_run(r.model, r.tok, cfg, r.out, resuming=r.resume is not None)
    prepare_for_kbit_training(r.model, cfg.train.gradient_checkpointing, resolve_checkpoint_layers(cfg, r.model))
    lc = cfg.lora
    r.model = add_lora(r.model, r=lc.r, alpha=lc.alpha, dropout=lc.dropout, target_modules=lc.target_modules,
                       use_rslora=lc.use_rslora, use_dora=lc.use_dora, target_parameters=lc.target_parameters)
    if r.loftq is not None and r.loftq.result is not None:
        apply_loftq(r.model, r.loftq.result)
    r.model, r.qat_config = qat_run.prepare(r.model, cfg)


def load_tokenizer(cfg: RunConfig):
    tok = AutoTokenizer.from_pretrained(Path(cfg.model.tokenizer or cfg.model.path),
                                        trust_remote_code=cfg.model.trust_remote_code)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def data_phase(r: Run) -> None:
    """Tokenizer and datasets: every row checked, tokenized and packed (or left to TRL for dpo/orpo/grpo)."""
    model_config = _read_config(Path(r.cfg.model.path), r.cfg.model.trust_remote_code)  # missing/foreign: one line
    r.tok = load_tokenizer(r.cfg)
    offline = r.cfg.distill.enabled and r.cfg.distill.source == "offline"
    r.train_examples, r.eval_examples = build_datasets(r.tok, r.cfg.data, r.cfg.train.seed, with_topk=offline)
    r.collate = Collator(r.tok.pad_token_id, model_config)
    r.metrics.update(train_examples=len(r.train_examples) if hasattr(r.train_examples, "__len__") else None,
                     eval_examples=len(r.eval_examples))


def evaluate_phase(r: Run, when: str) -> None:
    """Held-out perplexity `before` or `after` training (when the run has eval data and asks for it)."""
    if not r.eval_examples or not getattr(r.cfg.eval, when):
        return
    head = [unwrap_peft(r.model).get_output_embeddings().weight]
    with zero3_gathered(head if when == "after" else []):  # the chunked loss reads lm_head's weight directly
        ppl = perplexity(r.model, r.eval_examples, r.collate, r.cfg.eval.batch_size, r.cfg.train.loss_chunk_tokens,
                         f"eval {when}")
    r.metrics[f"eval_ppl_{when}"] = ppl
    before = r.metrics.get("eval_ppl_before")
    if when == "after" and before:
        print(f"held-out perplexity: {before:.3f} -> {ppl:.3f}", flush=True)
    else:
        print(f"held-out perplexity {when} training: {ppl:.3f}", flush=True)


def training_arguments(cfg: RunConfig, out: Path):
    """The method's TRL config (a TrainingArguments subclass) with lowbit's loop settings."""
    t = cfg.train
    return method_config(cfg, dict(
        output_dir=str(out), seed=t.seed, max_steps=t.max_steps, num_train_epochs=t.epochs,
        per_device_train_batch_size=t.batch_size, gradient_accumulation_steps=t.grad_accum, learning_rate=t.lr,
        lr_scheduler_type=t.scheduler, warmup_steps=t.warmup_steps, weight_decay=t.weight_decay,
        max_grad_norm=t.max_grad_norm, logging_steps=t.logging_steps,
        save_strategy="steps" if t.save_steps else "no", save_steps=t.save_steps or 500,
        save_total_limit=None, report_to=["tensorboard"] if "tensorboard" in t.report_to else [],
        remove_unused_columns=False, use_cpu=not torch.cuda.is_available(),
        dataloader_num_workers=0, disable_tqdm=False, gradient_checkpointing=False,
        ddp_find_unused_parameters=False,
        # TRL's configs default to bf16 autocast where supported; lowbit's model already computes in
        # model.quant.compute_dtype, and autocast on top would change its numerics
        bf16=False, fp16=False))


def _callbacks(r: Run) -> list:
    t = r.cfg.train
    callbacks = [StopOnNonFinite()] + ([JsonlLogger(r.out / "logs.jsonl")] if "jsonl" in t.report_to else [])
    if t.save_steps:  # mark checkpoints complete, then rotate (HF's own rotation is off)
        callbacks.append(CompleteCheckpoints(t.save_total_limit))
    if r.qat_config is not None:
        callbacks.append(qat_run.QATStep(r.model))
    return callbacks


def trainer_phase(r: Run) -> None:
    """TrainingArguments, callbacks, the checks that need the built model, the teacher, the Trainer."""
    t = r.cfg.train
    args = training_arguments(r.cfg, r.out)
    scale_check.validate_training(r.model, args, r.engine.world_size, r.engine)
    keep = t.save_total_limit + 1 if t.save_steps else 0
    scale_check.check_disk_space(r.out, keep * scale_check.checkpoint_bytes(r.model, t.optimizer) +
                                 scale_check.checkpoint_bytes(r.model, "sgd"))
    teacher = _load_teacher(r.cfg)
    if teacher is not None:
        check_vocab(head_rows(r.model), head_rows(teacher))  # before any step, not at the first loss
        teacher.to(args.device)
    r.trainer = method_trainer(r.cfg, r.model, args, r.tok, r.train_examples, r.collate, _callbacks(r), teacher)


def train_phase(r: Run) -> None:
    result = r.trainer.train(resume_from_checkpoint=r.resume)
    r.metrics.update(train_loss=result.training_loss, train_steps=result.global_step,
                     train_runtime_s=result.metrics.get("train_runtime"))
    if not math.isfinite(result.training_loss):
        raise TrainingError(f"training loss is {result.training_loss}; adapters not saved")
    if r.qat_config is not None:
        qat.set_step(r.model, result.global_step)  # evaluate (and save) the model as it trained last


def save_phase(r: Run) -> None:
    """Adapters, the run record and (QAT) the deployment model; rank 0 writes, every rank joins the gather."""
    with zero3_gathered([p for p in r.model.parameters() if p.requires_grad]):
        if r.trainer.is_world_process_zero():
            with atomic_dir(r.out / "adapter", overwrite=True) as tmp:
                r.model.save_pretrained(tmp, safe_serialization=True)
    if not r.trainer.is_world_process_zero():
        return
    run_record(r).write(r.out)
    print(f"adapters saved to {r.out / 'adapter'}", flush=True)
    if r.qat_config is not None:
        qat_run.save_state(r.model, r.out)
        if r.cfg.qat.save_quantized:
            saved = qat_run.save_quantized(r.model, r.tok, r.out, r.metrics["train_steps"])
            print(f"quantized model saved to {saved}", flush=True)


def run_record(r: Run) -> RunRecord:
    e = r.engine
    return RunRecord(
        base_model=BaseModelRecord(path=str(r.cfg.model.path), sha256=model_folder_hash(r.cfg.model.path),
                                   model_type=unwrap_peft(r.model).config.model_type),
        config=r.cfg.to_dict(), metrics=r.metrics, loftq=r.loftq.record if r.loftq is not None else None,
        engine=EngineRecord(e.name, e.zero_stage, e.world_size, type(r.trainer.model_wrapped).__name__))


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


def _load_teacher(cfg: RunConfig):
    """The frozen full-precision teacher for online distillation (None otherwise)."""
    d = cfg.distill
    if not d.online:
        return None
    path = cfg.model.path if d.teacher == "base" else d.teacher
    teacher, _ = load_model(path, load_in_4bit=False, compute_dtype=cfg.model.quant.compute_dtype,
                            trust_remote_code=cfg.model.trust_remote_code, progress=False)
    print(f"distilling from {path} (T={d.temperature}, alpha={d.alpha})", flush=True)
    return teacher.eval().requires_grad_(False)
