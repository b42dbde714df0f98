"""`lora.init: loftq` in a training run: requantize the freshly loaded base, save it, reuse it on resume.

`lora.loftq.calibration` names a text file or a `lowbit generate` output folder (data-free: the
teacher's own sequences calibrate the activation-aware fit)."""
from __future__ import annotations

import json
import os
import resource
import sys
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from lowbit.errors import InputError
from lowbit.methods.data_gen.dataset import GeneratedDataset
from lowbit.methods.data_gen.shards import MANIFEST
from lowbit.methods.loftq import (
    LOFTQ_BASE_FILE,
    LOFTQ_REPORT_FILE,
    LoftQResult,
    load_loftq_base,
    loftq_calibrated,
    loftq_requantize,
    save_loftq_base,
)
from lowbit.methods.loftq.calibration import TokenSequences
from lowbit.utils.hashing import file_sha256
from lowbit.utils.io import write_json


@dataclass
class RunLoftQ:
    """What the trainer needs from LoftQ: the factors to copy into the adapters (None when resuming
    from a checkpoint, which holds trained ones) and the record for lowbit_run.json."""

    result: LoftQResult | None
    record: dict


def loftq_for_run(model: nn.Module, tok, cfg, out, resuming: bool = False, progress: bool = True) -> RunLoftQ:
    """`lora.init: loftq` in the trainer: requantize the freshly loaded 4-bit `model` in place and save
    its base (`loftq_base.safetensors`, hashed into the record) and the per-layer error report in `out`.

    A resumed run reloads the saved base instead: its checkpoints were trained against those bytes.
    """
    out = Path(out)
    lc, lq = cfg.lora, cfg.lora.loftq
    base_file = out / LOFTQ_BASE_FILE
    if resuming and base_file.exists():
        load_loftq_base(model, base_file)
        report = out / LOFTQ_REPORT_FILE
        summary = json.loads(report.read_text()) if report.exists() else {}
        summary = {k: v for k, v in summary.items() if k != "per_layer"}
        return RunLoftQ(None, {**summary, "base_file": LOFTQ_BASE_FILE, "base_sha256": file_sha256(base_file),
                               "reused_on_resume": True})
    if resuming:
        raise InputError(f"resuming a lora.init=loftq run needs the LoftQ base it trained on, {base_file}, which is "
                         "missing; start a fresh run (train.resume_from=none)")
    kw = dict(r=lc.r, alpha=lc.alpha, use_rslora=lc.use_rslora, target_modules=lc.target_modules, iters=lq.iters,
              svd=lq.svd, progress=progress)
    if lq.calibration:
        result = loftq_calibrated(model, tok, cfg.model.path, calibration_source(lq.calibration, tok),
                                  samples=lq.calibration_samples,
                                  seq_len=lq.calibration_seq_len, damp=lq.damp, **kw)
    else:
        result = loftq_requantize(model, cfg.model.path, **kw)
    s = result.summary()
    print(f"LoftQ ({s['metric']} error, {s['layers']} layers, {result.seconds:.1f} s): mean error "
          f"{s['mean_zero_init_error']:.4f} (zero init) -> {s['mean_loftq_error']:.4f}", flush=True)
    s["peak_rss_mb"] = round(_peak_rss_mb(), 1)  # the process so far: load + LoftQ (training comes later)
    sha = None
    if int(os.environ.get("RANK", "0")) == 0:  # every rank computes the same base; one writes it (and the run record)
        write_json(out / LOFTQ_REPORT_FILE, result.report())
        save_loftq_base(model, base_file)
        sha = file_sha256(base_file)
    return RunLoftQ(result, {**s, "base_file": LOFTQ_BASE_FILE, "base_sha256": sha, "report_file": LOFTQ_REPORT_FILE})


def calibration_source(path, tok):
    """A text file as it is; a `lowbit generate` output folder → its sequences (data-free calibration)."""
    p = Path(path)
    if not p.is_dir():
        return path
    if not (p / MANIFEST).is_file():
        raise InputError(f"lora.loftq.calibration {p} is a folder without {MANIFEST}; give a text file or the "
                         "output.dir of `lowbit generate`")
    ds = GeneratedDataset(p, tok)
    return TokenSequences([ds[i]["input_ids"] for i in range(len(ds))], f"{p} (generated)")


def _peak_rss_mb() -> float:
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kb / 1024 / (1024 if sys.platform == "darwin" else 1)  # bytes on macOS, KiB on Linux
