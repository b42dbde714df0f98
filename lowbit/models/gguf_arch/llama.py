"""LLAMA-style families: llama, mistral, mixtral (LLAMA with 3-D experts), granite (LLAMA + scales), llama4 text."""
from __future__ import annotations

from lowbit.errors import UnsupportedModelError
from lowbit.models.gguf_arch.base import Family, base_metadata, llama3_rope_factors, permute_qk, unpermute_qk


class Llama(Family):
    """llama.cpp's LlamaModel: q/k rows permuted from HF's half-split rotary into interleaved pairs."""
    arch_key = "LLAMA"
    permute = True

    def split(self, name, t, cfg):
        if self.permute and name.endswith(("q_proj.weight", "q_proj.bias")):
            t = permute_qk(t, cfg.num_attention_heads, cfg.num_attention_heads)
        elif self.permute and name.endswith(("k_proj.weight", "k_proj.bias")):
            t = permute_qk(t, cfg.num_attention_heads, cfg.num_key_value_heads)
        return super().split(name, t, cfg)

    def join(self, name, parts, cfg):
        t = super().join(name, parts, cfg)
        if self.permute and name.endswith(("q_proj.weight", "q_proj.bias")):
            t = unpermute_qk(t, cfg.num_attention_heads)
        elif self.permute and name.endswith(("k_proj.weight", "k_proj.bias")):
            t = unpermute_qk(t, cfg.num_key_value_heads)
        return t

    def head_dim(self, cfg) -> int:
        return getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads

    def extra_tensors(self, cfg):
        factors = llama3_rope_factors(cfg, self.head_dim(cfg))
        return [] if factors is None else [("rope_freqs.weight", factors)]

    def metadata(self, w, cfg):
        base_metadata(w, cfg)
        w.add_vocab_size(cfg.vocab_size)
        w.add_rope_dimension_count(self.head_dim(cfg))


class Mixtral(Llama):
    """Mixtral is llama.cpp's LLAMA with ffn_{gate,up,down}_exps and a router (ffn_gate_inp); the expert count
    keys come from base_metadata."""


class Granite(Llama):
    """llama.cpp's GraniteModel: LLAMA tensors plus the four multipliers (attention, embedding, residual, logits)."""
    arch_key = "GRANITE"

    def head_dim(self, cfg) -> int:  # llama.cpp ignores Granite's head_dim
        return cfg.hidden_size // cfg.num_attention_heads

    def metadata(self, w, cfg):
        super().metadata(w, cfg)
        w.add_attention_scale(cfg.attention_multiplier)
        w.add_embedding_scale(cfg.embedding_multiplier)
        w.add_residual_scale(cfg.residual_multiplier)
        w.add_logit_scale(cfg.logits_scaling)


class Llama4(Llama):
    """llama.cpp's Llama4Model: no q/k permute, fused experts stored (n_expert, hidden, 2·ff) and applied as x @ W,
    dense (intermediate_size_mlp) and MoE (intermediate_size) layers interleaved."""
    arch_key = "LLAMA4"
    permute = False
    experts_transposed = True

    def check(self, cfg):
        """llama.cpp's llama4 fixes what the config may vary: 8192-token chunks on 3 of every 4 layers, no rope
        (and temperature-tuned queries) on every 4th, L2 q/k norms unless 128 experts."""
        n = cfg.num_hidden_layers
        want = {"attention_chunk_size": 8192, "layer_types": ["full_attention" if (i + 1) % 4 == 0 else
                                                              "chunked_attention" for i in range(n)],
                "no_rope_layers": [int((i + 1) % 4 != 0) for i in range(n)], "attn_temperature_tuning": True,
                "floor_scale": 8192, "attn_scale": 0.1, "use_qk_norm": cfg.num_local_experts != 128}
        bad = [f"{k}={getattr(cfg, k)!r} (llama.cpp: {v!r})" for k, v in want.items()
               if getattr(cfg, k, v) != v and not (isinstance(v, float) and abs(getattr(cfg, k) - v) < 1e-9)]
        if bad:
            raise UnsupportedModelError(f"llama4_text with {'; '.join(bad)}: GGUF cannot express it (llama.cpp fixes "
                                        "these); export --format merged or bnb4 instead")

    def metadata(self, w, cfg):
        base_metadata(w, cfg, n_ff=cfg.intermediate_size_mlp)  # llama.cpp's n_ff is the dense layers' width
        w.add_vocab_size(cfg.vocab_size)
        w.add_rope_dimension_count(self.head_dim(cfg))
        w.add_interleave_moe_layer_step(cfg.interleave_moe_layer_step)
        w.add_expert_feed_forward_length(cfg.intermediate_size)
        if all(t == "full_attention" for t in getattr(cfg, "layer_types", None) or ()):
            w.add_sliding_window(0)
