"""DeepSeek-V3 as llama.cpp's DEEPSEEK2: multi-head latent attention stored for the absorption trick (kv_b_proj
split into attn_k_b, transposed, and attn_v_b), MQA with one kv head, sigmoid-scored grouped routing with a
score-correction bias, shared experts, the first layers dense."""
from __future__ import annotations

import torch

from lowbit.errors import UnsupportedModelError
from lowbit.models.gguf_arch.base import Family, base_metadata, rope


class DeepseekV3(Family):
    arch_key = "DEEPSEEK2"

    def check(self, cfg):
        if not getattr(cfg, "rope_interleave", True):
            raise UnsupportedModelError("deepseek_v3 with rope_interleave=False: llama.cpp's deepseek2 rotates "
                                        "interleaved pairs; export --format merged or bnb4 instead")

    def _dims(self, cfg):
        return cfg.num_attention_heads, cfg.qk_nope_head_dim, cfg.v_head_dim

    def split(self, name, t, cfg):
        if name.endswith("kv_b_proj.weight"):  # rows per head: [k_nope | v]
            n, nope, v = self._dims(cfg)
            kv_b = t.reshape(n, nope + v, t.shape[-1])
            base = name.removesuffix("kv_b_proj.weight")
            return [(f"{base}k_b_proj.weight", kv_b[:, :nope].transpose(1, 2).contiguous()),
                    (f"{base}v_b_proj.weight", kv_b[:, nope:].contiguous())]
        if name.endswith("e_score_correction_bias"):
            return [(name.removesuffix("_bias") + ".bias", t)]
        return super().split(name, t, cfg)

    def join(self, name, parts, cfg):
        if name.endswith("kv_b_proj.weight"):
            k_b, v_b = parts
            return torch.cat((k_b.transpose(1, 2), v_b), dim=1).reshape(-1, k_b.shape[1])
        return super().join(name, parts, cfg)

    def metadata(self, w, cfg):
        import gguf
        base_metadata(w, cfg, n_kv=1, head_dim_keys=False)  # MLA runs as MQA with larger heads, decompressed per head
        w.add_expert_gating_func(gguf.ExpertGatingFuncType.SIGMOID)  # DeepseekV3's router: scores = sigmoid(logits)
        w.add_leading_dense_block_count(cfg.first_k_dense_replace)
        w.add_vocab_size(cfg.vocab_size)
        if cfg.q_lora_rank is not None:
            w.add_q_lora_rank(cfg.q_lora_rank)
        w.add_kv_lora_rank(cfg.kv_lora_rank)
        w.add_key_length(cfg.kv_lora_rank + cfg.qk_rope_head_dim)
        w.add_value_length(cfg.kv_lora_rank)
        w.add_key_length_mla(cfg.qk_nope_head_dim + cfg.qk_rope_head_dim)
        w.add_value_length_mla(cfg.v_head_dim)
        w.add_expert_feed_forward_length(cfg.moe_intermediate_size)
        w.add_expert_shared_count(cfg.n_shared_experts or 0)
        w.add_expert_weights_scale(cfg.routed_scaling_factor)
        if cfg.norm_topk_prob:
            w.add_expert_weights_norm(True)
        w.add_rope_dimension_count(cfg.qk_rope_head_dim)
        if (mscale_all := rope(cfg).get("mscale_all_dim")) is not None:
            w.add_rope_scaling_yarn_log_mul(0.1 * mscale_all)  # llama.cpp's deepseek2 convention
