"""`lowbit generate` configuration: YAML sections teacher / generate / output → dataclasses.

Loaded with the same strict key checking and `key=value` overrides as the training config
(`lowbit.train.config`): unknown keys fail naming the closest valid key.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import ConfigError
from ..train.config import _build, read_tree


@dataclass
class TeacherConfig:
    path: str = ""
    tokenizer: str | None = None
    dtype: str = "auto"                # auto = bf16 where it is fast (GPU, AVX512-BF16/AMX CPU), else fp32
    device: str = "auto"               # auto (cuda if available) | cpu | cuda | cuda:N
    trust_remote_code: bool = False


@dataclass
class SamplingConfig:
    num_sequences: int = 1024
    batch_size: int = 16
    max_len: int = 256                 # tokens per sequence, first token included (BOS not counted)
    first_token: str = "uniform"       # uniform | every_id
    greedy_min: int = 3                # the first n tokens after the first one are argmax, n drawn per
    greedy_max: int = 5                # sequence uniformly from [greedy_min, greedy_max] (LLM-QAT: 3-5)
    temperature: float = 1.0
    top_k: int = 0                     # 0 = off
    top_p: float = 1.0                 # 1.0 = off
    stop_at_eos: bool = True
    add_bos: bool = True               # condition on BOS (if the tokenizer has one); it is not stored
    seed: int = 0


@dataclass
class OutputConfig:
    dir: str = "outputs/llm_qat/data"
    shard_size: int = 256              # sequences per shard (a multiple of generate.batch_size)
    topk_logits: int = 0               # store the teacher's top-k logits per position (0 = off)
    repair: bool = False               # regenerate shards whose checksum no longer matches
    progress: bool = True


@dataclass
class GenerateConfig:
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    generate: SamplingConfig = field(default_factory=SamplingConfig)
    output: OutputConfig = field(default_factory=OutputConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


CHOICES = {"teacher.dtype": ("auto", "bfloat16", "float16", "float32"), "generate.first_token": ("uniform", "every_id")}


def load_generate_config(path: str | Path | None, overrides: list[str] = ()) -> GenerateConfig:
    cfg = _build(GenerateConfig, read_tree(path, overrides), "")
    check(cfg)
    return cfg


def check(cfg: GenerateConfig) -> None:
    """Value checks run before the teacher is loaded."""
    for key, allowed in CHOICES.items():
        section, name = key.split(".")
        value = getattr(getattr(cfg, section), name)
        if value not in allowed:
            raise ConfigError(f"config key '{key}' must be one of {', '.join(allowed)}, got {value!r}")
    g, o = cfg.generate, cfg.output
    if not cfg.teacher.path:
        raise ConfigError("teacher.path is empty: give the folder of the full-precision teacher (HF safetensors)")
    if g.num_sequences < 1 or g.batch_size < 1:
        raise ConfigError("generate.num_sequences and generate.batch_size must be >= 1")
    if g.max_len < 2:
        raise ConfigError(f"generate.max_len must be >= 2 (first token + one generated), got {g.max_len}")
    if not 0 <= g.greedy_min <= g.greedy_max:
        raise ConfigError(f"need 0 <= generate.greedy_min <= generate.greedy_max, got {g.greedy_min}, {g.greedy_max}")
    if g.temperature <= 0:
        raise ConfigError(f"generate.temperature must be > 0 (use greedy_min/greedy_max for argmax), "
                          f"got {g.temperature}")
    if g.top_k < 0:
        raise ConfigError(f"generate.top_k must be >= 0 (0 = off), got {g.top_k}")
    if not 0 < g.top_p <= 1:
        raise ConfigError(f"generate.top_p must be in (0, 1], got {g.top_p}")
    if o.shard_size < 1 or o.shard_size % g.batch_size:
        # batches never straddle shards, so a resumed run forms exactly the batches of an uninterrupted one
        raise ConfigError(f"output.shard_size ({o.shard_size}) must be a positive multiple of generate.batch_size "
                          f"({g.batch_size})")
    if o.topk_logits < 0:
        raise ConfigError(f"output.topk_logits must be >= 0 (0 = off), got {o.topk_logits}")
