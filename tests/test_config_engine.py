"""The one config engine: typed fields, choices, bounds, help text, non-mutating validation, `config show`."""
import copy
import json
import subprocess
import sys
from dataclasses import dataclass
from typing import Literal

import pytest

from lowbit import config as engine
from lowbit.config import option
from lowbit.errors import ConfigError, InputError
from lowbit.methods.data_gen.config import GenerateConfig
from lowbit.methods.qat.config import QATConfig
from lowbit.recipes.config import RunConfig, load_config
from lowbit.recipes.config_cli import guess_kind, main, resolve
from lowbit.utils.modules import matches_module
from lowbit.utils.run_record import RUN_FILE, BaseModelRecord, RunRecord


@dataclass
class Inner:
    mode: Literal["a", "b"] = option("a", help="the mode")
    rate: float = option(0.5, help="a rate", gt=0, le=1)


@dataclass
class Outer:
    inner: Inner = option(default_factory=Inner, help="")
    names: list[str] = option(default_factory=list, help="some names")
    steps: int | None = option(None, help="optional count", ge=1)


def test_build_coerces_and_checks_types_choices_and_bounds():
    cfg = engine.build(Outer, {"inner": {"mode": "b", "rate": "1e-1"}, "names": "x", "steps": 3})
    assert cfg == Outer(Inner("b", 0.1), ["x"], 3)
    with pytest.raises(ConfigError, match=r"'inner.mode' must be one of a, b, got 'c'"):
        engine.build(Outer, {"inner": {"mode": "c"}})
    with pytest.raises(ConfigError, match=r"'inner.rate' must be > 0, got 0.0"):
        engine.build(Outer, {"inner": {"rate": 0}})
    with pytest.raises(ConfigError, match=r"'steps' must be >= 1, got 0"):
        engine.build(Outer, {"steps": 0})
    with pytest.raises(ConfigError, match=r"'steps' expects int \| None, got 'many'"):
        engine.build(Outer, {"steps": "many"})
    with pytest.raises(ConfigError, match=r"unknown config key 'inner.mdoe'; did you mean 'inner.mode'\?"):
        engine.build(Outer, {"inner": {"mdoe": "a"}})


def test_validate_refuses_a_check_that_mutates():
    @dataclass
    class Sneaky:
        x: int = option(1, help="")

        def validate(self, where):
            self.x = 2
    with pytest.raises(AssertionError, match="checks must only raise"):
        engine.validate(Sneaky())


def test_run_config_validation_does_not_mutate():
    cfg = engine.build(RunConfig, {"distill": {"source": "offline"}, "data": {"format": "generated"}})
    before = copy.deepcopy(cfg)
    engine.validate(cfg)
    assert cfg == before and cfg.distill.enabled and not cfg.distill.online and cfg.distill.teacher == ""


@pytest.mark.parametrize("override,message", [
    ("train.report_to=[wandb]", r"'train.report_to' must be one of jsonl, tensorboard, got 'wandb'"),
    ("train.lr=-1", r"'train.lr' must be >= 0, got -1.0"),
    ("train.batch_size=0", r"'train.batch_size' must be >= 1, got 0"),
    ("lora.dropout=1.5", r"'lora.dropout' must be < 1, got 1.5"),
    ("train.max_steps=0", r"train.max_steps=0 trains nothing"),
    ("model.quant.quant_type=int4", r"'model.quant.quant_type' must be one of nf4, fp4"),
])
def test_run_config_refuses_values_it_cannot_honour(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])


def test_report_to_backend_that_is_not_installed(monkeypatch):
    import importlib.util
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "tensorboard" else real(name, *a))
    with pytest.raises(ConfigError, match=r"report_to: tensorboard needs the 'tensorboard' package"):
        load_config(None, ["train.report_to=[tensorboard]"])


def test_show_prints_values_help_choices_and_changed_defaults():
    text = engine.show(load_config(None, ["lora.r=8"]))
    assert "  r: 8  # adapter rank; default: 16" in text
    assert "quant_type: nf4  # 4-bit code book; one of: nf4, fp4" in text


def test_guess_kind_and_resolve_each_kind(tmp_path):
    assert guess_kind({"teacher": {}, "generate": {}}) == "generate"
    assert guess_kind({"qat": {"weight": None}}) == "qat"
    assert guess_kind({"qat": {"scheme": "w4a8kv8"}, "train": {}}) == "run"
    kind, cfg = resolve("configs/qat/w4a8kv4.yaml")
    assert kind == "qat" and isinstance(cfg, QATConfig) and cfg.kv.bits == 4
    kind, cfg = resolve("configs/llm_qat/generate-gemma3-270m.yaml", ["generate.seed=7"])
    assert kind == "generate" and isinstance(cfg, GenerateConfig) and cfg.generate.seed == 7


def test_config_show_cli(capsys):
    assert main(["show", "configs/qlora/gemma3-270m-shakespeare.yaml", "train.max_steps=3"]) == 0
    out = capsys.readouterr().out
    assert "max_steps: 3  # optimizer steps (-1: train.epochs); default: -1" in out
    assert main(["show", "configs/qlora/gemma3-270m-shakespeare.yaml", "train.lr=-1"]) == 2
    assert "error: config key 'train.lr' must be >= 0" in capsys.readouterr().err
    r = subprocess.run([sys.executable, "-m", "lowbit", "config", "show", "--kind", "generate"], capture_output=True,
                       text=True)
    assert r.returncode == 0 and "first_token: uniform" in r.stdout


@pytest.mark.parametrize("name,patterns,hit", [
    ("lm_head", ["lm_head"], True), ("lm_head.base_layer", ["lm_head"], True),
    ("model.layers.0.mlp.down_proj", ["mlp.down_proj"], True), ("model.xlm_head", ["lm_head"], False),
    ("model.embed_tokens", ["embed_tokens"], True), ("model.layers.1.self_attn.q_proj", ["k_proj"], False),
])
def test_one_skip_module_rule(name, patterns, hit):
    assert matches_module(name, patterns) is hit


def test_run_record_round_trip_and_refusals(tmp_path):
    rec = RunRecord(base_model=BaseModelRecord("m", "abc", "llama"),
                    config={"model": {"quant": {"blocksize": 128}}}, loftq={"base_sha256": "ff"})
    rec.write(tmp_path)
    back = RunRecord.read(tmp_path)
    assert back == rec and back.quant["blocksize"] == 128 and back.quant["quant_type"] == "nf4"
    assert back.loftq_base_sha256 == "ff" and RunRecord.find(tmp_path / "nope", tmp_path) == rec
    (tmp_path / RUN_FILE).write_text("{not json")
    with pytest.raises(InputError, match="not a readable lowbit run record"):
        RunRecord.read(tmp_path)
    (tmp_path / RUN_FILE).write_text(json.dumps({"format": "other"}))
    with pytest.raises(InputError, match="is not a lowbit run record"):
        RunRecord.read(tmp_path)
