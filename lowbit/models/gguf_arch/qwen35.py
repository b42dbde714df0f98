"""Qwen3.5 (dense and MoE; text model of the image-text checkpoint) as llama.cpp's QWEN35 / QWEN35MOE: hybrid
layers of gated delta-net linear attention (ssm_* tensors) and gated full attention. As llama.cpp's
Qwen3NextModel / _LinearAttentionVReorderBase: A stored as -exp(A_log), the conv kernel squeezed, (1+w) RMSNorms
stored as w+1 (not the delta-net's own gated norm), value heads reordered from grouped-by-key-head to tiled."""
from __future__ import annotations

import torch

from lowbit.models.gguf_arch.base import Family, base_metadata, n_experts, rope


def _reorder_v(t: torch.Tensor, dim: int, n_k: int, v_per_k: int, hd: int, inverse: bool = False) -> torch.Tensor:
    """Value heads grouped per key head [K0: v0 v1, K1: v0 v1] ↔ tiled [v0: K0 K1, v1: K0 K1] along `dim`."""
    shape = list(t.shape)
    dim %= len(shape)
    groups = [v_per_k, n_k] if inverse else [n_k, v_per_k]
    t = t.reshape(*shape[:dim], *groups, hd, *shape[dim + 1:])
    return t.transpose(dim, dim + 1).contiguous().reshape(shape)


class Qwen35(Family):
    arch_key = "QWEN35"

    def _v(self, cfg):
        n_k, n_v = cfg.linear_num_key_heads, cfg.linear_num_value_heads
        return n_k, n_v // n_k, cfg.linear_key_head_dim, cfg.linear_value_head_dim

    def _layout(self, name, t, cfg, inverse: bool):
        """The value-head reorder (an involution up to `inverse`); a no-op when key and value heads match."""
        n_k, v_per_k, hk, hv = self._v(cfg)
        if v_per_k == 1 or "linear_attn." not in name:
            return t
        if ".in_proj_qkv." in name or ".conv1d." in name:  # only the value rows / channels
            qk = 2 * hk * n_k
            return torch.cat((t[:qk], _reorder_v(t[qk:], 0, n_k, v_per_k, hv, inverse)))
        if ".in_proj_z." in name:
            return _reorder_v(t, 0, n_k, v_per_k, hv, inverse)
        if ".in_proj_a." in name or ".in_proj_b." in name:
            return _reorder_v(t, 0, n_k, v_per_k, 1, inverse)
        if name.endswith((".A_log", ".dt_bias")):
            return _reorder_v(t.unsqueeze(-1), 0, n_k, v_per_k, 1, inverse).squeeze(-1)
        if ".out_proj." in name:
            return _reorder_v(t, 1, n_k, v_per_k, hv, inverse)
        return t

    def split(self, name, t, cfg):
        t = self._layout(name, t, cfg, inverse=False)
        if name.endswith(".A_log"):
            return [(name, -torch.exp(t))]  # llama.cpp's ssm_a
        if name.endswith(".dt_bias"):
            return [(name.removesuffix(".dt_bias") + ".dt_proj.bias", t)]
        if ".conv1d." in name:
            return [(name, t.squeeze(1))]
        if name.endswith("norm.weight") and not name.endswith("linear_attn.norm.weight"):
            return [(name, t + 1)]
        return super().split(name, t, cfg)

    def join(self, name, parts, cfg):
        t = parts[0]
        if name.endswith(".A_log"):
            t = torch.log(-t)
        elif ".conv1d." in name:
            t = t.unsqueeze(1)
        elif name.endswith("norm.weight") and not name.endswith("linear_attn.norm.weight"):
            t = t - 1
        else:
            t = super().join(name, parts, cfg)
        return self._layout(name, t, cfg, inverse=True)

    def gguf_name(self, name_map, name):
        return name_map.get_name(name) or super().gguf_name(name_map, name)  # ssm_a has no suffix

    def metadata(self, w, cfg):
        base_metadata(w, cfg)
        if n_experts(cfg):
            w.add_expert_feed_forward_length(cfg.moe_intermediate_size)
            w.add_expert_shared_feed_forward_length(cfg.shared_expert_intermediate_size)
        w.add_ssm_conv_kernel(cfg.linear_conv_kernel_dim)
        w.add_ssm_state_size(cfg.linear_key_head_dim)
        w.add_ssm_group_count(cfg.linear_num_key_heads)
        w.add_ssm_time_step_rank(cfg.linear_num_value_heads)
        w.add_ssm_inner_size(cfg.linear_value_head_dim * cfg.linear_num_value_heads)
        # which layers are delta-net; gguf-py 0.19 has no writer method for this newer llama.cpp key
        w.add_array(f"{w.arch}.attention.recurrent_layers", [t == "linear_attention" for t in cfg.layer_types])
        w.add_full_attention_interval(getattr(cfg, "full_attention_interval", None) or 4)
        r = rope(cfg)
        w.add_rope_dimension_count(int(cfg.head_dim * r.get("partial_rotary_factor", 0.25)))
        # Qwen3.5 always rotates with interleaved MRoPE; llama.cpp requires the sections (upstream default)
        w.add_rope_dimension_sections((list(r.get("mrope_section", [11, 11, 10])) + [0, 0, 0, 0])[:4])


class Qwen35Moe(Qwen35):
    arch_key = "QWEN35MOE"


class Qwen35Vision(Qwen35):
    """Qwen3_5ForConditionalGeneration: its text model as QWEN35; the vision tower belongs to an mmproj file."""
    text_prefix = "model.language_model."
    skip_prefixes = ("model.visual.",)
