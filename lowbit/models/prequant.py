"""Loading a pre-quantized bitsandbytes 4-bit checkpoint (`lowbit export --format bnb4`, or transformers'
save_pretrained of a BitsAndBytesConfig model) into the 4-bit base.

Its 4-bit Linear layers are adopted byte for byte (no requantization). MoE experts, which
transformers' bitsandbytes integration stores dense (fused 3-D tensors), are quantized on load as
for a dense checkpoint. Llama 4's experts, which transformers splits into one 4-bit MLP per expert,
are decoded (exactly what bitsandbytes computes) and re-fused into lowbit's per-expert layout.
"""
from __future__ import annotations

import re
from collections import defaultdict

import torch

from lowbit import kernels
from lowbit.errors import UnsupportedModelError
from lowbit.format import Quantized4bit

_STATE = re.compile(r"^(.*)\.weight(\.(?:absmax|quant_map|nested_absmax|nested_quant_map|quant_state\..+))?$")
_SPLIT_EXPERT = re.compile(r"^(.*\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)$")


def quantization_settings(cfg) -> dict | None:
    """The checkpoint's bitsandbytes 4-bit settings, or None for a dense checkpoint; other methods are refused."""
    qc = getattr(cfg, "quantization_config", None)
    if not qc:
        return None
    qc = qc if isinstance(qc, dict) else qc.to_dict()
    if qc.get("quant_method") != "bitsandbytes" or not qc.get("load_in_4bit"):
        raise UnsupportedModelError(f"pre-quantized {qc.get('quant_method')!r} checkpoints (8-bit, GPTQ, AWQ, ...) are "
                                    "not supported; load the dense checkpoint, lowbit quantizes it on load")
    return dict(quant_type=qc.get("bnb_4bit_quant_type", "nf4"),
                double_quant=bool(qc.get("bnb_4bit_use_double_quant", False)))


class PrequantizedBnb:
    """Groups each 4-bit Linear's tensors (weight + quant state) and yields its `Quantized4bit` once complete."""

    def __init__(self, names: list[str], rename, experts: dict[str, dict]):
        self.rename, self.experts = rename, experts
        self.members: dict[str, int] = defaultdict(int)
        for n in names:
            m = _STATE.match(n)
            if m and m.group(2) and m.group(2).startswith(".quant_state."):
                self.members[m.group(1)] = 0
        for n in names:
            m = _STATE.match(n)
            if m and m.group(1) in self.members:
                self.members[m.group(1)] += 1
        self.pending: dict[str, dict] = defaultdict(dict)
        self.split: dict[str, dict] = defaultdict(dict)  # Llama 4 per-expert MLPs → fused experts

    def claims(self, key: str) -> bool:
        m = _STATE.match(key)
        return bool(m and m.group(1) in self.members)

    def feed(self, key: str, tensor: torch.Tensor) -> list[tuple[str, object]]:
        """[(model module name, Quantized4bit)] for a completed Linear, or [(experts name, {proj: fused tensor})]."""
        mod = _STATE.match(key).group(1)
        parts = self.pending[mod]
        parts["weight" + (key[len(mod) + len(".weight"):])] = tensor
        if len(parts) < self.members[mod]:
            return []
        q = Quantized4bit.from_state_dict(self.pending.pop(mod), "weight")
        target = self.rename(f"{mod}.weight").removesuffix(".weight")
        split = _SPLIT_EXPERT.match(target)
        if split and split.group(1) in self.experts:
            return self._split_expert(split.group(1), int(split.group(2)), split.group(3), q)
        return [(target, q)]

    def _split_expert(self, experts: str, e: int, proj: str, q: Quantized4bit) -> list:
        lay = self.experts[experts]
        got = self.split[experts]
        got[(e, proj)] = kernels.dequantize_4bit(q, torch.float32)
        n_exp = lay["shapes"]["down_proj"][0]
        if len(got) < 3 * n_exp:
            return []
        got = self.split.pop(experts)
        # transformers' per-expert MLP: gate/up [I, H], down [H, I]; the fused module holds x @ W ([E, H, 2I])
        gate_up = torch.stack([torch.cat([got[(i, "gate_proj")], got[(i, "up_proj")]]) for i in range(n_exp)])
        down = torch.stack([got[(i, "down_proj")] for i in range(n_exp)])
        if lay["stored_transposed"]:
            gate_up, down = gate_up.transpose(1, 2), down.transpose(1, 2)
        return [(experts, {lay["up"]: gate_up.contiguous(), "down_proj": down.contiguous()})]

    def unfinished(self) -> list[str]:
        return sorted([*self.pending, *self.split])
