"""The QLoRA training recipe: typed configs, data, chunked loss, HF Trainer wrapper."""
from .config import RunConfig, load_config

__all__ = ["RunConfig", "load_config", "run"]


def run(cfg):
    from .trainer import run as _run
    return _run(cfg)
