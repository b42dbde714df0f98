"""Count what a real lowbit model keeps for backward, on the meta device (no weights, no compute).

Any transformers causal LM: the model is built from its config with every parameter on the meta
device, quantized to lowbit's 4-bit layers and wrapped with LoRA exactly as training does, and
its text decoder is run once on a meta batch of the requested size. autograd's saved-tensor
hook records each decoder layer's saved storages (parameters and the layer's own inputs left
out), so the per-layer activation bytes follow the code of each family — attention kind,
norms, MoE routing (T·k token-expert pairs), fused projections — not a formula per family.
The same walk gives the parameter counts: 4-bit vs dense, total vs active experts, trainable.
"""
from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass

import torch
from torch import nn

from lowbit.errors import InputError
from lowbit.modules.moe4bit import Experts4bit


@dataclass
class Probe:
    layer_bytes: list[int]                 # saved for backward, per decoder layer
    quantized_params: int                  # held in 4-bit (Linear4bit + Experts4bit)
    dense_params: int                      # kept in the compute dtype
    trainable_params: int                  # LoRA
    expert_params: int = 0                 # of quantized_params, in MoE experts
    active_expert_params: int = 0          # experts a token runs through (top-k of each layer)
    largest_weight: int = 0                # elements of the biggest single 4-bit matrix (dequantized in backward)
    widest_hidden: int = 0                 # largest MLP/expert intermediate width


def decoder_layers(decoder: nn.Module) -> nn.ModuleList:
    """The decoder's stack of layers: its largest ModuleList."""
    lists = [m for m in decoder.modules() if isinstance(m, nn.ModuleList) and len(m)]
    if not lists:
        raise InputError("cannot find the decoder layers of this model")
    return max(lists, key=lambda m: sum(p.numel() for p in m.parameters()))


def _storages(obj, out: set) -> None:
    if torch.is_tensor(obj):
        out.add(obj.untyped_storage()._cdata)
    elif isinstance(obj, (list, tuple)):
        for o in obj:
            _storages(o, out)
    elif isinstance(obj, dict):
        for o in obj.values():
            _storages(o, out)


def build_meta_model(config, compute_dtype: torch.dtype, blocksize: int = 64, quant_type: str = "nf4"):
    """The 4-bit lowbit model for `config`, every tensor on the meta device."""
    from transformers import AutoModelForCausalLM

    from lowbit.models.load import quantize_model
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=compute_dtype)
    # double quant only changes the absmax bytes, not what the forward keeps; meta cannot run its 8-bit pass
    return quantize_model(model, quant_type=quant_type, blocksize=blocksize, double_quant=False,
                          compute_dtype=compute_dtype)


def probe(config, *, seq: int, batch: int, compute_dtype: torch.dtype, lora_r: int, lora_dropout: float,
          target_modules, experts_lora: bool) -> Probe:
    from lowbit.modules.linear4bit import Linear4bit
    from lowbit.modules.lora import add_lora, prepare_for_kbit_training
    model = build_meta_model(config, compute_dtype)
    linears = [m for m in model.modules() if isinstance(m, Linear4bit)]
    experts = [m for m in model.modules() if isinstance(m, Experts4bit)]
    mats = [x.canonical_shape(p)[0] * x.canonical_shape(p)[1] for x in experts for p in x.projs]
    per_layer_experts = [x.num_experts * sum(x.canonical_shape(p)[0] * x.canonical_shape(p)[1] for p in x.projs)
                         for x in experts]
    top_k = _top_k(config)
    widest = [x.canonical_shape("down_proj")[1] for x in experts] + \
             [m.in_features for n, m in model.named_modules() if n.endswith("down_proj") and isinstance(m, nn.Linear)]
    dense = sum(p.numel() for p in model.parameters() if p.dtype != torch.uint8)  # before LoRA joins
    prepare_for_kbit_training(model, False)
    with warnings.catch_warnings():  # peft's own deprecation notices, not the user's concern here
        warnings.simplefilter("ignore")
        pm = add_lora(model, r=lora_r, alpha=2 * lora_r, dropout=lora_dropout, target_modules=target_modules,
                      target_parameters="all-experts" if experts_lora and experts else None)
    return Probe(layer_bytes=trace_layers(pm, seq, batch),
                 quantized_params=sum(m.in_features * m.out_features for m in linears) + sum(per_layer_experts),
                 dense_params=dense,
                 trainable_params=sum(p.numel() for p in pm.parameters() if p.requires_grad),
                 expert_params=sum(per_layer_experts),
                 active_expert_params=sum(e * top_k // x.num_experts for e, x in zip(per_layer_experts, experts)),
                 largest_weight=max([m.in_features * m.out_features for m in linears] + mats + [0]),
                 widest_hidden=max(widest + [0]))


def _top_k(config) -> int:
    c = config.get_text_config() if hasattr(config, "get_text_config") else config
    for k in ("num_experts_per_tok", "top_k_experts", "moe_topk", "num_experts_per_token"):
        if getattr(c, k, None):
            return int(getattr(c, k))
    return 1


def trace_layers(model: nn.Module, seq: int, batch: int, input_ids: torch.Tensor | None = None) -> list[int]:
    """Bytes autograd saves in each decoder layer of `model` (peft or plain) for one forward."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    decoder = base.get_decoder()
    layers = decoder_layers(decoder)
    base.train()
    known = set()
    _storages([*model.parameters(), *model.buffers()], known)
    current: list[int | None] = [None]
    saved: list[dict] = [{} for _ in layers]
    excluded: list[set] = [set() for _ in layers]

    def pre(i):
        def hook(mod, args, kwargs):
            current[0] = i
            _storages((args, kwargs), excluded[i])  # the layer's input and position embeddings are not its own
        return hook

    def post(mod, args, kwargs, out):
        current[0] = None

    def pack(t):
        i = current[0]
        if i is not None:
            sid = t.untyped_storage()._cdata
            if sid not in known and sid not in excluded[i]:
                saved[i][sid] = t.untyped_storage().nbytes()
        return t

    device = next(model.parameters()).device
    ids = torch.zeros(batch, seq, dtype=torch.long, device=device) if input_ids is None else input_ids
    handles = [layer.register_forward_pre_hook(pre(i), with_kwargs=True) for i, layer in enumerate(layers)]
    handles += [layer.register_forward_hook(post, with_kwargs=True) for layer in layers]
    # as training does (enable_input_require_grads): every layer's input requires grad, layer 0's included
    handles.append(decoder.get_input_embeddings().register_forward_hook(lambda m, a, out: out.requires_grad_(True)))
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), _meta_safe(decoder), _flash_sdpa(device):
            decoder(input_ids=ids, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return [sum(d.values()) for d in saved]


@contextlib.contextmanager
def _meta_safe(decoder: nn.Module):
    """transformers reads token values in two places meta tensors do not have: the packed-sequence check
    (a training batch is not packed) and GPT-2's padding warning. Attention masks are built as in training."""
    import transformers.masking_utils as mu
    packed = mu.find_packed_sequence_indices
    mu.find_packed_sequence_indices = lambda *a, **k: None
    decoder.warn_if_padding_and_no_attention_mask = lambda *a, **k: None
    try:
        yield
    finally:
        mu.find_packed_sequence_indices = packed
        del decoder.warn_if_padding_and_no_attention_mask


class _FlashSaved(torch.autograd.Function):
    """SDPA as the fused (flash / memory-efficient) kernels run it: keeps q, k, v, the output, an fp32
    logsumexp and the additive mask (a boolean one converted to float). On meta, torch would fall back to
    the math kernel, which keeps the T×T probabilities."""

    @staticmethod
    def forward(ctx, q, k, v, mask):
        # the kernel writes its output in q's layout: [B, T, H, D] transposed for the usual q (the reshape after
        # it is then a view), plain [B, H, T, D] for a strided slice of a fused qkv (then the reshape copies)
        b, h, t, d = q.shape[0], q.shape[1], q.shape[2], v.shape[-1]
        out = q.new_empty(b, t, h, d).transpose(1, 2) if q.transpose(1, 2).is_contiguous() else q.new_empty(b, h, t, d)
        lse = torch.empty(q.shape[:-1], dtype=torch.float32, device=q.device)
        keep = [q, k, v, out, lse]
        if mask is not None:
            keep.append(torch.empty(mask.shape, dtype=q.dtype, device=q.device) if mask.dtype == torch.bool else mask)
        ctx.save_for_backward(*keep)
        return out

    @staticmethod
    def backward(ctx, grad):
        q, k, v = ctx.saved_tensors[:3]
        return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v), None


@contextlib.contextmanager
def _flash_sdpa(device: torch.device):
    fn = torch.nn.functional.scaled_dot_product_attention

    def sdpa(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
        if q.device.type != "meta" or q.shape[-1] != v.shape[-1]:
            return fn(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale,
                      enable_gqa=enable_gqa)  # unequal head dims run unfused (math) on real devices too
        return _FlashSaved.apply(q, k, v, attn_mask)

    torch.nn.functional.scaled_dot_product_attention = sdpa if device.type == "meta" else fn
    try:
        yield
    finally:
        torch.nn.functional.scaled_dot_product_attention = fn
