"""`lowbit generate` configuration: YAML sections teacher / generate / output.

Parsed by `lowbit.config`, the engine training configs use: unknown keys name the closest valid
key, choices and bounds are checked on build; `lowbit config show` prints it with this help.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from lowbit import config as engine
from lowbit.config import option
from lowbit.errors import ConfigError


@dataclass
class TeacherConfig:
    """The full-precision model that writes the data."""
    path: str = option("", help="HF model folder of the teacher (safetensors)")
    tokenizer: str | None = option(None, help="tokenizer folder (default: teacher.path)")
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = option(
        "auto", help="auto = bf16 where it is fast (GPU, AVX512-BF16/AMX CPU), else fp32")
    device: str = option("auto", help="auto (cuda if available) | cpu | cuda | cuda:N")
    trust_remote_code: bool = option(False, help="run the model folder's own Python code (off unless you trust it)")


@dataclass
class SamplingConfig:
    """How each sequence is drawn (LLM-QAT: a few greedy tokens, then sampling)."""
    num_sequences: int = option(1024, help="sequences to generate", ge=1)
    batch_size: int = option(16, help="sequences decoded together", ge=1)
    max_len: int = option(256, help="tokens per sequence, first token included (BOS not counted)", ge=2)
    first_token: Literal["uniform", "every_id"] = option("uniform", help="uniform: random non-special token; "
                                                         "every_id: sweep the vocabulary")
    greedy_min: int = option(3, help="the first n tokens after the first one are argmax, n drawn per sequence", ge=0)
    greedy_max: int = option(5, help="... uniformly from [greedy_min, greedy_max] (LLM-QAT: 3-5)", ge=0)
    temperature: float = option(1.0, help="sampling temperature (use greedy_min/max for argmax)", gt=0)
    top_k: int = option(0, help="sample among the k most likely tokens (0 = off)", ge=0)
    top_p: float = option(1.0, help="nucleus sampling mass (1.0 = off)", gt=0, le=1)
    stop_at_eos: bool = option(True, help="end a sequence at EOS")
    add_bos: bool = option(True, help="condition on BOS (if the tokenizer has one); it is not stored")
    seed: int = option(0, help="the same seed gives the same bytes")


@dataclass
class OutputConfig:
    """Where the shards go."""
    dir: str = option("outputs/llm_qat/data", help="output folder (manifest.json + shards)")
    shard_size: int = option(256, help="sequences per shard (a multiple of generate.batch_size)", ge=1)
    topk_logits: int = option(0, help="store the teacher's top-k logits per position (0 = off)", ge=0)
    repair: bool = option(False, help="regenerate shards whose checksum no longer matches")
    progress: bool = option(True, help="show a progress bar")


@dataclass
class GenerateConfig:
    """Self-generated distillation data (`lowbit generate`)."""
    teacher: TeacherConfig = option(default_factory=TeacherConfig, help="")
    generate: SamplingConfig = option(default_factory=SamplingConfig, help="")
    output: OutputConfig = option(default_factory=OutputConfig, help="")

    def validate(self, where: str = "") -> None:
        """Checks across keys, run before the teacher is loaded."""
        g, o = self.generate, self.output
        if not self.teacher.path:
            raise ConfigError("teacher.path is empty: give the folder of the full-precision teacher (HF safetensors)")
        if g.greedy_min > g.greedy_max:
            raise ConfigError(f"need generate.greedy_min <= generate.greedy_max, got {g.greedy_min}, {g.greedy_max}")
        if o.shard_size % g.batch_size:
            # batches never straddle shards, so a resumed run forms exactly the batches of an uninterrupted one
            raise ConfigError(f"output.shard_size ({o.shard_size}) must be a positive multiple of "
                              f"generate.batch_size ({g.batch_size})")

    def to_dict(self) -> dict:
        return engine.to_dict(self)


def load_generate_config(path: str | Path | None, overrides=()) -> GenerateConfig:
    return engine.load(GenerateConfig, path, overrides)
