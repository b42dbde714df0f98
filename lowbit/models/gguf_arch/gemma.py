"""Gemma families: gemma2, gemma3 (text, and the text model of the image-text checkpoint). RMSNorm computes
x·(1+w), llama.cpp multiplies by the stored weight, so norms are stored as w+1."""
from __future__ import annotations

from lowbit.errors import UnsupportedModelError
from lowbit.models.gguf_arch.base import Family, add_swa_rope_base, rope


class Gemma2(Family):
    arch_key = "GEMMA2"
    norm_shift = 1.0

    def head_dim(self, cfg) -> int:
        return getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads

    def check(self, cfg):
        hd = self.head_dim(cfg)
        if getattr(cfg, "query_pre_attn_scalar", hd) != hd:
            # llama.cpp derives the attention scale from key_length; a different scalar would be lost
            raise UnsupportedModelError(f"query_pre_attn_scalar={cfg.query_pre_attn_scalar} != head_dim={hd}: "
                                        "GGUF cannot express it (llama.cpp and transformers assume head_dim); export "
                                        "--format merged or bnb4 instead")

    def metadata(self, w, cfg):
        """As llama.cpp's Gemma2Model / Gemma3Model.set_gguf_parameters."""
        hd = self.head_dim(cfg)
        w.add_context_length(cfg.max_position_embeddings)
        w.add_embedding_length(cfg.hidden_size)
        w.add_block_count(cfg.num_hidden_layers)
        w.add_feed_forward_length(cfg.intermediate_size)
        w.add_head_count(cfg.num_attention_heads)
        w.add_head_count_kv(cfg.num_key_value_heads)
        w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
        w.add_rope_freq_base(float(rope(cfg).get("rope_theta", 10000.0)))
        add_swa_rope_base(w, cfg)
        if self.arch_key == "GEMMA2" and getattr(cfg, "attn_logit_softcapping", None):
            w.add_attn_logit_softcapping(cfg.attn_logit_softcapping)
        w.add_key_length(hd)
        w.add_value_length(hd)
        w.add_sliding_window(cfg.sliding_window)
        w.add_vocab_size(cfg.vocab_size)
        if getattr(cfg, "final_logit_softcapping", None):
            w.add_final_logit_softcapping(cfg.final_logit_softcapping)


class Gemma3(Gemma2):
    arch_key = "GEMMA3"


class Gemma3Vision(Gemma3):
    """Gemma3ForConditionalGeneration: the text model is GEMMA3; the vision tower and projector belong to an
    mmproj file (not written), so the GGUF is the text LM."""
    text_prefix = "model.language_model."
    skip_prefixes = ("model.vision_tower.", "model.multi_modal_projector.")


class Gemma4(Family):
    """llama.cpp's Gemma4Model: norms stored as they are (Gemma4's RMSNorm multiplies by w), per-layer token
    embeddings, MoE experts kept fused (ffn_gate_up_exps) with the router's input scale and per-expert output
    scale, sliding / full layers with their own head dims, and "proportional" rope on the full layers written as
    rope_freqs (1 for rotated pairs, 1e30 for the unrotated ones)."""
    arch_key = "GEMMA4"

    def check(self, cfg):
        act = getattr(cfg, "hidden_activation", "gelu_pytorch_tanh")
        if act != "gelu_pytorch_tanh":
            raise UnsupportedModelError(f"gemma4 with hidden_activation={act!r}: llama.cpp's gemma4 uses tanh-GELU; "
                                        "export --format merged or bnb4 instead")
        if self._full_rope(cfg).get("rope_type") != "proportional":
            raise UnsupportedModelError("gemma4 full-attention rope_type other than 'proportional' is not supported "
                                        "for GGUF export; export --format merged or bnb4 instead")

    def _full_rope(self, cfg) -> dict:
        return (getattr(cfg, "rope_parameters", None) or {}).get("full_attention", {})

    def _layer(self, cfg, i: int):
        """Layer i's settings (transformers keeps per-layer overrides, e.g. the full layers' head_dim)."""
        per_layer = getattr(cfg, "per_layer_config", None)
        return per_layer[i] if per_layer is not None else cfg

    def _of(self, cfg, kind: str, attr: str):
        """`attr` of the first layer of `kind` (sliding_attention / full_attention); the config's own otherwise."""
        idx = [i for i, t in enumerate(cfg.layer_types) if t == kind]
        return getattr(self._layer(cfg, idx[0]) if idx else cfg, attr)

    def _head_dim_full(self, cfg) -> int:
        return getattr(cfg, "global_head_dim", None) or self._of(cfg, "full_attention", "head_dim")

    def split(self, name, t, cfg):
        if name.endswith(("layer_scalar", "experts.gate_up_proj", "experts.down_proj")):
            return [(f"{name}.weight", t)]  # llama.cpp keeps Gemma4's experts fused (gate rows first)
        if name.endswith("router.scale"):
            return [(name.removesuffix("scale") + "proj.scale", t)]  # → ffn_gate_inp.scale
        if name.endswith("router.per_expert_scale"):
            return [(name.removesuffix("router.per_expert_scale") + "experts.down_proj.scale", t)]  # ffn_down_exps.scale
        return [(name, t)]

    def join(self, name, parts, cfg):
        return parts[0]

    def extra_tensors(self, cfg):
        import torch
        full = self._head_dim_full(cfg)
        n_rot = int(full * self._full_rope(cfg).get("partial_rotary_factor", 1.0) / 2)
        return [("rope_freqs.weight", torch.tensor([1.0] * n_rot + [1e30] * (full // 2 - n_rot)))]

    def metadata(self, w, cfg):
        from lowbit.models.gguf_arch.base import n_experts
        full, swa = self._head_dim_full(cfg), self._of(cfg, "sliding_attention", "head_dim")
        is_swa = [t == "sliding_attention" for t in cfg.layer_types]
        w.add_block_count(cfg.num_hidden_layers)
        w.add_context_length(cfg.max_position_embeddings)
        w.add_embedding_length(cfg.hidden_size)
        n_shared = cfg.num_kv_shared_layers or 0
        if getattr(cfg, "use_double_wide_mlp", False):  # kv-shared layers have twice the MLP width
            first_shared = cfg.num_hidden_layers - n_shared
            w.add_feed_forward_length([cfg.intermediate_size * (1 if i < first_shared else 2)
                                       for i in range(cfg.num_hidden_layers)])
        else:
            w.add_feed_forward_length(cfg.intermediate_size)
        w.add_head_count(cfg.num_attention_heads)
        n_kv = [self._layer(cfg, i).num_key_value_heads if s else (getattr(cfg, "num_global_key_value_heads", None)
                or self._layer(cfg, i).num_key_value_heads) for i, s in enumerate(is_swa)]
        w.add_head_count_kv(n_kv if len(set(n_kv)) > 1 else n_kv[0])
        w.add_rope_freq_base(float(self._full_rope(cfg).get("rope_theta", 1_000_000.0)))
        add_swa_rope_base(w, cfg)
        w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
        if n_experts(cfg):
            w.add_expert_count(n_experts(cfg))
            w.add_expert_used_count(cfg.top_k_experts)
            w.add_expert_feed_forward_length(cfg.moe_intermediate_size)
        w.add_key_length(full)
        w.add_value_length(full)
        w.add_key_length_swa(swa)
        w.add_value_length_swa(swa)
        if getattr(cfg, "final_logit_softcapping", None):
            w.add_final_logit_softcapping(cfg.final_logit_softcapping)
        w.add_sliding_window(cfg.sliding_window)
        w.add_shared_kv_layers(n_shared)
        w.add_embedding_length_per_layer_input(getattr(cfg, "hidden_size_per_layer_input", None) or 0)
        w.add_sliding_window_pattern(is_swa)
        swa_rope = (getattr(cfg, "rope_parameters", None) or {}).get("sliding_attention", {})
        w.add_rope_dimension_count(full)  # the full layers' partial rotation is in rope_freqs
        w.add_rope_dimension_count_swa(int(swa * swa_rope.get("partial_rotary_factor", 1.0)))


class Gemma4Vision(Gemma4):
    """Gemma4ForConditionalGeneration: its text model as GEMMA4; vision / audio towers belong to an mmproj file."""
    text_prefix = "model.language_model."
    skip_prefixes = ("model.vision_tower.", "model.embed_vision.", "model.audio_tower.", "model.embed_audio.")
