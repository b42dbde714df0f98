import pytest

from lowbit.errors import ConfigError, InputError
from lowbit.recipes.config import RunConfig, load_config


def test_defaults_and_overrides(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("model:\n  path: m\ntrain:\n  max_steps: 5\n")
    cfg = load_config(p, ["train.lr=1e-3", "lora.target_modules=[q_proj, v_proj]", "model.quant.blocksize=128",
                          "data.train_files=a.txt"])
    assert isinstance(cfg, RunConfig)
    assert cfg.train.max_steps == 5 and cfg.train.lr == 1e-3
    assert cfg.lora.target_modules == ["q_proj", "v_proj"]
    assert cfg.model.quant.blocksize == 128 and cfg.data.train_files == ["a.txt"]


@pytest.mark.parametrize("override, message", [
    ("train.learning_rate=1", r"unknown config key 'train.learning_rate'; did you mean 'train.lr'\?"),
    ("lora.rank=8", r"unknown config key 'lora.rank'; did you mean 'lora.r'\?"),
    ("modle.path=x", r"unknown config key 'modle'; did you mean 'model'\?"),
    ("train.max_steps=ten", r"'train.max_steps' expects int, got 'ten'"),
    ("model.quant.blocksize=100", r"invalid model.quant.blocksize 100: choose one of 32, 64"),
    ("train.optimizer=sgd", r"'train.optimizer' must be one of adamw_torch"),
    ("data.format=csv", r"'data.format' must be one of text, prompt_completion, chat"),
    ("train.max_steps", r"is not key=value"),
])
def test_bad_config_is_one_clear_error(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])


def test_missing_config_file(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
