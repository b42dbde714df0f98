"""`Quantized4bit`: one NF4/FP4 weight with optional double-quantized absmax.

The fields are exactly bitsandbytes' QuantState, so `state_dict(prefix)` writes the keys
transformers writes for a bitsandbytes 4-bit Linear, byte for byte, and
`from_state_dict` reads them back.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, replace

import torch

from lowbit.format.blockwise import (
    check_blocksize,
    check_quant_type,
    check_weight_dtype,
    dequantize_4bit_values,
    dequantize_blockwise_8bit,
    quantize_4bit_packed,
    quantize_blockwise_8bit,
)
from lowbit.format.codes import NESTED_BLOCKSIZE, code_4bit, dynamic_map

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
SUFFIXES = ("absmax", "quant_map", "nested_absmax", "nested_quant_map")


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


@dataclass
class Quantized4bit:
    """Packed 4-bit codes + the state needed to decode them.

    packed: (ceil(n/2), 1) tensor; uint8, or any storage dtype viewing the same bytes
            (a float container lets FSDP / ZeRO-3 shard it like a normal parameter).
    absmax: fp32 per block, or uint8 codes of (absmax - offset) when double-quantized.
    """

    packed: torch.Tensor
    absmax: torch.Tensor
    shape: tuple[int, ...]
    dtype: torch.dtype
    blocksize: int = 64
    quant_type: str = "nf4"
    code: torch.Tensor | None = None
    offset: torch.Tensor | None = None          # fp32 scalar, double quant only
    nested_absmax: torch.Tensor | None = None   # fp32 per 256 absmax values
    nested_code: torch.Tensor | None = None     # the 8-bit dynamic map
    nested_blocksize: int = NESTED_BLOCKSIZE

    @property
    def double_quant(self) -> bool:
        return self.nested_absmax is not None

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def device(self) -> torch.device:
        return self.packed.device

    def codes_u8(self) -> torch.Tensor:
        """The packed bytes as a flat uint8 view, whatever the storage dtype."""
        return self.packed.reshape(-1).view(torch.uint8)

    def absmax_fp32(self) -> torch.Tensor:
        """Decoded per-block absmax (fp32): nested decode + offset when double-quantized."""
        if not self.double_quant:
            return self.absmax.float()
        am = dequantize_blockwise_8bit(self.absmax, self.nested_absmax, self.nested_blocksize, self.nested_code)
        return am + self.offset

    def bits_per_param(self) -> float:
        total = self.codes_u8().numel() * 8 + self.absmax.numel() * self.absmax.element_size() * 8
        if self.double_quant:
            total += self.nested_absmax.numel() * 32 + 32
        return total / self.numel

    def to(self, device) -> "Quantized4bit":
        mv = lambda t: None if t is None else t.to(device)  # noqa: E731
        return replace(self, packed=mv(self.packed), absmax=mv(self.absmax), code=mv(self.code), offset=mv(self.offset),
                       nested_absmax=mv(self.nested_absmax), nested_code=mv(self.nested_code))

    def with_storage(self, storage_dtype: torch.dtype) -> "Quantized4bit":
        """Same bytes, viewed as another container dtype (uint8, bfloat16, float32...)."""
        u8 = self.codes_u8()
        size = torch.empty((), dtype=storage_dtype).element_size()
        if u8.numel() % size:  # pad to whole container elements; dequantize reads only the first n codes
            u8 = torch.nn.functional.pad(u8, (0, size - u8.numel() % size))
        return replace(self, packed=u8.view(storage_dtype).unsqueeze(1))

    # --- serialization: the transformers / bitsandbytes state-dict layout -------------
    def _meta(self) -> dict:
        meta = {"quant_type": self.quant_type, "blocksize": self.blocksize, "dtype": _dtype_name(self.dtype),
                "shape": list(self.shape)}
        if self.double_quant:
            meta.update({"nested_blocksize": self.nested_blocksize, "nested_dtype": "float32",
                         "nested_offset": self.offset.item()})
        return meta

    def state_dict(self, prefix: str = "weight") -> dict[str, torch.Tensor]:
        """`{prefix: packed, prefix.absmax, prefix.quant_map, [prefix.nested_*],
        prefix.quant_state.bitsandbytes__<type>}` — what transformers saves for a 4-bit Linear."""
        sd = {prefix: self.packed, f"{prefix}.absmax": self.absmax,
              f"{prefix}.quant_map": code_4bit(self.quant_type, self.device) if self.code is None else self.code}
        if self.double_quant:
            sd[f"{prefix}.nested_absmax"] = self.nested_absmax
            sd[f"{prefix}.nested_quant_map"] = self.nested_code.clone()
        blob = json.dumps(self._meta()).encode("utf-8")
        sd[f"{prefix}.quant_state.bitsandbytes__{self.quant_type}"] = torch.tensor(list(blob), dtype=torch.uint8)
        return sd

    @classmethod
    def from_state_dict(cls, sd: dict[str, torch.Tensor], prefix: str = "weight") -> "Quantized4bit":
        qs_keys = [k for k in sd if k.startswith(f"{prefix}.quant_state.bitsandbytes__")]
        if len(qs_keys) != 1:
            raise KeyError(f"expected one '{prefix}.quant_state.bitsandbytes__<nf4|fp4>' entry, found {qs_keys or 'none'}")
        meta = json.loads(bytes(sd[qs_keys[0]].tolist()).decode("utf-8"))
        check_blocksize(int(meta["blocksize"]))
        check_quant_type(meta["quant_type"])
        nested = f"{prefix}.nested_absmax" in sd
        return cls(packed=sd[prefix], absmax=sd[f"{prefix}.absmax"], shape=tuple(meta["shape"]),
                   dtype=_DTYPES[meta["dtype"]], blocksize=int(meta["blocksize"]), quant_type=meta["quant_type"],
                   code=sd.get(f"{prefix}.quant_map"),
                   offset=torch.tensor(float(meta["nested_offset"])) if nested else None,
                   nested_absmax=sd.get(f"{prefix}.nested_absmax"), nested_code=sd.get(f"{prefix}.nested_quant_map"),
                   nested_blocksize=int(meta.get("nested_blocksize", NESTED_BLOCKSIZE)))

    # --- bridges to bitsandbytes' own objects (lazy import) ----------------------------
    def to_bnb_quant_state(self):
        from bitsandbytes.functional import QuantState
        state2 = None
        if self.double_quant:
            state2 = QuantState(absmax=self.nested_absmax, code=self.nested_code, blocksize=self.nested_blocksize,
                                dtype=torch.float32)
        code = code_4bit(self.quant_type, self.device) if self.code is None else self.code
        return QuantState(absmax=self.absmax, shape=torch.Size(self.shape), code=code, blocksize=self.blocksize,
                          quant_type=self.quant_type, dtype=self.dtype, offset=self.offset, state2=state2)

    @classmethod
    def from_bnb(cls, packed: torch.Tensor, qs) -> "Quantized4bit":
        """Adopt a bitsandbytes (packed weight, QuantState) pair without requantizing."""
        nested = qs.state2 is not None
        offset = None
        if nested:
            offset = qs.offset if torch.is_tensor(qs.offset) else torch.tensor(float(qs.offset))
            offset = offset.float().reshape(())
        return cls(packed=packed, absmax=qs.absmax, shape=tuple(qs.shape), dtype=qs.dtype, blocksize=qs.blocksize,
                   quant_type=qs.quant_type, code=qs.code, offset=offset,
                   nested_absmax=qs.state2.absmax if nested else None, nested_code=qs.state2.code if nested else None,
                   nested_blocksize=qs.state2.blocksize if nested else NESTED_BLOCKSIZE)


def quantize(w: torch.Tensor, blocksize: int = 64, double_quant: bool = True, quant_type: str = "nf4",
             storage_dtype: torch.dtype = torch.uint8) -> Quantized4bit:
    """Quantize a fp32/bf16/fp16 tensor of any shape to NF4/FP4 (bitsandbytes-identical bytes)."""
    check_weight_dtype(w)
    packed, absmax = quantize_4bit_packed(w, blocksize, quant_type)
    q = Quantized4bit(packed=packed, absmax=absmax, shape=tuple(w.shape), dtype=w.dtype, blocksize=blocksize,
                      quant_type=quant_type, code=code_4bit(quant_type, w.device))
    if double_quant:
        q = double_quantize(q)
    return q.with_storage(storage_dtype) if storage_dtype != torch.uint8 else q


def double_quantize(q: Quantized4bit) -> Quantized4bit:
    """absmax → uint8 (dynamic map, blocksize 256) of absmax - mean, + fp32 nested absmax."""
    if q.double_quant:
        return q
    offset = q.absmax.mean()
    qabs, nested_absmax = quantize_blockwise_8bit(q.absmax - offset, NESTED_BLOCKSIZE)
    return replace(q, absmax=qabs, offset=offset, nested_absmax=nested_absmax,
                   nested_code=dynamic_map(q.device).clone(), nested_blocksize=NESTED_BLOCKSIZE)


def dequantize_reference(q: Quantized4bit, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Pure-torch dequantize (the reference every kernel backend is tested against)."""
    return dequantize_4bit_values(q.codes_u8(), q.absmax_fp32(), q.shape, dtype or q.dtype, q.blocksize, q.quant_type)
