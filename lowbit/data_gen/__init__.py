"""Self-generated training data (LLM-QAT): a teacher samples sequences from a random first
token; they are written as resumable shards, optionally with its top-k logits for offline
distillation (`lowbit.train.distill`)."""
from .config import GenerateConfig, load_generate_config
from .dataset import GeneratedDataset
from .sampler import generate_batch, sample_next
from .shards import read_manifest, read_sequences

__all__ = ["GenerateConfig", "load_generate_config", "GeneratedDataset", "generate_batch", "sample_next",
           "read_manifest", "read_sequences"]
