"""Memory estimator for QLoRA / LoRA / full fine-tuning (`lowbit estimate`)."""
