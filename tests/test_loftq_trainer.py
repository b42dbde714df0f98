"""`lora.init: loftq` in the trainer: the adapters start at LoftQ's factors on the saved LoftQ base,
the run records that base's hash, merge uses it (and refuses any other), resume reuses it."""
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from lowbit.errors import ConfigError, InputError
from lowbit.methods.loftq import LOFTQ_BASE_FILE, LOFTQ_REPORT_FILE
from lowbit.recipes.config import load_config
from lowbit.utils.hashing import file_sha256

TINY = "configs/tiny/llama-qlora.yaml"
CALIB = "lowbit/testing/data/macbeth_sample.txt"


def _train(model_dir, out, *extra):
    from lowbit.recipes import run
    cfg = load_config(TINY, [f"model.path={model_dir}", f"train.output_dir={out}", "lora.init=loftq",
                             "lora.loftq.iters=3", "lora.loftq.svd=full", "train.report_to=[]", *extra])
    return run(cfg)


def _start_errors(model_dir, out):
    """Per layer ‖W − deq(saved LoftQ base) − s·B·A‖ with B, A read back from the saved adapter."""
    from lowbit.format import Quantized4bit
    dense = load_file(str(model_dir / "model.safetensors"))
    base = load_file(str(out / LOFTQ_BASE_FILE))
    ad = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    acfg = json.loads((out / "adapter" / "adapter_config.json").read_text())
    s = acfg["lora_alpha"] / acfg["r"]
    errs = {}
    for key in ad:
        if ".lora_A." not in key:
            continue
        name = key.removeprefix("base_model.model.").split(".lora_A.")[0]
        A, B = ad[key].float(), ad[key.replace(".lora_A.", ".lora_B.")].float()
        q = Quantized4bit.from_state_dict({k: v for k, v in base.items() if k.startswith(name + ".weight")},
                                          name + ".weight")
        from lowbit.format import dequantize_reference
        w = dense[name + ".weight"].float()
        errs[name] = ((w - dequantize_reference(q, torch.float32) - s * B @ A).norm() / w.norm()).item()
    return errs


def test_trainer_starts_from_loftq_and_merge_uses_its_base(tiny_model_dirs, tmp_path):
    model_dir = tiny_model_dirs("llama")
    out = tmp_path / "run"
    # lr=0: the saved adapter is exactly the start LoftQ computed
    _train(model_dir, out, "train.max_steps=2", "train.lr=0.0")
    run = json.loads((out / "lowbit_run.json").read_text())
    rec = run["loftq"]
    assert rec["base_sha256"] == file_sha256(out / LOFTQ_BASE_FILE)
    assert rec["metric"] == "weight" and rec["layers"] == 14 and rec["scaling"] == 2.0
    report = json.loads((out / LOFTQ_REPORT_FILE).read_text())
    errs = _start_errors(model_dir, out)
    assert len(report["per_layer"]) == len(errs) == 14
    for layer in report["per_layer"]:
        assert errs[layer["name"]] == pytest.approx(layer["loftq_error"], rel=1e-3), layer["name"]
        assert layer["loftq_error"] < layer["zero_init_error"]

    from lowbit.export.merge import merge
    rep = merge(out, tmp_path / "merged", dtype="float32", progress=False)  # verifies merged == adapter model
    assert rep["loftq_base"].endswith(LOFTQ_BASE_FILE)

    # the adapter only fits its own LoftQ base: a missing or different one is refused, not merged wrongly
    other = tmp_path / "other"
    shutil.copytree(out, other)
    (other / LOFTQ_BASE_FILE).unlink()
    with pytest.raises(InputError, match="not next to it"):
        merge(other, tmp_path / "m2", dtype="float32", progress=False)
    from lowbit.methods.loftq import save_loftq_base
    from lowbit.models import load_model
    plain, _ = load_model(model_dir, compute_dtype="float32", progress=False)
    save_loftq_base(plain, other / LOFTQ_BASE_FILE)
    with pytest.raises(InputError, match="not the LoftQ base this adapter was trained on"):
        merge(other, tmp_path / "m3", dtype="float32", progress=False)


def test_calibrated_loftq_trains_and_resume_reuses_the_base(tiny_model_dirs, tmp_path):
    model_dir = tiny_model_dirs("llama")
    out = tmp_path / "run"
    cal = [f"lora.loftq.calibration={CALIB}", "lora.loftq.calibration_samples=8", "lora.loftq.calibration_seq_len=32"]
    m = _train(model_dir, out, *cal, "train.max_steps=4", "train.save_steps=2")
    assert m["eval_ppl_after"] < m["eval_ppl_before"]
    first = json.loads((out / "lowbit_run.json").read_text())["loftq"]
    assert first["metric"] == "activation" and first["calibration"]["tokens"] == 8 * 32
    assert first["mean_loftq_error"] < first["mean_zero_init_error"]
    sha = file_sha256(out / LOFTQ_BASE_FILE)
    _train(model_dir, out, *cal, "train.max_steps=6", "train.save_steps=2", "train.resume_from=auto")
    again = json.loads((out / "lowbit_run.json").read_text())
    assert again["loftq"]["reused_on_resume"] is True
    assert again["loftq"]["base_sha256"] == sha == file_sha256(out / LOFTQ_BASE_FILE)
    assert again["metrics"]["train_steps"] == 6


@pytest.mark.parametrize("override, err, message", [
    (["lora.init=loft"], ConfigError, "must be one of zero, loftq"),
    (["lora.init=loftq", "lora.use_dora=true"], ConfigError, "cannot be combined with lora.use_dora"),
    (["lora.init=loftq", "lora.loftq.iters=0"], ConfigError, "lora.loftq.iters' must be >= 1"),
    (["lora.init=loftq", "lora.loftq.calibration_samples=0"], ConfigError, "lora.loftq.calibration_samples' must be >= 1"),
    (["lora.init=loftq", "model.quant.load_in_4bit=false"], ConfigError, "needs a 4-bit base"),
    (["lora.loftq.svd=qr"], ConfigError, "must be one of lowrank, full"),
    (["lora.loftq.iter=3"], ConfigError, "did you mean 'lora.loftq.iters'"),
])
def test_loftq_config_errors_name_the_fix(override, err, message):
    with pytest.raises(err, match=message):
        load_config(TINY, override)


def test_missing_calibration_file_is_one_clear_error(tiny_model_dirs, tmp_path):
    with pytest.raises(InputError, match="calibration file /nonexistent.txt does not exist"):
        _train(tiny_model_dirs("llama"), tmp_path / "run", "lora.loftq.calibration=/nonexistent.txt")
