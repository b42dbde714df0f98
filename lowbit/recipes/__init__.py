"""Training recipes on the 4-bit base: the QLoRA / QAT / distillation run (`phases.run`), its config,
data, losses and HF Trainer glue."""
from lowbit.recipes.config import RunConfig, load_config
from lowbit.recipes.phases import run

__all__ = ["RunConfig", "load_config", "run"]
