"""Cross-field checks of a training config: combinations that cannot run, refused before any work.

Single-field types, choices and bounds are the schema's (`recipes.config`); these checks only raise.
"""
from __future__ import annotations

import importlib
import importlib.util
import os
from pathlib import Path

from lowbit.errors import ConfigError, InputError
from lowbit.format.codes import BLOCKSIZES
from lowbit.recipes.qat_run import qat_config

# report_to backend → the module it needs (HF Trainer's own integrations are not wired: they would log
# HF's metrics without lowbit's and break exact resume, so they are refused rather than ignored)
REPORTERS = {"jsonl": None, "tensorboard": "tensorboard"}


# the data format each method trains on
METHOD_FORMATS = {"sft": ("text", "prompt_completion", "chat", "generated"), "dpo": ("preference",),
                  "orpo": ("preference",), "grpo": ("prompt",)}


def check_run(cfg) -> None:
    _check_quant(cfg)
    _check_lora(cfg)
    _check_train(cfg)
    _check_method(cfg)
    _check_data(cfg)
    if cfg.qat.scheme:
        qat_config(cfg)  # resolvable, and compatible with the LoRA settings
    _check_distill(cfg)


def _check_quant(cfg) -> None:
    q = cfg.model.quant
    if q.blocksize not in BLOCKSIZES:
        raise ConfigError(f"invalid model.quant.blocksize {q.blocksize}: choose one of "
                          f"{', '.join(map(str, BLOCKSIZES))}")


def _check_lora(cfg) -> None:
    if cfg.lora.init != "loftq":
        return
    if not cfg.model.quant.load_in_4bit:
        raise ConfigError("lora.init=loftq needs a 4-bit base (model.quant.load_in_4bit=true); use lora.init=zero")
    if cfg.lora.use_dora:
        raise ConfigError("lora.init=loftq cannot be combined with lora.use_dora (DoRA's magnitude vector changes "
                          "the delta LoftQ solves for); drop one of them")


def _check_train(cfg) -> None:
    t = cfg.train
    if t.max_steps == 0 or t.max_steps < -1:
        raise ConfigError(f"train.max_steps={t.max_steps} trains nothing; use -1 for train.epochs or a positive "
                          "number")
    for name in t.report_to:
        module = REPORTERS[name]
        if module is not None and importlib.util.find_spec(module) is None:
            raise ConfigError(f"train.report_to: {name} needs the '{module}' package, which is not installed; "
                              f"`pip install {module}` or drop {name} from train.report_to")


def _check_distill(cfg) -> None:
    d = cfg.distill
    if d.source == "offline" and cfg.data.format != "generated":
        raise ConfigError("distill.source=offline reads the teacher's top-k logits stored by `lowbit generate`; set "
                          "data.format=generated with data.train_files=[<generate output dir>], or distill.source=online")
    if d.teacher and d.teacher != "base" and not Path(d.teacher).exists():
        raise InputError(f"distill.teacher {d.teacher} does not exist; give a model folder or 'base' (model.path "
                         "unquantized)")


def _check_method(cfg) -> None:
    m, t = cfg.train.method, cfg.train
    formats = {s.format or cfg.data.format for s in cfg.data.datasets} or {cfg.data.format}
    wrong = sorted(formats - set(METHOD_FORMATS[m]))
    if wrong:
        raise ConfigError(f"train.method={m} trains on data.format {' or '.join(METHOD_FORMATS[m])}, got "
                          f"{', '.join(wrong)}; set data.format (TRL's dataset formats: prompt/chosen/rejected for "
                          "preference, prompt for grpo)")
    if m != "sft" and cfg.distill.enabled:
        raise ConfigError(f"a distill section trains with train.method=sft; train.method={m} has its own loss")
    if m == "grpo":
        if not cfg.grpo.reward_funcs:
            raise ConfigError("train.method=grpo needs grpo.reward_funcs: ['module:function', ...]")
        for spec in cfg.grpo.reward_funcs:
            reward_function(spec)
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if (t.batch_size * t.grad_accum * world) % cfg.grpo.num_generations:
            raise ConfigError(f"grpo.num_generations={cfg.grpo.num_generations} must divide the completions per "
                              f"step (train.batch_size x grad_accum x processes = {t.batch_size * t.grad_accum * world})")


def _check_data(cfg) -> None:
    d = cfg.data
    if d.datasets and d.train_files:
        raise ConfigError("give data.train_files or data.datasets (a weighted mixture), not both")
    if d.streaming and cfg.train.max_steps < 1:
        raise ConfigError("data.streaming=true reads the data lazily, so its length is unknown: set train.max_steps")
    if d.format == "generated" and d.datasets:
        raise ConfigError("data.format=generated reads `lowbit generate` folders from data.train_files, not "
                          "data.datasets")


def reward_function(spec: str):
    """'package.module:function' → the function (checked before any model is loaded)."""
    module, _, name = spec.partition(":")
    if not module or not name:
        raise ConfigError(f"grpo.reward_funcs entry {spec!r} is not 'module:function' (e.g. mypkg.rewards:exact_match)")
    try:
        fn = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as e:
        raise ConfigError(f"grpo.reward_funcs: cannot import {spec!r} ({e}); put the module on PYTHONPATH") from None
    if not callable(fn):
        raise ConfigError(f"grpo.reward_funcs: {spec!r} is not callable")
    return fn
