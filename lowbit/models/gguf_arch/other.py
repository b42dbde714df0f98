"""Families with their own layouts: phi3 (fused qkv / gate_up kept fused), olmo2, gpt_neox (per-head qkv
regrouped), gpt2 (Conv1D weights transposed, learned positions), gpt-oss (interleaved fused experts, sinks)."""
from __future__ import annotations

from lowbit.errors import UnsupportedModelError
from lowbit.models.gguf_arch.base import Family, base_metadata, first, rope


class Phi3(Family):
    """llama.cpp's Phi3MiniModel: qkv_proj → attn_qkv and gate_up_proj → ffn_up as they are (llama.cpp splits
    them at run time)."""
    arch_key = "PHI3"

    def check(self, cfg):
        if rope(cfg).get("rope_type") not in (None, "default"):
            raise UnsupportedModelError(f"phi3 rope_type {rope(cfg)['rope_type']!r} (long-context factors) is not "
                                        "supported for GGUF export yet; export --format merged or bnb4 instead")

    def metadata(self, w, cfg):
        r = rope(cfg)
        w.add_context_length(cfg.max_position_embeddings)
        w.add_rope_scaling_orig_ctx_len(cfg.original_max_position_embeddings)
        w.add_embedding_length(cfg.hidden_size)
        w.add_feed_forward_length(cfg.intermediate_size)
        w.add_block_count(cfg.num_hidden_layers)
        w.add_head_count(cfg.num_attention_heads)
        w.add_head_count_kv(cfg.num_key_value_heads)
        w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
        w.add_rope_dimension_count(int(r.get("partial_rotary_factor", 1.0) * cfg.hidden_size) // cfg.num_attention_heads)
        w.add_rope_freq_base(float(r.get("rope_theta", 10000.0)))
        w.add_sliding_window(getattr(cfg, "sliding_window", None) or 0)  # 0 tells llama.cpp: no sliding window


class Olmo2(Family):
    """llama.cpp's Olmo2Model: names only; q/k norms span all heads."""
    arch_key = "OLMO2"

    def metadata(self, w, cfg):
        base_metadata(w, cfg)
        if getattr(cfg, "sliding_window", None):
            w.add_sliding_window(cfg.sliding_window)
            w.add_sliding_window_pattern([t == "sliding_attention" for t in cfg.layer_types])


class GPTNeoX(Family):
    """llama.cpp's GPTNeoXModel: HF groups query_key_value per head (n_head, 3, head_dim); llama.cpp wants
    q, k, v blocks (3, n_head, head_dim)."""
    arch_key = "GPTNEOX"

    def split(self, name, t, cfg):
        if "attention.query_key_value." in name:
            n, hd = cfg.num_attention_heads, cfg.hidden_size // cfg.num_attention_heads
            t = t.reshape(n, 3, hd, *t.shape[1:]).transpose(0, 1).reshape(t.shape)
        return super().split(name, t, cfg)

    def join(self, name, parts, cfg):
        t = parts[0]
        if "attention.query_key_value." in name:
            n, hd = cfg.num_attention_heads, cfg.hidden_size // cfg.num_attention_heads
            t = t.reshape(3, n, hd, *t.shape[1:]).transpose(0, 1).reshape(t.shape)
        return t

    def metadata(self, w, cfg):
        hd = cfg.hidden_size // cfg.num_attention_heads
        w.add_context_length(cfg.max_position_embeddings)
        w.add_embedding_length(cfg.hidden_size)
        w.add_block_count(cfg.num_hidden_layers)
        w.add_feed_forward_length(cfg.intermediate_size)
        w.add_rope_dimension_count(int(rope(cfg).get("partial_rotary_factor", 1.0) * hd))
        w.add_rope_freq_base(float(rope(cfg).get("rope_theta", 10000.0)))
        w.add_head_count(cfg.num_attention_heads)
        w.add_parallel_residual(bool(getattr(cfg, "use_parallel_residual", True)))
        w.add_layer_norm_eps(cfg.layer_norm_eps)


class GPT2(Family):
    """llama.cpp's GPT2Model: HF's Conv1D weights are (in, out); GGUF wants (out, in)."""
    arch_key = "GPT2"
    _conv1d = (".c_attn.weight", ".c_proj.weight", ".c_fc.weight")

    def split(self, name, t, cfg):
        return [(name, t.t().contiguous() if name.endswith(self._conv1d) else t)]

    def join(self, name, parts, cfg):
        return parts[0].t().contiguous() if name.endswith(self._conv1d) else parts[0]

    def metadata(self, w, cfg):
        w.add_block_count(cfg.n_layer)
        w.add_context_length(cfg.n_positions)
        w.add_embedding_length(cfg.n_embd)
        w.add_feed_forward_length(first(cfg, "n_inner", default=4 * cfg.n_embd))
        w.add_head_count(cfg.n_head)
        w.add_layer_norm_eps(cfg.layer_norm_epsilon)


class GptOss(Family):
    """llama.cpp's GptOssModel: experts stored (n_expert, in, out) with gate/up interleaved; sinks per head."""
    arch_key = "GPT_OSS"
    experts_transposed = True
    experts_interleaved = True

    def split(self, name, t, cfg):
        if name.endswith("self_attn.sinks"):
            return [(f"{name}.weight", t)]
        return super().split(name, t, cfg)

    def metadata(self, w, cfg):
        base_metadata(w, cfg)
        w.add_sliding_window(cfg.sliding_window)
        w.add_expert_feed_forward_length(cfg.intermediate_size)


