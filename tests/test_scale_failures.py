"""Failure handling: a non-finite loss stops the run with a clear message and keeps the last good
checkpoint; a disk too small for the run's checkpoints is refused before the first step."""
import collections
import math

import pytest

from lowbit.distributed.checkpoints import checkpoints, is_complete, latest_complete
from lowbit.errors import ConfigError, TrainingError
from lowbit.recipes import run
from lowbit.recipes.config import load_config

TINY = "configs/tiny/llama-qlora.yaml"


def _cfg(model_dir, out, *overrides):
    return load_config(TINY, [f"model.path={model_dir}", f"train.output_dir={out}", "train.max_steps=8",
                              "train.save_steps=2", "train.batch_size=2", "eval.before=false", "eval.after=false",
                              "train.report_to=[]", *overrides])


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tiny_model_dirs, tmp_path, monkeypatch):
    import lowbit.recipes.trainer as T
    real = T.causal_lm_loss
    calls = collections.Counter()

    def poisoned(*a, **kw):  # finite for 5 optimizer steps, then NaN
        calls["n"] += 1
        loss = real(*a, **kw)
        return loss * math.nan if calls["n"] > 5 else loss
    monkeypatch.setattr(T, "causal_lm_loss", poisoned)
    out = tmp_path / "run"
    with pytest.raises(TrainingError, match=r"loss became nan at step 5; stopping\. The last good checkpoint"):
        run(_cfg(tiny_model_dirs("llama"), out))
    assert latest_complete(out).name == "checkpoint-4"
    assert all(is_complete(c) for c in checkpoints(out))
    assert not (out / "adapter").exists()


def test_disk_too_small_is_refused_before_the_first_step(tiny_model_dirs, tmp_path, monkeypatch):
    import shutil

    import lowbit.recipes.trainer as T
    Usage = collections.namedtuple("Usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: Usage(1 << 30, (1 << 30) - (64 << 10), 64 << 10))
    monkeypatch.setattr(T.LowbitTrainer, "train", lambda *a, **kw: pytest.fail("training started"))
    out = tmp_path / "run"
    with pytest.raises(ConfigError, match=r"has 0\.1 MiB free but this run writes up to .*save_total_limit"):
        run(_cfg(tiny_model_dirs("llama"), out))
    assert checkpoints(out) == []
