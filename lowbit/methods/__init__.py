"""Methods built on the 4-bit base: QAT, LoftQ initialization, self-generated data (LLM-QAT)."""
