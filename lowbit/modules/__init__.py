"""Modules built on the 4-bit format: `Linear4bit` and the LoRA glue (`lora.py`)."""
from lowbit.modules.linear4bit import Linear4bit

__all__ = ["Linear4bit"]
