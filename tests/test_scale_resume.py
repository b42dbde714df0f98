"""Exact resume: a run SIGKILLed at step k (or in the middle of writing a checkpoint) and resumed
with train.resume_from=auto ends with adapters bit-identical to an uninterrupted run (CPU, same seed).

The kill is real: a callback sends SIGKILL to its own process, so nothing gets to clean up."""
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from lowbit.distributed.checkpoints import MARKER, checkpoints, is_complete

ROOT = Path(__file__).resolve().parents[1]
TINY = "configs/tiny/llama-qlora.yaml"
# dropout > 0 and a decaying schedule: resume must restore the RNG and the scheduler, not only the weights
COMMON = ["train.max_steps=8", "train.save_steps=2", "train.save_total_limit=2", "train.batch_size=2",
          "lora.dropout=0.1", "train.scheduler=cosine", "train.warmup_steps=2", "eval.before=false",
          "eval.after=false", "train.report_to=[jsonl]"]

# Runs train.py's main with one extra callback that SIGKILLs this process at a chosen point.
KILLER = """
import os, signal, sys
from transformers import TrainerCallback
import lowbit.recipes.phases as P
when, step = sys.argv[1], int(sys.argv[2])

class Kill(TrainerCallback):
    def on_step_end(self, args, state, control, **kw):
        if when == "step" and state.global_step == step:
            os.kill(os.getpid(), signal.SIGKILL)
    def on_save(self, args, state, control, **kw):  # runs before the checkpoint is marked complete
        if when == "save" and state.global_step == step:
            os.kill(os.getpid(), signal.SIGKILL)

build = P.method_trainer
def killable(*a, **kw):  # whichever TRL trainer the method builds
    trainer = build(*a, **kw)
    trainer.callback_handler.callbacks.insert(0, Kill())
    return trainer

P.method_trainer = killable
from lowbit.recipes.cli import main
sys.exit(main(sys.argv[3:]))
"""


def _train(args, killer=None, config=TINY):
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-c", KILLER, *killer] if killer else [sys.executable, "train.py"]
    return subprocess.run(cmd + ["--config", config, *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=300, env=env)


def _adapters(out: Path) -> dict:
    return load_file(out / "adapter" / "adapter_model.safetensors")


def _losses(out: Path) -> dict[int, float]:
    rows = [json.loads(x) for x in (out / "logs.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


@pytest.fixture(scope="module")
def reference(tiny_model_dirs, tmp_path_factory):
    out = tmp_path_factory.mktemp("resume") / "straight"
    p = _train([f"model.path={tiny_model_dirs('llama')}", f"train.output_dir={out}", *COMMON])
    assert p.returncode == 0, p.stderr[-3000:]
    return out


@pytest.mark.slow
@pytest.mark.parametrize("when, step, resumes_from", [("step", 5, 4), ("save", 6, 4)])
def test_sigkill_then_resume_is_bit_identical(when, step, resumes_from, reference, tiny_model_dirs, tmp_path):
    out = tmp_path / "killed"
    args = [f"model.path={tiny_model_dirs('llama')}", f"train.output_dir={out}", *COMMON]
    p = _train(args, killer=[when, str(step)])
    assert p.returncode == -signal.SIGKILL, p.stderr[-3000:]
    assert not (out / "adapter").exists()
    if when == "save":  # killed mid-save: the folder exists but is not a checkpoint
        assert (out / f"checkpoint-{step}").is_dir() and not is_complete(out / f"checkpoint-{step}")
    # last N kept, and only complete ones count
    assert [c.name for c in checkpoints(out) if is_complete(c)] == ["checkpoint-2", "checkpoint-4"]

    p = _train(args + ["train.resume_from=auto"])
    assert p.returncode == 0, p.stderr[-3000:]
    ref, got = _adapters(reference), _adapters(out)
    assert ref.keys() == got.keys() and len(ref) > 0
    for k in ref:
        assert ref[k].dtype == got[k].dtype and ref[k].shape == got[k].shape
        assert ref[k].numpy().tobytes() == got[k].numpy().tobytes(), k  # bit-identical, not merely close
    # the resumed steps saw the same batches: losses after the resume point match the straight run's exactly
    ref_l, got_l = _losses(reference), _losses(out)
    assert all(s in got_l for s in range(resumes_from + 1, 9)), got_l
    assert all(got_l[s] == ref_l[s] for s in range(resumes_from + 1, 9))
    assert [c.name for c in checkpoints(out)] == ["checkpoint-6", "checkpoint-8"]
    assert all((c / MARKER).exists() for c in checkpoints(out))


@pytest.mark.slow
def test_explicit_incomplete_checkpoint_is_refused(reference, tiny_model_dirs, tmp_path):
    out = tmp_path / "run"
    args = [f"model.path={tiny_model_dirs('llama')}", f"train.output_dir={out}", *COMMON]
    p = _train(args, killer=["save", "4"])
    assert p.returncode == -signal.SIGKILL
    p = _train(args + [f"train.resume_from={out / 'checkpoint-4'}"])
    assert p.returncode == 2
    assert "not a complete lowbit checkpoint" in p.stderr and "checkpoint-2" in p.stderr


@pytest.mark.slow
def test_dpo_sigkill_then_resume_is_bit_identical(tiny_model_dirs, tmp_path):
    """The same guarantee under TRL's DPOTrainer (reference = the base with adapters off)."""
    import random

    from lowbit.testing import sample_text
    words, rng = sample_text().split(), random.Random(0)
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps({"prompt": " ".join(words[i:i + 6]), "chosen": " ".join(words[i + 6:i + 10]),
                                        "rejected": " ".join(rng.sample(words, 4))}) + "\n" for i in range(0, 240, 10)))
    common = [f"model.path={tiny_model_dirs('llama')}", f"data.train_files=[{data}]", "train.max_steps=6",
              "train.save_steps=2", "train.batch_size=2", "lora.dropout=0.1", "train.warmup_steps=2"]
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    dpo = "configs/tiny/llama-dpo.yaml"
    assert _train([f"train.output_dir={straight}", *common], config=dpo).returncode == 0
    p = _train([f"train.output_dir={killed}", *common], killer=["step", "3"], config=dpo)
    assert p.returncode == -signal.SIGKILL, p.stderr[-3000:]
    p = _train([f"train.output_dir={killed}", *common, "train.resume_from=auto"], config=dpo)
    assert p.returncode == 0, p.stderr[-3000:]
    ref, got = _adapters(straight), _adapters(killed)
    assert ref.keys() == got.keys() and len(ref) > 0
    assert all(ref[k].numpy().tobytes() == got[k].numpy().tobytes() for k in ref)
