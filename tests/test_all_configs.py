"""Every YAML under configs/ loads through the loader for its folder (a new folder needs one)."""
from pathlib import Path

import pytest
import yaml

from lowbit.recipes.config import load_config

CONFIGS = sorted(Path(__file__).resolve().parents[1].glob("configs/**/*.y*ml"))
ACCELERATE_KEYS = {"compute_environment", "distributed_type", "num_processes"}


def _load_accelerate(path: Path):
    cfg = yaml.safe_load(path.read_text())
    missing = ACCELERATE_KEYS - set(cfg)
    assert not missing, f"{path} lacks {missing}"
    from accelerate.commands.config.config_args import ClusterConfig
    ClusterConfig.from_yaml_file(str(path))  # accelerate's own parser: unknown keys raise


def _load_qat(path: Path):
    from lowbit.methods.qat import resolve
    resolve(str(path))


def _load_llm_qat(path: Path):
    # generate configs (a `generate:` section) use lowbit generate's loader; distill runs use the train loader
    from lowbit.methods.data_gen.config import load_generate_config
    tree = yaml.safe_load(path.read_text()) or {}
    return load_generate_config(path) if "generate" in tree else load_config(path)


LOADERS = {"qlora": load_config, "tiny": load_config, "accelerate": _load_accelerate, "qat": _load_qat,
           "llm_qat": _load_llm_qat}


def test_there_are_configs():
    assert len(CONFIGS) >= 4


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: str(p.relative_to(p.parents[1])))
def test_config_loads(path):
    assert path.read_text().startswith("# "), f"{path} must open with a comment giving its launch command"
    folder = path.relative_to(Path(__file__).resolve().parents[1] / "configs").parts[0]
    assert folder in LOADERS, f"configs/{folder}/ has no loader in tests/test_all_configs.py"
    LOADERS[folder](path)
