"""`Experts4bit`: a transformers MoE experts module with every expert matrix in NF4/FP4.

transformers 5 keeps a layer's experts as fused 3-D parameters (`gate_up_proj` [E, 2I, H],
`down_proj` [E, H, I]; gpt-oss and Llama 4 store them transposed, gpt-oss adds biases). Each
expert's matrix is quantized on its own, as the [out, in] weight of a bitsandbytes 4-bit Linear,
and the E results are stacked: row e of `packed`/`absmax`/... is exactly that Linear's state.
The forward runs only the experts the batch routes to, through the 4-bit matmul, and applies the
family's own gate math (its `_apply_gate`: activation, gate/up order, gpt-oss's clamp and alpha),
so the router and everything around the experts is transformers' code, untouched.

The dense module is kept as a template (not a submodule, its parameters on the meta device): it
provides the activation and gate function, and `to_dense` rebuilds it for merging.
"""
from __future__ import annotations

import copy
import json

import torch
from torch import nn

from lowbit import kernels
from lowbit.format import Quantized4bit
from lowbit.format.codes import NESTED_BLOCKSIZE


def experts_layout(dense: nn.Module) -> dict:
    """How `dense` stores and runs its experts, or raise ValueError naming what is not supported."""
    params = {k: p for k, p in dense.named_parameters(recurse=False)}
    projs = [k for k, p in params.items() if p.dim() == 3]
    name = type(dense).__name__
    if hasattr(dense, "has_gate"):  # transformers' @use_experts_implementation classes
        if getattr(dense, "has_post_expert_norm", False):
            raise ValueError(f"{name} normalizes after each expert, which lowbit's 4-bit experts do not implement")
        api, stored_t = "routed", bool(dense.is_transposed)
    elif name == "Llama4TextExperts":  # inputs arrive pre-scaled for every expert: [E*T, H]
        api, stored_t = "prescaled", True
    else:
        raise ValueError(f"{name} is not a transformers experts module lowbit knows (3-D parameters {projs})")
    up = "gate_up_proj" if "gate_up_proj" in params else "up_proj"
    if set(projs) != {up, "down_proj"}:
        raise ValueError(f"{name} has expert parameters {projs}; expected gate_up_proj (or up_proj) and down_proj")
    biases = [f"{p}_bias" for p in projs if f"{p}_bias" in params]
    return dict(api=api, stored_transposed=stored_t, projs=projs, up=up, biases=biases,
                peft_transposed=bool(getattr(dense, "is_transposed", False)),
                shapes={p: tuple(params[p].shape) for p in projs})


class Experts4bit(nn.Module):
    lowbit_experts = True
    lowbit_casts_input = True  # computes in compute_dtype, returns the input's dtype (keep_residual_in_fp32)

    def __init__(self, dense: nn.Module, compute_dtype: torch.dtype = torch.bfloat16, blocksize: int = 64,
                 double_quant: bool = True, quant_type: str = "nf4", storage_dtype: torch.dtype = torch.uint8):
        super().__init__()
        lay = experts_layout(dense)
        object.__setattr__(self, "_template", dense)  # not a submodule: its (meta) parameters are not ours
        self.api, self.projs, self.up = lay["api"], lay["projs"], lay["up"]
        self.stored_transposed, self.storage_shapes = lay["stored_transposed"], lay["shapes"]
        self.is_transposed = lay["peft_transposed"]  # what peft sees on the dense module (sets LoRA in/out)
        self.num_experts = self.storage_shapes[self.projs[0]][0]
        self.compute_dtype, self.storage_dtype = compute_dtype, storage_dtype
        self.settings = dict(blocksize=blocksize, double_quant=double_quant, quant_type=quant_type)
        self._meta, self._lora = {}, {}
        for p in self.projs:  # placeholders until set_projection: a missing tensor stays on meta
            self.register_parameter(p, nn.Parameter(torch.empty(self.num_experts, 0, device="meta"),
                                                    requires_grad=False))
        for b in lay["biases"]:
            old = getattr(dense, b)
            self.register_parameter(b, nn.Parameter(torch.empty(old.shape, dtype=compute_dtype, device=old.device),
                                                    requires_grad=False))

    # -- layout ----------------------------------------------------------------------------
    def canonical_shape(self, p: str) -> tuple[int, int]:
        """(out, in) of one expert's matrix."""
        _, d1, d2 = self.storage_shapes[p]
        return (d2, d1) if self.stored_transposed else (d1, d2)

    def _to_canonical(self, w: torch.Tensor) -> torch.Tensor:
        return w.transpose(-1, -2) if self.stored_transposed else w

    # -- quantized state -------------------------------------------------------------------
    @torch.no_grad()
    def set_projection(self, p: str, w: torch.Tensor) -> None:
        """Quantize a fused [E, d1, d2] tensor (the dense module's layout), one expert matrix at a time."""
        if tuple(w.shape) != self.storage_shapes[p]:
            raise ValueError(f"{p}: shape {tuple(w.shape)}, the model expects {self.storage_shapes[p]}")
        s = self.settings
        qs = [kernels.quantize_4bit(self._to_canonical(w[e]).contiguous(), s["blocksize"], s["double_quant"],
                                    s["quant_type"]) for e in range(self.num_experts)]
        self._set_quants(p, qs)

    def _set_quants(self, p: str, qs: list[Quantized4bit]) -> None:
        q0 = qs[0]
        packed = torch.stack([q.codes_u8() for q in qs])
        if self.storage_dtype != torch.uint8:  # a float container FSDP can shard; the bytes are unchanged
            size = torch.empty((), dtype=self.storage_dtype).element_size()
            packed = nn.functional.pad(packed, (0, -packed.shape[1] % size)).view(self.storage_dtype)
        setattr(self, p, nn.Parameter(packed, requires_grad=False))
        self.register_buffer(f"{p}_absmax", torch.stack([q.absmax for q in qs]), persistent=False)
        dq = q0.double_quant
        self.register_buffer(f"{p}_offset", torch.stack([q.offset.reshape(()) for q in qs]) if dq else None,
                             persistent=False)
        self.register_buffer(f"{p}_nested_absmax", torch.stack([q.nested_absmax for q in qs]) if dq else None,
                             persistent=False)
        self.register_buffer("quant_map", q0.code, persistent=False)
        self.register_buffer("nested_quant_map", q0.nested_code if dq else None, persistent=False)
        self._meta[p] = dict(shape=tuple(q0.shape), dtype=q0.dtype, blocksize=q0.blocksize, quant_type=q0.quant_type,
                             nested_blocksize=q0.nested_blocksize)

    def quant(self, p: str, e: int) -> Quantized4bit:
        """Expert e's matrix of projection p, as the Quantized4bit of a bitsandbytes 4-bit Linear."""
        off = getattr(self, f"{p}_offset")
        nested = getattr(self, f"{p}_nested_absmax")
        return Quantized4bit(packed=getattr(self, p)[e].view(torch.uint8).unsqueeze(1),
                             absmax=getattr(self, f"{p}_absmax")[e], code=self.quant_map,
                             offset=None if off is None else off[e], nested_absmax=None if nested is None else nested[e],
                             nested_code=self.nested_quant_map, **self._meta[p])

    def dequantize(self, p: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        """All experts of projection p, dense, in the dense module's [E, d1, d2] layout."""
        w = torch.stack([kernels.dequantize_4bit(self.quant(p, e), dtype or self.compute_dtype)
                         for e in range(self.num_experts)])
        return self._to_canonical(w)

    def set_weight(self, p: str, w: torch.Tensor) -> None:
        """Requantize projection p from a dense [E, d1, d2] weight with this module's settings (merge/unmerge)."""
        dtype = self._meta[p]["dtype"]
        self.set_projection(p, w.float())
        self._meta[p]["dtype"] = dtype  # decode to the checkpoint's dtype, as Linear4bit.set_weight does

    def to_dense(self, dtype: torch.dtype, weights: dict[str, torch.Tensor] | None = None) -> nn.Module:
        """The transformers experts module with these (or the given) dense weights."""
        dense = self._template
        for p in self.projs:
            w = weights[p] if weights and p in weights else self.dequantize(p, torch.float32)
            dense._parameters[p] = nn.Parameter(w.to(dtype), requires_grad=False)
        for b in self.biases:
            dense._parameters[b] = nn.Parameter(getattr(self, b).detach().to(dtype), requires_grad=False)
        return dense

    @property
    def biases(self) -> list[str]:
        return [b for b in (f"{p}_bias" for p in self.projs) if b in self._parameters]

    # -- forward -----------------------------------------------------------------------------
    def _proj(self, p: str, e: int, x: torch.Tensor) -> torch.Tensor:
        bias = getattr(self, f"{p}_bias", None)
        y = kernels.matmul_4bit(x.to(self.compute_dtype), self.quant(p, e),
                                None if bias is None else bias[e].to(self.compute_dtype))
        for lhs, rhs, scale in self._lora.get(p, ()):  # y += s·x·Rᵀ·Lᵀ: LoRA on the routed experts only
            y = y + scale * ((x.to(rhs.dtype) @ rhs[e].transpose(0, 1)) @ lhs[e].transpose(0, 1)).to(y.dtype)
        return y

    def _expert(self, e: int, x: torch.Tensor) -> torch.Tensor:
        h = self._proj(self.up, e, x)
        if self.up == "up_proj":
            h = self._template.act_fn(h)
        elif self.api == "routed":
            h = self._template._apply_gate(h)
        else:
            gate, up = h.chunk(2, dim=-1)
            h = up * self._template.act_fn(gate)
        return self._proj("down_proj", e, h)

    def forward(self, hidden_states: torch.Tensor, top_k_index=None, top_k_weights=None) -> torch.Tensor:
        if self.api == "prescaled":
            return self._forward_prescaled(hidden_states)
        n_tok, k = top_k_index.shape
        flat = top_k_index.reshape(-1)
        with torch.no_grad():
            if flat.device.type == "meta":
                # memory estimation: routing has no values, so send the T·k (token, expert) pairs through one
                # expert — the same tensors autograd keeps, whatever the routing
                order, counts = torch.arange(flat.numel(), device="meta"), [flat.numel()]
            else:  # pairs grouped by expert; index num_experts is the expert-parallel "not on this rank" slot
                order = torch.argsort(flat, stable=True)
                counts = torch.bincount(flat, minlength=self.num_experts + 1).tolist()
        x = hidden_states[order // k]
        ys, start = [], 0
        for e, n in enumerate(counts[:self.num_experts]):
            if n:
                ys.append(self._expert(e, x[start:start + n]))
            start += n
        if start < flat.numel():
            ys.append(x.new_zeros(flat.numel() - start, self.canonical_shape("down_proj")[0]))
        y = torch.cat(ys) * top_k_weights.reshape(-1)[order, None]
        # back to (token, k) order and summed over k: a gather, not index_add_ (slow on busy CPU threads)
        return y[torch.argsort(order)].view(n_tok, k, -1).sum(1).to(hidden_states.dtype)

    def _forward_prescaled(self, hidden_states: torch.Tensor) -> torch.Tensor:
        # rows of experts a token is not routed to are zero and map to zero (no bias): skip them
        x = hidden_states.view(self.num_experts, -1, hidden_states.shape[-1])
        out = torch.zeros(x.shape[0], x.shape[1], self.canonical_shape("down_proj")[0], dtype=hidden_states.dtype,
                          device=hidden_states.device)
        meta = x.device.type == "meta"  # memory estimation: one routed expert per token (Llama 4), all in expert 0
        for e in range(1 if meta else self.num_experts):
            with torch.no_grad():
                rows = torch.arange(x.shape[1], device="meta") if meta else x[e].abs().amax(-1).nonzero().squeeze(-1)
            if rows.numel():
                out[e].index_copy_(0, rows, self._expert(e, x[e, rows]).to(out.dtype))
        return out.view(-1, out.shape[-1])

    def extra_repr(self) -> str:
        s = self.settings
        return (f"experts={self.num_experts}, {', '.join(f'{p}={self.canonical_shape(p)}' for p in self.projs)}, "
                f"{s['quant_type']}, blocksize={s['blocksize']}, double_quant={s['double_quant']}, "
                f"compute_dtype={self.compute_dtype}")

    # -- state dict: per projection, the bitsandbytes keys with a leading expert axis -----------
    def _save_to_state_dict(self, destination, prefix, keep_vars):
        for p in self.projs:
            if p not in self._meta:
                continue
            key = prefix + p
            off = getattr(self, f"{p}_offset")
            sd = {key: getattr(self, p), f"{key}.absmax": getattr(self, f"{p}_absmax"), f"{key}.quant_map": self.quant_map}
            if off is not None:
                sd.update({f"{key}.nested_absmax": getattr(self, f"{p}_nested_absmax"), f"{key}.nested_offset": off,
                           f"{key}.nested_quant_map": self.nested_quant_map})
            m = self._meta[p]
            blob = json.dumps({"quant_type": m["quant_type"], "blocksize": m["blocksize"], "layout": "experts",
                               "dtype": str(m["dtype"]).removeprefix("torch."),
                               "shape": [self.num_experts, *m["shape"]], "nested_blocksize": m["nested_blocksize"]})
            sd[f"{key}.quant_state.bitsandbytes__{m['quant_type']}"] = torch.tensor(list(blob.encode()), dtype=torch.uint8)
            destination.update({k: v if keep_vars else v.detach() for k, v in sd.items()})
        for b in self.biases:
            destination[prefix + b] = getattr(self, b) if keep_vars else getattr(self, b).detach()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        for p in self.projs:
            key = prefix + p
            qs_key = next((k for k in state_dict if k.startswith(f"{key}.quant_state.bitsandbytes__")), None)
            if key not in state_dict or qs_key is None:
                missing_keys.append(key)
                continue
            meta = json.loads(bytes(state_dict[qs_key].tolist()).decode())
            n_exp, out_f, in_f = meta["shape"]
            if (n_exp, out_f, in_f) != (self.num_experts, *self.canonical_shape(p)):
                error_msgs.append(f"{key}: shape {meta['shape']} != {[self.num_experts, *self.canonical_shape(p)]}")
                continue
            get = lambda s: state_dict.get(f"{key}.{s}")  # noqa: E731
            nested = get("nested_absmax")
            dtype = getattr(torch, meta["dtype"])
            qs = [Quantized4bit(packed=state_dict[key][e].reshape(-1).view(torch.uint8).unsqueeze(1),
                                absmax=get("absmax")[e], shape=(out_f, in_f), dtype=dtype, blocksize=meta["blocksize"],
                                quant_type=meta["quant_type"], code=get("quant_map"),
                                offset=None if nested is None else get("nested_offset")[e],
                                nested_absmax=None if nested is None else nested[e],
                                nested_code=get("nested_quant_map"),
                                nested_blocksize=int(meta.get("nested_blocksize", NESTED_BLOCKSIZE)))
                  for e in range(n_exp)]
            self._set_quants(p, qs)
        for b in self.biases:
            if prefix + b in state_dict:
                getattr(self, b).data = state_dict[prefix + b].to(self.compute_dtype)
            else:
                missing_keys.append(prefix + b)


def quantize_experts(dense: nn.Module, compute_dtype: torch.dtype = torch.bfloat16, **kw) -> Experts4bit:
    """An in-memory dense experts module → `Experts4bit` (weights quantized, biases copied)."""
    new = Experts4bit(dense, compute_dtype, **kw)
    for p in new.projs:
        new.set_projection(p, getattr(dense, p).detach())
    for b in new.biases:
        getattr(new, b).data = getattr(dense, b).detach().to(compute_dtype)
    object.__setattr__(new, "_template", _meta_copy(dense))
    return new


def _meta_copy(dense: nn.Module) -> nn.Module:
    """The dense module without its memory: same class, config and activation, parameters on meta."""
    t = copy.copy(dense)
    t._parameters = {k: nn.Parameter(torch.empty(v.shape, dtype=v.dtype, device="meta"), requires_grad=False)
                     for k, v in dense._parameters.items()}
    t._buffers, t._modules = dict(dense._buffers), dict(dense._modules)
    return t


__all__ = ["Experts4bit", "experts_layout", "quantize_experts"]
