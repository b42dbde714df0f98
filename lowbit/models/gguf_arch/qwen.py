"""Qwen families: qwen2, qwen3 (q/k norms per head), qwen3_moe (3-D experts + router)."""
from __future__ import annotations

from lowbit.errors import UnsupportedModelError
from lowbit.models.gguf_arch.base import Family, base_metadata


class Qwen2(Family):
    """llama.cpp's Qwen2Model: names only (NEOX rope, no permute)."""
    arch_key = "QWEN2"

    def metadata(self, w, cfg):
        base_metadata(w, cfg)
        w.add_vocab_size(cfg.vocab_size)


class Qwen3(Qwen2):
    arch_key = "QWEN3"


class Qwen3Moe(Qwen2):
    """llama.cpp's Qwen3MoeModel: fused gate_up_proj split into ffn_gate_exps / ffn_up_exps."""
    arch_key = "QWEN3MOE"

    def check(self, cfg):
        if not getattr(cfg, "norm_topk_prob", True):
            raise UnsupportedModelError("qwen3_moe with norm_topk_prob=False: llama.cpp's qwen3moe always renormalizes "
                                        "the top-k router weights (as every released Qwen3 MoE); export --format merged "
                                        "or bnb4 instead")

    def metadata(self, w, cfg):
        super().metadata(w, cfg)
        w.add_expert_feed_forward_length(cfg.moe_intermediate_size)
