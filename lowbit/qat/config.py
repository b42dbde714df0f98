"""QAT configuration: one dataclass per fake quantizer, one `QATConfig` for where they go.

The same `QATConfig` drives `prepare` (fake quant for training) and `convert` (real codes),
so the two can never disagree. Presets are named as the literature names them.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import ConfigError

DTYPES = ("int", "fp8_e4m3", "fp8_e5m2", "fp4_e2m1", "nf4")
GRANULARITIES = ("per_tensor", "per_channel", "per_group", "per_token")
RANGES = ("minmax", "learned")
KV_POSITIONS = ("pre_rope", "post_rope")


@dataclass
class QuantizerConfig:
    """One fake quantizer. `bits` applies to dtype=int (2..8); the float formats fix their own."""
    dtype: str = "int"
    bits: int = 4
    symmetric: bool = True
    granularity: str = "per_channel"
    group_size: int = 128
    range: str = "minmax"       # minmax: from the tensor (LLM-QAT); learned: LSQ scale with its gradient
    dynamic: bool = True        # activations: ranges per batch; False = static ranges from `calibrate`
    double_quant: bool = True   # nf4 only: bitsandbytes' double-quant format (blocksize = group_size)
    enabled: bool = True
    start_step: int = 0         # fake quant only from this optimizer step on (identity before)

    def check(self, role: str) -> None:
        where = f"qat.{role}"
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
        if not weight and self.range == "learned" and self.granularity != "per_tensor":
            raise ConfigError(f"{where}: a learned activation range is one scale per tensor; set granularity: "
                              "per_tensor or range: minmax")
        if not weight and not self.dynamic and self.granularity != "per_tensor":
            raise ConfigError(f"{where}: static (calibrated) activation ranges are per_tensor; set dynamic: true "
                              "for per-token ranges")


@dataclass
class QATConfig:
    weight: QuantizerConfig | None = None       # every targeted linear's weight
    activation: QuantizerConfig | None = None   # every targeted linear's input (per-token by default)
    kv: QuantizerConfig | None = None           # keys and values
    kv_position: str = "post_rope"              # post_rope: what serving engines cache; pre_rope: LLM-QAT
    exclude: list[str] = field(default_factory=lambda: ["lm_head", "embed_tokens"])
    name: str = ""

    def check(self) -> "QATConfig":
        if self.weight is None and self.activation is None and self.kv is None:
            raise ConfigError("the QAT config quantizes nothing: set at least one of weight, activation, kv")
        for role in ("weight", "activation", "kv"):
            q = getattr(self, role)
            if q is not None:
                q.check(role)
        if self.kv_position not in KV_POSITIONS:
            raise ConfigError(f"qat.kv_position must be one of {', '.join(KV_POSITIONS)}, got {self.kv_position!r}")
        return self

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


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
}


def from_dict(tree: dict, where: str = "qat") -> QATConfig:
    from ..train.config import _build
    tree = dict(tree or {})
    preset = tree.pop("preset", None)
    if preset is not None:
        base = preset_config(preset).to_dict()
        for k, v in tree.items():  # a preset + per-role overrides: merge one level deep
            base[k] = {**base[k], **v} if isinstance(v, dict) and isinstance(base.get(k), dict) else v
        tree = base
    cfg = _build(QATConfig, tree, where)
    return cfg.check()


def preset_config(name: str) -> QATConfig:
    if name not in PRESETS:
        import difflib
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
            from ..utils.io import read_yaml
            tree = read_yaml(s, "QAT config file")
            tree = tree.get("qat", tree) if isinstance(tree, dict) else tree
            return from_dict(tree)
        return preset_config(s)
    raise ConfigError(f"QAT config must be a preset name, a YAML path, a dict or a QATConfig, got {type(config)}")
