"""Cross-field checks of a training config: combinations that cannot run, refused before any work.

Single-field types, choices and bounds are the schema's (`recipes.config`); these checks only raise.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

from lowbit.errors import ConfigError, InputError
from lowbit.format.codes import BLOCKSIZES
from lowbit.recipes.qat_run import qat_config

# report_to backend → the module it needs (HF Trainer's own integrations are not wired: they would log
# HF's metrics without lowbit's and break exact resume, so they are refused rather than ignored)
REPORTERS = {"jsonl": None, "tensorboard": "tensorboard"}


def check_run(cfg) -> None:
    _check_quant(cfg)
    _check_lora(cfg)
    _check_train(cfg)
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
