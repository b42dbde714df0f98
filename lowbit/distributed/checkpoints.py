"""Checkpoints that only count once complete, and rotation that never deletes the last good one.

HF Trainer writes `checkpoint-N/` file by file; a kill mid-save leaves a folder that looks
like a checkpoint. After every rank has finished saving, rank 0 writes `lowbit_complete.json`
(atomically) listing each file and its size; resume only accepts folders whose marker matches
what is on disk. Rotation runs after the marker, so the previous good checkpoint is deleted
only once the new one is complete (HF's own rotation runs before its `on_save`, so it is
switched off: save_total_limit=None in TrainingArguments).
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from transformers import TrainerCallback

from lowbit.errors import InputError
from lowbit.utils.io import write_json

MARKER = "lowbit_complete.json"
PREFIX = "checkpoint-"


def _step(p: Path) -> int:
    try:
        return int(p.name[len(PREFIX):])
    except ValueError:
        return -1


def _files(folder: Path) -> dict[str, int]:
    return {str(f.relative_to(folder)): f.stat().st_size for f in sorted(folder.rglob("*"))
            if f.is_file() and f.name != MARKER}


def _fsync(folder: Path) -> None:
    """Flush every file (and the folder entries) so the marker never outlives the data on power loss."""
    for f in folder.rglob("*"):
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
    for d in [folder, *(p for p in folder.rglob("*") if p.is_dir())]:
        fd = os.open(d, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def mark_complete(folder: Path, step: int) -> None:
    _fsync(folder)
    write_json(folder / MARKER, {"format": "lowbit.checkpoint", "step": step, "files": _files(folder)})


def is_complete(folder: Path) -> bool:
    try:
        marker = json.loads((folder / MARKER).read_text())
    except (OSError, ValueError):
        return False
    on_disk = _files(folder)
    return all(on_disk.get(name) == size for name, size in marker.get("files", {}).items())


def checkpoints(out: Path) -> list[Path]:
    """checkpoint-N folders under `out`, oldest first."""
    return sorted((p for p in Path(out).glob(PREFIX + "*") if p.is_dir() and _step(p) >= 0), key=_step)


def latest_complete(out: Path) -> Path | None:
    done = [p for p in checkpoints(out) if is_complete(p)]
    return done[-1] if done else None


def resolve_resume(out: Path, resume_from: str, is_main: bool = True) -> str | None:
    """The checkpoint to resume from for train.resume_from (none | auto | <dir>), or None.

    auto: the newest complete checkpoint; incomplete ones (a kill mid-save) are removed by the
    main process so the re-run can write them afresh."""
    if resume_from == "none":
        return None
    if resume_from == "auto":
        found = latest_complete(out)
        if is_main:
            for p in checkpoints(out):
                if not is_complete(p):
                    shutil.rmtree(p, ignore_errors=True)
        return str(found) if found else None
    p = Path(resume_from)
    if not p.is_dir():
        raise InputError(f"train.resume_from {resume_from} does not exist; use train.resume_from=auto or a "
                         f"checkpoint-N folder under {out}")
    if not is_complete(p):
        good = latest_complete(p.parent)
        hint = f"resume from {good} (or train.resume_from=auto)" if good else "start without train.resume_from"
        raise InputError(f"train.resume_from {p} is not a complete lowbit checkpoint (no matching {MARKER}: the "
                         f"run was killed while saving it); {hint}")
    return str(p)


def rotate(out: Path, keep_last: int | None) -> list[Path]:
    """Delete incomplete checkpoints older than the newest complete one, and complete ones
    beyond the newest `keep_last`. Returns what was removed."""
    all_ckpts = checkpoints(out)
    done = [p for p in all_ckpts if is_complete(p)]
    if not done:
        return []
    newest = _step(done[-1])
    doomed = [p for p in all_ckpts if p not in done and _step(p) < newest]
    if keep_last:
        doomed += done[:-keep_last]
    for p in doomed:
        shutil.rmtree(p, ignore_errors=True)
    return doomed


class CompleteCheckpoints(TrainerCallback):
    """on_save: wait for every rank, mark the new checkpoint complete, then rotate."""

    def __init__(self, keep_last: int | None):
        self.keep_last = keep_last

    def on_save(self, args, state, control, **kw):
        import torch.distributed as dist
        if dist.is_available() and dist.is_initialized():
            dist.barrier()  # every rank's optimizer shard / rng_state_<rank>.pth is on disk
        if state.is_world_process_zero:
            folder = Path(args.output_dir) / f"{PREFIX}{state.global_step}"
            mark_complete(folder, state.global_step)
            rotate(Path(args.output_dir), self.keep_last)
        if dist.is_available() and dist.is_initialized():
            dist.barrier()  # nobody moves on (or gets killed) believing a checkpoint exists before it does
        return control
