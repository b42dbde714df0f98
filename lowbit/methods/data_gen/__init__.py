"""Self-generated training data (LLM-QAT): a teacher samples sequences from a random first
token; they are written as resumable shards, optionally with its top-k logits for offline
distillation (`lowbit.recipes.distill`)."""
from lowbit.methods.data_gen.config import GenerateConfig, load_generate_config
from lowbit.methods.data_gen.dataset import GeneratedDataset
from lowbit.methods.data_gen.sampler import generate_batch, sample_next
from lowbit.methods.data_gen.shards import read_manifest, read_sequences

__all__ = ["GenerateConfig", "load_generate_config", "GeneratedDataset", "generate_batch", "sample_next",
           "read_manifest", "read_sequences"]
