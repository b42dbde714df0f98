"""Loading HF causal LMs straight into the 4-bit base, and converting bitsandbytes models."""
from lowbit.models.convert import from_bnb_model
from lowbit.models.load import load_4bit_weights, load_model, quantize_model

__all__ = ["from_bnb_model", "load_4bit_weights", "load_model", "quantize_model"]
