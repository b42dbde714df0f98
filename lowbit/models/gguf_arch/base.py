"""What every GGUF family shares: gguf-py's name map, the per-tensor split/join hooks and the metadata keys
llama.cpp's `TextModel.set_gguf_parameters` writes for any text model."""
from __future__ import annotations

import torch

from lowbit.errors import UnsupportedModelError


def permute_qk(w: torch.Tensor, n_head: int, n_head_kv: int | None = None) -> torch.Tensor:
    """llama.cpp's LlamaModel.permute: HF's half-split rotary rows → interleaved pairs."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def unpermute_qk(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Inverse of `permute_qk` (n_head: the heads of this projection)."""
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def rope(cfg) -> dict:
    """transformers 5 keeps rope settings in `rope_parameters` (per layer type for some models)."""
    params = getattr(cfg, "rope_parameters", None) or {}
    full = params.get("full_attention", params)
    if "rope_theta" not in full and getattr(cfg, "rope_theta", None) is not None:
        full = {**full, "rope_theta": cfg.rope_theta}
    return full


def first(cfg, *names, default=None):
    """The first of `names` the config sets (configs spell the same setting differently)."""
    for n in names:
        v = getattr(cfg, n, None)
        if v is not None:
            return v
    return default


def n_experts(cfg) -> int:
    return int(first(cfg, "num_local_experts", "num_experts", "n_routed_experts", default=0) or 0)


class Family:
    """One model_type's GGUF conventions. `split` turns one HF tensor into llama.cpp's pieces (each named so
    gguf-py's TensorNameMap knows it), `join` undoes it; `metadata` writes the hyper-parameter keys."""
    arch_key = "LLAMA"
    skip_prefixes: tuple[str, ...] = ()  # towers llama.cpp writes to a separate mmproj file
    text_prefix = ""  # where an image-text checkpoint keeps its text model in the state dict
    norm_shift = 0.0  # Gemma-style RMSNorm x·(1+w): llama.cpp stores w+1

    def text_config(self, cfg):
        return getattr(cfg, "text_config", None) or cfg

    def check(self, cfg) -> None:
        """Raise UnsupportedModelError for settings GGUF cannot express."""

    experts_transposed = False  # fused experts stored (n_expert, in, out) and used as x @ W (gpt-oss, llama4)
    experts_interleaved = False  # gate and up rows alternate in gate_up_proj (gpt-oss)

    def split(self, name: str, t: torch.Tensor, cfg) -> list[tuple[str, torch.Tensor]]:
        if self.norm_shift and name.endswith("norm.weight"):
            t = t + self.norm_shift
        if name.endswith("experts.gate_up_proj"):
            return split_fused_experts(name, t, transposed=self.experts_transposed, interleaved=self.experts_interleaved)
        if name.endswith("experts.gate_up_proj_bias"):  # (n_expert, 2·ff): the bias of each half
            parts = split_fused_experts(name.removesuffix("_bias"), t.unsqueeze(-1), interleaved=self.experts_interleaved)
            return [(n.removesuffix(".weight") + ".bias", p.squeeze(-1)) for n, p in parts]
        if name.endswith("experts.down_proj"):
            return [(f"{name}.weight", t.transpose(-1, -2).contiguous() if self.experts_transposed else t)]
        if name.endswith("experts.down_proj_bias"):
            return [(name.removesuffix("_bias") + ".bias", t)]
        return [(name, t)]

    def join(self, name: str, parts: list[torch.Tensor], cfg) -> torch.Tensor:
        if name.endswith("experts.gate_up_proj"):
            return join_fused_experts(parts, transposed=self.experts_transposed, interleaved=self.experts_interleaved)
        if name.endswith("experts.gate_up_proj_bias"):
            return join_fused_experts([p.unsqueeze(-1) for p in parts], interleaved=self.experts_interleaved).squeeze(-1)
        t = parts[0]
        if name.endswith("experts.down_proj") and self.experts_transposed:
            return t.transpose(-1, -2).contiguous()
        if self.norm_shift and name.endswith("norm.weight"):
            t = t - self.norm_shift
        return t

    def extra_tensors(self, cfg) -> list[tuple[str, torch.Tensor]]:
        """Tensors llama.cpp needs that the checkpoint does not hold (derived from the config)."""
        return []

    def gguf_name(self, name_map, name: str) -> str | None:
        base, _, suffix = name.rpartition(".")
        new = name_map.get_name(base)
        return None if new is None else f"{new}.{suffix}"

    def metadata(self, w, cfg) -> None:
        base_metadata(w, cfg)


def base_metadata(w, cfg, n_ff: int | None = None, n_kv: int | None = None, head_dim_keys: bool = True) -> None:
    """The keys llama.cpp's TextModel.set_gguf_parameters writes from a config."""
    w.add_block_count(cfg.num_hidden_layers)
    if (n_ctx := first(cfg, "max_position_embeddings", "n_positions")) is not None:
        w.add_context_length(n_ctx)
    w.add_embedding_length(cfg.hidden_size)
    if (n_ff := n_ff or first(cfg, "intermediate_size", "n_inner")) is not None:
        w.add_feed_forward_length(n_ff)
    w.add_head_count(cfg.num_attention_heads)
    if (n_kv := n_kv or getattr(cfg, "num_key_value_heads", None)) is not None:
        w.add_head_count_kv(n_kv)
    r = rope(cfg)
    rope_scaling(w, r)
    if (theta := r.get("rope_theta")) is not None:
        w.add_rope_freq_base(float(theta))
    add_swa_rope_base(w, cfg)
    if (eps := getattr(cfg, "rms_norm_eps", None)) is not None:
        w.add_layer_norm_rms_eps(eps)
    if (eps := first(cfg, "layer_norm_eps", "layer_norm_epsilon")) is not None:
        w.add_layer_norm_eps(eps)
    if n_experts(cfg):
        w.add_expert_count(n_experts(cfg))
        w.add_expert_used_count(first(cfg, "num_experts_per_tok", "top_k_experts"))
    if getattr(cfg, "n_group", None) is not None and getattr(cfg, "topk_group", None) is not None:
        w.add_expert_group_count(cfg.n_group)
        w.add_expert_group_used_count(cfg.topk_group)
    if head_dim_keys and getattr(cfg, "head_dim", None) is not None:
        w.add_key_length(cfg.head_dim)
        w.add_value_length(cfg.head_dim)


def add_swa_rope_base(w, cfg) -> None:
    """The sliding-window layers' own rope base (Gemma3: 10k local vs 1M global), where the config has one."""
    local = ((getattr(cfg, "rope_parameters", None) or {}).get("sliding_attention") or {}).get("rope_theta")
    if local is not None:
        w.add_rope_freq_base_swa(float(local))


def rope_scaling(w, r: dict) -> None:
    import gguf
    kind, factor = r.get("rope_type"), r.get("factor")
    if kind in (None, "default"):
        return
    if kind == "linear" and factor is not None:
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(factor)
    elif kind == "yarn" and factor is not None:
        w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        w.add_rope_scaling_factor(factor)
        w.add_rope_scaling_orig_ctx_len(r["original_max_position_embeddings"])
        for key, fn in (("beta_fast", w.add_rope_scaling_yarn_beta_fast), ("beta_slow", w.add_rope_scaling_yarn_beta_slow)):
            if r.get(key) is not None:
                fn(r[key])
    elif kind == "llama3":
        pass  # llama.cpp applies it through the rope_freqs tensor (llama3_rope_factors), no keys
    else:  # longrope / dynamic need factor tensors or runtime rules we do not write
        raise UnsupportedModelError(f"rope_type {kind!r} is not supported for GGUF export yet; export --format merged "
                                    "or bnb4 instead")


def split_fused_experts(name: str, t: torch.Tensor, *, transposed: bool = False, interleaved: bool = False):
    """transformers 5's fused 3-D `gate_up_proj` (n_expert, 2·ff, hidden) → llama.cpp's ffn_gate_exps / ffn_up_exps
    (n_expert, ff, hidden each). `transposed`: stored (n_expert, hidden, 2·ff); `interleaved`: gate/up alternate."""
    if transposed:
        t = t.transpose(-1, -2)
    if interleaved:
        gate, up = t[:, 0::2], t[:, 1::2]
    else:
        gate, up = t.chunk(2, dim=-2)
    base = name.removesuffix(".gate_up_proj")
    return [(f"{base}.gate_proj.weight", gate.contiguous()), (f"{base}.up_proj.weight", up.contiguous())]


def join_fused_experts(parts, *, transposed: bool = False, interleaved: bool = False) -> torch.Tensor:
    gate, up = parts
    t = torch.stack((gate, up), dim=2).flatten(1, 2) if interleaved else torch.cat((gate, up), dim=-2)
    return t.transpose(-1, -2).contiguous() if transposed else t


def llama3_rope_factors(cfg, head_dim: int) -> torch.Tensor | None:
    """llama.cpp's rope_freqs for rope_type "llama3": per frequency, 1 (high), `factor` (low) or the smooth blend
    between, as transformers' _compute_llama3_parameters (None for other rope types)."""
    import math
    r = rope(cfg)
    if r.get("rope_type") != "llama3":
        return None
    base, factor = r.get("rope_theta", 10000.0), r.get("factor", 8.0)
    low, high = r.get("low_freq_factor", 1.0), r.get("high_freq_factor", 4.0)
    old_ctx = r.get("original_max_position_embeddings", 8192)
    freqs = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    out = []
    for f in freqs:  # 0-d float32 tensors: the same rounding as llama.cpp's converter
        wavelen = 2 * math.pi / f
        if wavelen < old_ctx / high:
            out.append(1.0)
        elif wavelen > old_ctx / low:
            out.append(factor)
        else:
            smooth = (old_ctx / wavelen - low) / (high - low)
            out.append(float(1 / ((1 - smooth) / factor + smooth)))
    return torch.tensor(out, dtype=torch.float32)
