"""Modules built on the 4-bit format: `Linear4bit`, `Experts4bit` (MoE) and the LoRA glue (`lora.py`)."""
from lowbit.modules.linear4bit import Linear4bit
from lowbit.modules.moe4bit import Experts4bit

__all__ = ["Experts4bit", "Linear4bit"]
