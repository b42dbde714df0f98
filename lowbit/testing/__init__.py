"""Tiny random-weight models and a locally trained tokenizer, for tests and examples (no hub)."""
from lowbit.testing.tiny import ARCHS, make_tiny_model, make_tokenizer, sample_text, save_tiny_model

__all__ = ["ARCHS", "make_tiny_model", "make_tokenizer", "sample_text", "save_tiny_model"]
