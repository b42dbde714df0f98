"""Build tiny causal LMs with random weights: dense, MoE and image-text families (`ARCHS`).

The tokenizer is a byte-level BPE trained here on a committed public-domain sample
(Macbeth, Project Gutenberg), so nothing is fetched from a hub.
"""
from __future__ import annotations

import functools
from pathlib import Path

import torch

# the first five are the dense families every other test uses; the rest cover "any causal LM"
DENSE_ARCHS = ("llama", "gemma3", "qwen2", "qwen3", "mistral", "qwen3_5_text", "gemma2", "gemma4_text", "phi3",
               "olmo2", "granite", "gpt_neox", "gpt2")
MOE_ARCHS = ("mixtral", "qwen3_moe", "qwen3_5_moe_text", "gpt_oss", "deepseek_v3", "llama4_text", "gemma4_text_moe")
IMAGE_TEXT_ARCHS = ("gemma3_vl", "gemma4_vl", "qwen3_5_vl")  # image-text checkpoints, fine-tuned as text LMs
ARCHS = DENSE_ARCHS + MOE_ARCHS + IMAGE_TEXT_ARCHS
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
    hd = hidden // 4
    common = dict(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=hidden * 2, num_hidden_layers=layers,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                  bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                  tie_word_embeddings=False)
    # MoE: 4 small experts, 2 per token (llama4 routes 1, as the real models do). Every Linear input is at
    # least 64 wide: bitsandbytes' CPU dequantize is wrong for in_features < blocksize (bnb4 reload checks)
    moe = dict(moe_intermediate_size=hidden, num_experts=4, num_experts_per_tok=2)
    gdn = dict(head_dim=hd, linear_key_head_dim=hd, linear_value_head_dim=hd, linear_num_key_heads=2,
               linear_num_value_heads=4, layer_types=(["linear_attention", "full_attention"] * layers)[:layers])
    mm = dict(common, vocab_size=vocab_size + 8)  # image-text: marker tokens above the text vocabulary
    gemma4 = dict(head_dim=hd, global_head_dim=2 * hd, sliding_window=64, vocab_size_per_layer_input=vocab_size,
                  hidden_size_per_layer_input=hidden)
    builders = {
        "llama": lambda: tf.LlamaConfig(**common),
        "mistral": lambda: tf.MistralConfig(**common, sliding_window=None),
        "qwen2": lambda: tf.Qwen2Config(**common),
        "qwen3": lambda: tf.Qwen3Config(**common, head_dim=hd),
        "gemma3": lambda: tf.Gemma3TextConfig(**{**common, "tie_word_embeddings": True}, head_dim=hd,
                                              sliding_window=64, query_pre_attn_scalar=hd),
        "qwen3_5_text": lambda: tf.Qwen3_5TextConfig(**common, **gdn),
        "gemma2": lambda: tf.Gemma2Config(**{**common, "tie_word_embeddings": True}, head_dim=hd,
                                          query_pre_attn_scalar=hd, sliding_window=64),
        "gemma4_text": lambda: tf.Gemma4TextConfig(**{**common, "tie_word_embeddings": True}, **gemma4),
        "gemma4_text_moe": lambda: tf.Gemma4TextConfig(**{**common, "tie_word_embeddings": True}, **gemma4,
                                                       enable_moe_block=True, num_experts=4, top_k_experts=2,
                                                       moe_intermediate_size=hidden),
        "phi3": lambda: tf.Phi3Config(**common),
        "olmo2": lambda: tf.Olmo2Config(**common),
        "granite": lambda: tf.GraniteConfig(**common, embedding_multiplier=2.0, logits_scaling=4.0,
                                            residual_multiplier=0.5, attention_multiplier=1 / hd),
        "gpt_neox": lambda: tf.GPTNeoXConfig(**common),
        "gpt2": lambda: tf.GPT2Config(vocab_size=vocab_size, n_embd=hidden, n_layer=layers, n_head=4, n_positions=512,
                                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                                      pad_token_id=tok.pad_token_id, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0),
        "mixtral": lambda: tf.MixtralConfig(**common, num_local_experts=4, num_experts_per_tok=2),
        "qwen3_moe": lambda: tf.Qwen3MoeConfig(**common, head_dim=hd, **moe),
        "qwen3_5_moe_text": lambda: tf.Qwen3_5MoeTextConfig(**common, **gdn, **moe,
                                                            shared_expert_intermediate_size=hidden),
        # gpt-oss: YaRN x32 over 4096 positions, as released (a shorter max would contradict it)
        "gpt_oss": lambda: tf.GptOssConfig(**{**common, "intermediate_size": hidden, "max_position_embeddings": 131072},
                                           head_dim=hd, num_local_experts=4,
                                           num_experts_per_tok=2, sliding_window=64,
                                           layer_types=(["sliding_attention", "full_attention"] * layers)[:layers]),
        "deepseek_v3": lambda: tf.DeepseekV3Config(**{**common, "num_key_value_heads": 4}, **moe, n_routed_experts=4,
                                                   n_group=2, topk_group=1, n_shared_experts=1,
                                                   first_k_dense_replace=1, kv_lora_rank=hidden, q_lora_rank=hidden,
                                                   qk_rope_head_dim=8, qk_nope_head_dim=hd, v_head_dim=hd),
        "llama4_text": lambda: tf.Llama4TextConfig(**{**common, "intermediate_size": hidden}, head_dim=hd,
                                                   intermediate_size_mlp=hidden * 2, num_local_experts=4,
                                                   num_experts_per_tok=1, interleave_moe_layer_step=2,
                                                   attention_chunk_size=64),
        "gemma3_vl": lambda: tf.Gemma3Config(
            text_config=dict(mm, head_dim=hd, sliding_window=64, query_pre_attn_scalar=hd),
            vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                               image_size=28, patch_size=14),
            mm_tokens_per_image=4, **_media_ids(vocab_size, "image_token_index", "boi_token_index", "eoi_token_index")),
        "gemma4_vl": lambda: tf.Gemma4Config(
            text_config=dict(mm, **{**gemma4, "vocab_size_per_layer_input": vocab_size + 8}),
            vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                               num_key_value_heads=2, head_dim=16),
            audio_config=None, **_media_ids(vocab_size, "image_token_id", "boi_token_id", "eoi_token_id",
                                            "video_token_id", "boa_token_id", "eoa_token_index", "audio_token_id")),
        "qwen3_5_vl": lambda: tf.Qwen3_5Config(
            text_config=dict(mm, **gdn),
            vision_config=dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=hidden,
                               num_position_embeddings=64),
            **_media_ids(vocab_size, "image_token_id", "video_token_id", "vision_start_token_id",
                         "vision_end_token_id")),
    }
    if arch not in builders:
        raise ValueError(f"unknown tiny architecture {arch!r}; choose one of {', '.join(ARCHS)}")
    return builders[arch]()


def _media_ids(vocab_size: int, *names: str) -> dict:
    """Image/audio marker ids just above the tokenizer's vocabulary, so no text maps to them."""
    return {n: vocab_size + i for i, n in enumerate(names)}


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
