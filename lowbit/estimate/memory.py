"""Peak training memory per device, from the architecture alone (no weights read).

Broken down into what stays resident (weights, adapters, gradients, optimizer state), the
activations stored by the forward, and the transients of the three moments that can hold the
peak: the chunked loss's logits, one layer's backward, the optimizer step. For a model given by
its config (a folder, a config.json, an MoE preset) QLoRA/LoRA activations and parameter counts
come from running the real lowbit model on the meta device (probe.py: any family, MoE experts
counted as T·k routed pairs, total vs active experts reported); published dense presets and
full/QAT fine-tuning use the tensor-by-tensor count of a Llama/Gemma/Qwen/Mistral decoder layer
below. `tests/test_scale_estimate.py` and `tests/test_any_model.py` check the per-layer counts
against autograd's saved tensors and `scripts/benchmark_estimate.py` against measured peak RSS.

Sharding (world_size > 1): ZeRO-1 shards optimizer state, ZeRO-2 also gradients, ZeRO-3
(and FSDP, `zero_stage=3`) also weights. CPU offload moves optimizer state (and for ZeRO-3
parameters) to host memory, reported separately.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from lowbit.errors import ConfigError, InputError

GiB = 1024 ** 3
METHODS = ("qlora", "lora", "full", "qat")
OPTIMIZERS = ("adamw_torch", "adamw_8bit", "paged_adamw_8bit", "paged_adamw_32bit", "sgd")
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
RESIDENT = ("weights", "adapters", "gradients", "optimizer", "runtime")  # alive through the whole step
LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

# Published architectures (their config.json values) for sizing models not on disk.
PRESETS = {
    "llama-7b": dict(vocab=32000, hidden=4096, intermediate=11008, layers=32, heads=32, kv_heads=32),
    "llama-13b": dict(vocab=32000, hidden=5120, intermediate=13824, layers=40, heads=40, kv_heads=40),
    "llama-33b": dict(vocab=32000, hidden=6656, intermediate=17920, layers=60, heads=52, kv_heads=52),
    "llama-65b": dict(vocab=32000, hidden=8192, intermediate=22016, layers=80, heads=64, kv_heads=64),
    "llama-3-8b": dict(vocab=128256, hidden=4096, intermediate=14336, layers=32, heads=32, kv_heads=8),
    "llama-3-70b": dict(vocab=128256, hidden=8192, intermediate=28672, layers=80, heads=64, kv_heads=8),
    "gemma-3-270m": dict(vocab=262144, hidden=640, intermediate=2048, layers=18, heads=4, kv_heads=1, head_dim=256,
                         tied=True, arch="gemma3_text"),
}
# MoE presets: config.json values, sized through the meta-device probe
CONFIG_PRESETS = {
    "mixtral-8x7b": dict(model_type="mixtral", vocab_size=32000, hidden_size=4096, intermediate_size=14336,
                         num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8, num_local_experts=8,
                         num_experts_per_tok=2),
    "qwen3-30b-a3b": dict(model_type="qwen3_moe", vocab_size=151936, hidden_size=2048, intermediate_size=6144,
                          moe_intermediate_size=768, num_hidden_layers=48, num_attention_heads=32,
                          num_key_value_heads=4, head_dim=128, num_experts=128, num_experts_per_tok=8),
}


@dataclass
class ModelShape:
    vocab: int
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int = 0
    tied: bool = False
    arch: str = "llama"
    config: dict | None = None  # the HF config: when set, QLoRA/LoRA are sized by the meta-device probe

    def __post_init__(self):
        self.head_dim = self.head_dim or self.hidden // self.heads

    @classmethod
    def from_config(cls, c: dict) -> "ModelShape":
        t = hf_config(c).get_text_config()
        hidden, heads, layers = _attr(t, "hidden_size"), _attr(t, "num_attention_heads"), _attr(t, "num_hidden_layers")
        if not hidden or not heads or not layers:
            raise InputError("model config lacks hidden_size / num_attention_heads / num_hidden_layers; give a "
                             "decoder-only HF config.json")
        inter = _attr(t, "intermediate_size") or _attr(t, "n_inner") or 4 * hidden
        return cls(vocab=_attr(t, "vocab_size"), hidden=hidden, intermediate=inter, layers=layers, heads=heads,
                   kv_heads=_attr(t, "num_key_value_heads") or heads, head_dim=_attr(t, "head_dim") or 0,
                   tied=bool(_attr(t, "tie_word_embeddings") or c.get("tie_word_embeddings", False)),
                   arch=c.get("model_type", "llama"), config=c)

    @classmethod
    def load(cls, model: str) -> "ModelShape":
        """A preset name, an HF model folder, or a config.json path."""
        if model in PRESETS:
            return cls(**PRESETS[model])
        if model in CONFIG_PRESETS:
            return cls.from_config(CONFIG_PRESETS[model])
        p = Path(model)
        if p.is_dir():
            p = p / "config.json"
        if not p.exists():
            raise InputError(f"model {model!r} is neither a preset ({', '.join([*PRESETS, *CONFIG_PRESETS])}) nor a "
                             "folder/config.json")
        return cls.from_config(json.loads(p.read_text()))

    @property
    def is_gemma(self) -> bool:
        return self.arch.startswith("gemma")

    @property
    def has_qk_norm(self) -> bool:
        return self.arch in ("gemma3_text", "gemma3", "qwen3")

    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        """(in_features, out_features) of each projection in one decoder layer."""
        h, q, kv, i = self.hidden, self.heads * self.head_dim, self.kv_heads * self.head_dim, self.intermediate
        return {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
                "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}

    def linear_params(self) -> int:
        return self.layers * sum(a * b for a, b in self.linear_shapes().values())

    def other_params(self) -> int:
        """Embeddings, lm_head (untied), norms: not quantized."""
        norms = self.layers * ((4 if self.is_gemma else 2) * self.hidden + (2 * self.head_dim if self.has_qk_norm else 0))
        return self.vocab * self.hidden * (1 if self.tied else 2) + norms + self.hidden

    def params(self) -> int:
        return self.linear_params() + self.other_params()


def _attr(cfg, name: str):
    # per-layer (heterogeneous) configs such as Gemma 4's refuse global reads of e.g. head_dim
    try:
        return getattr(cfg, name, None)
    except Exception:
        return None


def hf_config(c: dict):
    """A transformers config object from a config.json dict."""
    from transformers import AutoConfig
    kw = {k: v for k, v in c.items() if k not in ("model_type", "transformers_version", "architectures")}
    try:
        return AutoConfig.for_model(c.get("model_type", "llama"), **kw)
    except (ValueError, KeyError) as e:
        raise InputError(f"transformers does not know model type {c.get('model_type')!r} ({e})") from None


@dataclass
class Setup:
    seq: int = 512
    batch: int = 1
    method: str = "qlora"
    optimizer: str = "adamw_torch"
    gradient_checkpointing: bool = True
    world_size: int = 1
    zero_stage: int = 0                 # 0 = plain DDP; 3 also means FSDP full sharding
    offload: str = "none"               # none | optimizer | optimizer+params
    lora_r: int = 16
    lora_dropout: float = 0.0
    target_modules: list[str] = field(default_factory=lambda: list(LINEARS))
    compute_dtype: str = "bfloat16"
    adapter_dtype: str = "float32"      # lowbit keeps LoRA weights in fp32
    blocksize: int = 64
    double_quant: bool = True
    loss_chunk_tokens: int = 256
    runtime_bytes: int = 0              # process baseline (CUDA context / CPU runtime), if known
    experts_lora: bool = True           # MoE: LoRA on the experts too (peft target_parameters)
    fused_lora: bool = True             # lowbit's fused LoRA matmul (CPU, adapters in the compute dtype)

    def check(self, known_targets=LINEARS) -> None:
        if self.method not in METHODS:
            raise ConfigError(f"method {self.method!r}: choose one of {', '.join(METHODS)}")
        if self.optimizer not in OPTIMIZERS:
            raise ConfigError(f"optimizer {self.optimizer!r}: choose one of {', '.join(OPTIMIZERS)}")
        if self.zero_stage not in (0, 1, 2, 3):
            raise ConfigError(f"zero_stage {self.zero_stage}: choose 0, 1, 2 or 3")
        if self.offload not in ("none", "optimizer", "optimizer+params"):
            raise ConfigError(f"offload {self.offload!r}: choose none, optimizer or optimizer+params")
        if self.seq < 1 or self.batch < 1 or self.world_size < 1:
            raise ConfigError("seq, batch and world_size must be >= 1")
        for d in (self.compute_dtype, self.adapter_dtype):
            if d not in DTYPE_BYTES:
                raise ConfigError(f"dtype {d!r}: choose one of {', '.join(DTYPE_BYTES)}")
        bad = [t for t in self.target_modules if known_targets is not None and t not in known_targets]
        if bad:
            raise ConfigError(f"target_modules {bad} unknown; choose from {', '.join(known_targets)}")


def _quant_bytes_per_param(blocksize: int, double_quant: bool) -> float:
    """4-bit codes + absmax (fp32, or 8-bit codes + per-256-block fp32 when double-quantized)."""
    if double_quant:
        return 0.5 + 1 / blocksize + 4 / (blocksize * 256)
    return 0.5 + 4 / blocksize


def layer_activation_bytes(m: ModelShape, s: Setup) -> int:
    """Bytes autograd keeps for one decoder layer's backward (no checkpointing), per device.

    The frozen 4-bit matmul keeps nothing of its input (d/dx needs only the weight); what
    keeps linear inputs alive is LoRA (or, for full/QAT, the trainable weight)."""
    T = s.batch * s.seq
    e, a = DTYPE_BYTES[s.compute_dtype], DTYPE_BYTES[s.adapter_dtype]
    h, i, q, kv = m.hidden, m.intermediate, m.heads * m.head_dim, m.kv_heads * m.head_dim
    norms = 4 if m.is_gemma else 2
    total = norms * (4 * T * h + 4 * T)           # RMSNorm keeps its fp32 input and 1/rms
    if m.has_qk_norm:
        total += 4 * T * (q + kv) + 4 * T * (m.heads + m.kv_heads)
    total += e * T * (2 * q + 2 * kv)             # SDPA keeps rotated q, k, v and its output
    total += 4 * T * m.heads                      # ... and the fp32 logsumexp
    total += 3 * e * T * i                        # gate/up outputs and the activation's output
    if s.method in ("full", "qat"):
        return int(total + e * T * (2 * h + i))   # attention/MLP/down inputs (o_proj's is SDPA's output)
    shapes = m.linear_shapes()
    groups = {"attn": ("q_proj", "k_proj", "v_proj"), "mlp": ("gate_proj", "up_proj"), "down": ("down_proj",)}
    width = {"attn": h, "mlp": h, "down": i}
    if s.fused_lora and a == e:                   # fused: the shared input, plus a bool keep-mask per adapter
        total += sum(e * T * width[g] for g, names in groups.items() if set(names) & set(s.target_modules))
        if s.lora_dropout > 0:
            total += sum(T * shapes[t][0] for t in s.target_modules)
    elif s.lora_dropout > 0 or a != e:            # each adapter keeps its own copy of the input
        per_copy = 2 * a if s.lora_dropout > 0 else a  # dropout: output + its mask (input dtype)
        total += sum(per_copy * T * shapes[t][0] for t in s.target_modules)
    else:                                         # adapters share the layer's input tensors
        total += sum(e * T * width[g] for g, names in groups.items() if set(names) & set(s.target_modules))
    total += len(s.target_modules) * a * T * s.lora_r   # lora_A outputs, kept by lora_B
    return int(total)


def _probe(m: ModelShape, s: Setup):
    """The meta-device trace of the real model (cached: a config and setup give one answer)."""
    import torch

    from lowbit.estimate.probe import probe
    targets = "all-linear" if list(s.target_modules) == list(LINEARS) else list(s.target_modules)
    key = (json.dumps(m.config, sort_keys=True, default=str), s.seq, s.batch, s.compute_dtype, s.lora_r,
           s.lora_dropout, str(targets), s.experts_lora and s.lora_dropout == 0)
    if key not in _PROBES:
        _PROBES[key] = probe(hf_config(m.config), seq=s.seq, batch=s.batch,
                             compute_dtype=getattr(torch, s.compute_dtype), lora_r=s.lora_r,
                             lora_dropout=s.lora_dropout, target_modules=targets, experts_lora=key[-1])
    return _PROBES[key]


_PROBES: dict = {}


def estimate(m: ModelShape, s: Setup) -> dict:
    """Peak bytes per device by component (+ host bytes under CPU offload)."""
    traced = m.config is not None and s.method in ("qlora", "lora")
    s.check(None if traced else LINEARS)
    e, a = DTYPE_BYTES[s.compute_dtype], DTYPE_BYTES[s.adapter_dtype]
    W, T = s.world_size, s.batch * s.seq
    shard_w = W if s.zero_stage == 3 else 1
    shard_g = W if s.zero_stage >= 2 else 1
    shard_o = W if s.zero_stage >= 1 else 1
    shapes = m.linear_shapes()
    pr = _probe(m, s) if traced else None
    qbytes = _quant_bytes_per_param(s.blocksize, s.double_quant)
    if pr is not None:
        weights = pr.quantized_params * (qbytes if s.method == "qlora" else e) + pr.dense_params * e
    elif s.method == "qlora":
        weights = m.linear_params() * qbytes + m.other_params() * e
    else:
        weights = m.params() * e
    if s.method in ("qlora", "lora"):
        trainable = pr.trainable_params if pr is not None else \
            m.layers * s.lora_r * sum(sum(shapes[t]) for t in s.target_modules)
        adapters, grad_bytes, master = trainable * a, a, 0
    else:                                         # full / QAT: every weight trains
        trainable, adapters, grad_bytes = m.params(), 0, e
        master = 4 if e != 4 else 0               # fp32 master copy under bf16 mixed precision
    state = {"adamw_torch": 8, "paged_adamw_32bit": 8, "adamw_8bit": 2 + 8 / 256, "paged_adamw_8bit": 2 + 8 / 256,
             "sgd": 0}[s.optimizer]
    optimizer = trainable * (state + master) / shard_o
    gradients = trainable * grad_bytes / shard_g
    weights /= shard_w
    adapters /= shard_w
    host = 0.0
    if s.offload != "none":
        host += optimizer
        optimizer = 0.0
        if s.offload == "optimizer+params":
            host += weights
            weights = 0.0
    per_layer = max(pr.layer_bytes) if pr is not None else layer_activation_bytes(m, s)
    # The peak is the largest of three moments, not the sum of their transients (measured with a
    # dispatch-mode tracker of live tensors: tiny Llama, checkpointing on and off):
    #   loss:     stored activations + the final norm's input + the chunked loss's logits
    #   backward: stored activations + one layer's recomputed activations (checkpointing) + the
    #             layer's gradient workspace; the loss phase's tensors are freed by then
    #   step:     the optimizer's temporaries; activations are freed by then
    if s.gradient_checkpointing:                  # each layer's input kept (layer 0's = the embedding output)
        activations = m.layers * e * T * m.hidden
        recompute = per_layer
    else:
        activations = sum(pr.layer_bytes) if pr is not None else m.layers * per_layer
        recompute = 0
    # chunked loss with a frozen head: d(loss)/dh kept for all tokens; one chunk's logits live
    # as the matmul output (compute dtype) and its fp32 copy, then the fp32 softmax cast back
    C = min(s.loss_chunk_tokens, T)
    logits = 4 * T * m.hidden + e * T * m.hidden + C * m.vocab * (4 + (e if e != 4 else 0))
    if s.method in ("full", "qat"):
        logits += C * m.vocab * 4                 # trainable head: chunks recomputed with grads
    # backward's activation gradients for one layer; the 4-bit backward (and QAT's fake-quantized
    # forward) dequantizes one weight; the gathered layer under ZeRO-3
    big_in, big_out = max(shapes.values(), key=lambda t: t[0] * t[1])
    biggest, widest = (pr.largest_weight, max(pr.widest_hidden, m.intermediate)) if pr is not None else \
        (big_in * big_out, m.intermediate)
    workspace = 3 * e * T * widest + 2 * e * T * m.hidden
    if s.method in ("qlora", "qat"):
        workspace += e * biggest
    if s.zero_stage == 3 and W > 1:
        workspace += sum(x * y for x, y in shapes.values()) * (
            _quant_bytes_per_param(s.blocksize, s.double_quant) if s.method == "qlora" else e)
    backward = recompute + workspace
    step = trainable / shard_o * 4 if s.optimizer == "adamw_torch" else 0  # foreach AdamW's sqrt(v) temporary
    phases = {"loss": activations + logits, "backward": activations + backward, "step": step}
    peak_phase = max(phases, key=phases.get)
    parts = {"weights": weights, "adapters": adapters, "gradients": gradients, "optimizer": optimizer,
             "runtime": s.runtime_bytes, "activations": activations, "logits": logits, "backward": backward,
             "step": step}
    parts = {k: int(v) for k, v in parts.items()}
    resident = sum(parts[k] for k in RESIDENT)
    params = pr.quantized_params + pr.dense_params if pr is not None else m.params()
    moe = {} if pr is None or not pr.expert_params else {
        "expert_params_total": pr.expert_params, "expert_params_active": pr.active_expert_params,
        "active_params": params - pr.expert_params + pr.active_expert_params}
    return {**parts, "total": resident + int(phases[peak_phase]), "peak_phase": peak_phase,
            "host_offload": int(host), "trainable_params": int(trainable), "params": params,
            "per_layer_activations": per_layer, "sized_by": "meta trace" if pr is not None else "formula", **moe}


def report(m: ModelShape, s: Setup, name: str = "") -> str:
    r = estimate(m, s)
    what = {"loss": "activations + logits", "backward": "activations + backward", "step": "step"}[r["peak_phase"]]
    moe = (f" ({r['active_params'] / 1e9:.3f}B active per token: experts {r['expert_params_active'] / 1e9:.3f}B "
           f"of {r['expert_params_total'] / 1e9:.3f}B, all resident)") if "active_params" in r else ""
    lines = [f"{name or m.arch}: {r['params'] / 1e9:.3f}B params{moe}, {r['trainable_params'] / 1e6:.2f}M trainable; "
             f"{s.method}, seq {s.seq} x batch {s.batch}, {s.optimizer}, gradient checkpointing "
             f"{'on' if s.gradient_checkpointing else 'off'}, world {s.world_size}, ZeRO-{s.zero_stage}"]
    for k in (*RESIDENT, "activations", "logits", "backward", "step"):
        if r[k] or k != "runtime":
            lines.append(f"  {k:<12} {r[k] / GiB:9.3f} GiB" + ("  (transient)" if k in ("logits", "backward", "step") else ""))
    lines.append(f"  {'peak':<12} {r['total'] / GiB:9.3f} GiB per device (resident + {what}: the {r['peak_phase']} phase)")
    if r["host_offload"]:
        lines.append(f"  {'host (offload)':<12} {r['host_offload'] / GiB:7.3f} GiB")
    return "\n".join(lines)
