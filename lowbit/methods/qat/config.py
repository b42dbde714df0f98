"""QAT configuration: one dataclass per fake quantizer, one `QATConfig` for where they go.

The same `QATConfig` drives `prepare` (fake quant for training) and `convert` (real codes),
so the two can never disagree. Presets are named as the literature names them.
"""
from __future__ import annotations

import difflib
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, get_args

from lowbit import config as engine
from lowbit.config import option
from lowbit.errors import ConfigError
from lowbit.utils.io import read_yaml

Dtype = Literal["int", "fp8_e4m3", "fp8_e5m2", "fp4_e2m1", "nf4", "gguf"]
Granularity = Literal["per_tensor", "per_channel", "per_group", "per_token"]
Range = Literal["minmax", "learned", "learned_clip"]
KvPosition = Literal["pre_rope", "post_rope"]
RotationKind = Literal["none", "hadamard"]
DTYPES, GRANULARITIES, RANGES, KV_POSITIONS = (get_args(t) for t in (Dtype, Granularity, Range, KvPosition))
# ggml tensor types a gguf fake quantizer can round to (llama-quantize's fallbacks included)
GGML_TYPES = ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "F16", "BF16", "F32")
# llama-quantize file types a QAT run can target (the mix of tensor types is llama.cpp's)
GGUF_FILE_TYPES = ("Q4_K_M", "Q4_K_S", "Q5_K_M", "Q6_K", "Q8_0", "Q4_0")


@dataclass
class QuantizerConfig:
    """One fake quantizer. `bits` applies to dtype=int (2..8); the float formats fix their own."""
    dtype: Dtype = option("int", help="number format")
    bits: int = option(4, help="dtype=int: bits per value (2..8)")
    symmetric: bool = option(True, help="symmetric range (no zero point)")
    granularity: Granularity = option("per_channel", help="one range per tensor / output channel / group / token")
    group_size: int = option(128, help="values per group (granularity: per_group; nf4: the blocksize)")
    range: Range = option("minmax", help="minmax: from the tensor (LLM-QAT); learned: LSQ scale with its gradient; "
                          "learned_clip (weights, int): a learned per-row fraction of the row's range (OmniQuant)")
    dynamic: bool = option(True, help="activations: ranges per batch; false = static ranges from calibrate")
    double_quant: bool = option(True, help="nf4 only: bitsandbytes' double-quant format")
    enabled: bool = option(True, help="false: this quantizer is the identity")
    start_step: int = option(0, help="fake quant only from this optimizer step on (identity before)", ge=0)
    ggml_type: str = option("", help="gguf only: one ggml type for every layer (Q4_K, Q5_0, ...); '' = per tensor "
                            "from qat.gguf_file_type")

    def validate(self, where: str = "qat.weight") -> None:
        role = where.rsplit(".", 1)[-1]
        if self.dtype not in DTYPES:
            raise ConfigError(f"{where}.dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if self.granularity not in GRANULARITIES:
            raise ConfigError(f"{where}.granularity must be one of {', '.join(GRANULARITIES)}, got {self.granularity!r}")
        if self.range not in RANGES:
            raise ConfigError(f"{where}.range must be one of {', '.join(RANGES)}, got {self.range!r}")
        if self.dtype == "int" and not 2 <= self.bits <= 8:
            raise ConfigError(f"{where}.bits must be in 2..8 for dtype int, got {self.bits}")
        if self.dtype != "int" and not self.symmetric:
            raise ConfigError(f"{where}: {self.dtype} is a symmetric format; set symmetric: true")
        if self.range == "learned" and not self.symmetric:
            raise ConfigError(f"{where}: learned ranges are symmetric scales (LSQ); set symmetric: true or "
                              "range: minmax")
        if self.range == "learned_clip" and (role != "weight" or self.dtype != "int"):
            raise ConfigError(f"{where}: learned_clip clips integer weight ranges; use it on qat.weight with dtype "
                              "int, or range: learned / minmax")
        if self.granularity == "per_group" and self.group_size < 2:
            raise ConfigError(f"{where}.group_size must be >= 2, got {self.group_size}")
        if self.start_step < 0:
            raise ConfigError(f"{where}.start_step must be >= 0, got {self.start_step}")
        weight = role == "weight"
        if weight and self.granularity == "per_token":
            raise ConfigError(f"{where}: per_token is an activation granularity; weights use per_tensor, "
                              "per_channel or per_group")
        if not weight and self.granularity == "per_channel":
            raise ConfigError(f"{where}: per_channel is a weight granularity; activations use per_token, "
                              "per_tensor or per_group")
        if self.dtype == "nf4":
            if not weight:
                raise ConfigError(f"{where}: nf4 is a weight format; use int or fp8 for activations and KV")
            if self.granularity != "per_group" or self.range != "minmax":
                raise ConfigError(f"{where}: nf4 is bitsandbytes' blockwise absmax format; set granularity: "
                                  "per_group (group_size = blocksize) and range: minmax")
        if self.dtype == "gguf":
            if not weight:
                raise ConfigError(f"{where}: gguf is a weight format (llama.cpp block quants); activations and KV use "
                                  "int or fp8")
            if self.range != "minmax":
                raise ConfigError(f"{where}: gguf rounds exactly as llama-quantize does (its own scale search); set "
                                  "range: minmax")
            if self.ggml_type and self.ggml_type.upper() not in GGML_TYPES:
                raise ConfigError(f"{where}.ggml_type must be one of {', '.join(GGML_TYPES)}, got {self.ggml_type!r}")
        elif self.ggml_type:
            raise ConfigError(f"{where}.ggml_type applies to dtype: gguf only (got dtype {self.dtype})")
        if not weight and self.range == "learned" and self.granularity != "per_tensor":
            raise ConfigError(f"{where}: a learned activation range is one scale per tensor; set granularity: "
                              "per_tensor or range: minmax")
        if not weight and not self.dynamic and self.granularity != "per_tensor":
            raise ConfigError(f"{where}: static (calibrated) activation ranges are per_tensor; set dynamic: true "
                              "for per-token ranges")


@dataclass
class QATConfig:
    """Where fake quantizers go: weights, activations (linear inputs), keys and values."""
    weight: QuantizerConfig | None = option(None, help="every targeted linear's weight")
    activation: QuantizerConfig | None = option(None, help="every targeted linear's input (per-token by default)")
    kv: QuantizerConfig | None = option(None, help="keys and values")
    kv_position: KvPosition = option("post_rope", help="post_rope: what serving engines cache; pre_rope: LLM-QAT")
    exclude: list[str] = option(default_factory=lambda: ["lm_head", "embed_tokens"], help="modules left unquantized")
    name: str = option("", help="the preset's name, recorded in saved models")
    rotation: RotationKind = option("none", help="hadamard: online randomized Hadamard on every quantized linear's "
                                    "input (weight quantized as W·Rᵀ) and on post-RoPE queries/keys/values")
    gguf_file_type: str = option("", help="weight dtype gguf: the llama-quantize file type (Q4_K_M, Q4_0, ...) whose "
                                 "per-tensor types the layers train for, the frozen embedding / output included")

    def validate(self, where: str = "qat") -> None:
        if self.weight is None and self.activation is None and self.kv is None:
            raise ConfigError("the QAT config quantizes nothing: set at least one of weight, activation, kv")
        gguf = self.weight is not None and self.weight.dtype == "gguf"
        if self.gguf_file_type and self.gguf_file_type.upper() not in GGUF_FILE_TYPES:
            raise ConfigError(f"{where}.gguf_file_type must be one of {', '.join(GGUF_FILE_TYPES)}, "
                              f"got {self.gguf_file_type!r}")
        if self.gguf_file_type and not gguf:
            raise ConfigError(f"{where}.gguf_file_type needs {where}.weight.dtype: gguf (or a gguf-* preset)")
        if gguf and not (self.gguf_file_type or self.weight.ggml_type):
            raise ConfigError(f"{where}.weight.dtype gguf needs {where}.gguf_file_type (e.g. Q4_K_M) or "
                              f"{where}.weight.ggml_type (e.g. Q4_K)")
        if self.kv_position not in KV_POSITIONS:
            raise ConfigError(f"{where}.kv_position must be one of {', '.join(KV_POSITIONS)}, "
                              f"got {self.kv_position!r}")
        if self.rotation not in get_args(RotationKind):
            raise ConfigError(f"{where}.rotation must be one of {', '.join(get_args(RotationKind))}, got {self.rotation!r}")
        if self.rotation != "none" and self.weight is not None and self.weight.dtype not in ("int", "fp8_e4m3",
                                                                                            "fp8_e5m2", "fp4_e2m1"):
            raise ConfigError(f"{where}: rotation folds Rᵀ into the quantized weight codes, which {self.weight.dtype} "
                              "layouts do not hold; use an int/fp weight format or rotation: none")

    def check(self) -> "QATConfig":
        """Validate every quantizer and the whole (a QATConfig built in Python skips the YAML parser)."""
        return engine.validate(self, "qat")

    def to_dict(self) -> dict:
        return engine.to_dict(self)


def _int(bits, sym, gran, **kw):
    return QuantizerConfig(dtype="int", bits=bits, symmetric=sym, granularity=gran, **kw)


# weights symmetric per-channel MinMax, activations and KV per-token as in LLM-QAT (Liu et al. 2023);
# activations asymmetric like torchao's 8da4w; g128 weight-only asymmetric like GPTQ/AWQ checkpoints.
PRESETS = {
    "w4a8kv4": lambda: QATConfig(weight=_int(4, True, "per_channel"), activation=_int(8, False, "per_token"),
                                 kv=_int(4, False, "per_token")),
    "w4a8kv8": lambda: QATConfig(weight=_int(4, True, "per_channel"), activation=_int(8, False, "per_token"),
                                 kv=_int(8, False, "per_token")),
    "w4a16-g128": lambda: QATConfig(weight=_int(4, False, "per_group", group_size=128)),
    "w8a8": lambda: QATConfig(weight=_int(8, True, "per_channel"), activation=_int(8, True, "per_token")),
    "fp4-e2m1": lambda: QATConfig(weight=QuantizerConfig(dtype="fp4_e2m1", granularity="per_group", group_size=32)),
    "nf4": lambda: QATConfig(weight=QuantizerConfig(dtype="nf4", granularity="per_group", group_size=64)),
    # QuaRot-style online Hadamard rotations (rotate.py); -clip: OmniQuant's learned weight clipping (clip.py)
    "w4a8kv8-rot": lambda: _rotated("w4a8kv8", "minmax"),
    "w4a8kv8-rot-clip": lambda: _rotated("w4a8kv8", "learned_clip"),
    "w4a8kv4-rot-clip": lambda: _rotated("w4a8kv4", "learned_clip"),
    # llama.cpp GGUF file types: every layer rounds as llama-quantize would write its tensor (per-tensor mix,
    # fallbacks for rows that do not split into 256); the frozen token embedding / output as the file holds them
    **{f"gguf-{t.lower()}": (lambda t=t: QATConfig(weight=QuantizerConfig(dtype="gguf", granularity="per_group",
                                                                          group_size=32), gguf_file_type=t))
       for t in GGUF_FILE_TYPES},
}


def _rotated(base: str, weight_range: str) -> QATConfig:
    cfg = PRESETS[base]()
    cfg.rotation, cfg.weight.range = "hadamard", weight_range
    return cfg


def from_dict(tree: dict, where: str = "qat") -> QATConfig:
    tree = dict(tree or {})
    preset = tree.pop("preset", None)
    if preset is None and tree.get("gguf_file_type") and tree.get("weight") is None:  # `qat: {gguf_file_type: T}`
        tree["weight"] = {"dtype": "gguf", "granularity": "per_group", "group_size": 32}
    if preset is not None:
        base = preset_config(preset).to_dict()
        for k, v in tree.items():  # a preset + per-role overrides: merge one level deep
            base[k] = {**base[k], **v} if isinstance(v, dict) and isinstance(base.get(k), dict) else v
        tree = base
    return engine.build(QATConfig, tree, where).check()


def preset_config(name: str) -> QATConfig:
    if name not in PRESETS:
        close = difflib.get_close_matches(name, list(PRESETS), n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ConfigError(f"unknown QAT preset {name!r}{hint} Presets: {', '.join(PRESETS)}")
    cfg = PRESETS[name]()
    cfg.name = name
    return cfg.check()


def resolve(config) -> QATConfig:
    """A preset name, a YAML path (a file with a `qat:` section or the section itself), a dict or a QATConfig."""
    if isinstance(config, QATConfig):
        return config.check()
    if isinstance(config, dict):
        return from_dict(config)
    if isinstance(config, (str, Path)):
        s = str(config)
        if s in PRESETS:
            return preset_config(s)
        if s.endswith((".yaml", ".yml")) or Path(s).exists():
            tree = read_yaml(s, "QAT config file")
            tree = tree.get("qat", tree) if isinstance(tree, dict) else tree
            return from_dict(tree)
        return preset_config(s)
    raise ConfigError(f"QAT config must be a preset name, a YAML path, a dict or a QATConfig, got {type(config)}")
