"""Trainer callbacks: JSONL metrics log and the non-finite-loss stop."""
from __future__ import annotations

import json
import math
from pathlib import Path

from transformers import TrainerCallback

from lowbit.errors import TrainingError


class JsonlLogger(TrainerCallback):
    """One JSON object per log event, appended and flushed line by line."""

    def __init__(self, path: Path):
        self.path = Path(path)

    def on_log(self, args, state, control, logs=None, **kw):
        if logs and state.is_world_process_zero:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "a") as f:
                f.write(json.dumps({"step": state.global_step, **logs}) + "\n")


class StopOnNonFinite(TrainerCallback):
    def on_log(self, args, state, control, logs=None, **kw):
        loss = (logs or {}).get("loss")
        if loss is not None and not math.isfinite(loss):
            raise TrainingError(f"loss became {loss} at step {state.global_step}; stopping. The last good "
                                f"checkpoint in {args.output_dir} is kept — lower train.lr or check the data")
