"""Build tiny Llama / Gemma3 / Qwen2 / Qwen3 / Mistral causal LMs with random weights.

The tokenizer is a byte-level BPE trained here on a committed public-domain sample
(Macbeth, Project Gutenberg), so nothing is fetched from a hub.
"""
from __future__ import annotations

import functools
from pathlib import Path

import torch

ARCHS = ("llama", "gemma3", "qwen2", "qwen3", "mistral")
_SAMPLE = Path(__file__).parent / "data" / "macbeth_sample.txt"
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}{{ eos_token }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def sample_text() -> str:
    return _SAMPLE.read_text()


@functools.lru_cache(maxsize=4)
def _trained_tokenizer_json(vocab_size: int) -> str:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<pad>", "<bos>", "<eos>", "<unk>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(sample_text().splitlines(), trainer=trainer)
    return tok.to_str()


def make_tokenizer(vocab_size: int = 512):
    """A PreTrainedTokenizerFast that adds BOS (like Gemma/Llama) and has a chat template."""
    from tokenizers import Tokenizer, processors
    from transformers import PreTrainedTokenizerFast
    tok = Tokenizer.from_str(_trained_tokenizer_json(vocab_size))
    bos = tok.token_to_id("<bos>")
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", pair="<bos> $A <bos> $B",
                                                       special_tokens=[("<bos>", bos)])
    t = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
                                unk_token="<unk>", add_bos_token=True)
    t.chat_template = CHAT_TEMPLATE
    return t


def _config(arch: str, vocab_size: int, hidden: int, layers: int, tok):
    import transformers as tf
    common = dict(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=hidden * 2, num_hidden_layers=layers,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                  bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                  tie_word_embeddings=False)
    if arch == "llama":
        return tf.LlamaConfig(**common)
    if arch == "mistral":
        return tf.MistralConfig(**common, sliding_window=None)
    if arch == "qwen2":
        return tf.Qwen2Config(**common)
    if arch == "qwen3":
        return tf.Qwen3Config(**common, head_dim=hidden // 4)
    if arch == "gemma3":
        return tf.Gemma3TextConfig(**{**common, "tie_word_embeddings": True}, head_dim=hidden // 4,
                                   sliding_window=64, query_pre_attn_scalar=hidden // 4)
    raise ValueError(f"unknown tiny architecture {arch!r}; choose one of {', '.join(ARCHS)}")


def make_tiny_model(arch: str = "llama", hidden: int = 64, layers: int = 2, seed: int = 0,
                    dtype: torch.dtype = torch.float32):
    """(model, tokenizer) with random weights; deterministic for a given seed."""
    from transformers import AutoModelForCausalLM
    tok = make_tokenizer()
    cfg = _config(arch, len(tok), hidden, layers, tok)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    model.eval()
    return model, tok


def save_tiny_model(path: str | Path, arch: str = "llama", **kw) -> Path:
    """Save a tiny model + tokenizer as an HF folder (safetensors) and return the path."""
    model, tok = make_tiny_model(arch, **kw)
    path = Path(path)
    model.save_pretrained(path, safe_serialization=True)
    tok.save_pretrained(path)
    return path
