"""Typed run configuration: YAML file + `key=value` overrides → dataclasses.

Unknown keys fail naming the closest valid key; wrong types fail naming key, expected
type and value. Sections: model (with quant), lora, data, train, eval.
"""
from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from ..errors import ConfigError, InputError


@dataclass
class QuantConfig:
    load_in_4bit: bool = True
    quant_type: str = "nf4"
    blocksize: int = 64
    double_quant: bool = True
    storage_dtype: str = "uint8"
    compute_dtype: str = "auto"     # auto: bf16 on GPUs and AVX512-BF16/AMX CPUs, else fp32
    skip_modules: list[str] = field(default_factory=lambda: ["lm_head"])
    keep_embeddings_in_compute_dtype: bool = True


@dataclass
class ModelConfig:
    path: str = ""
    tokenizer: str | None = None
    trust_remote_code: bool = False
    quant: QuantConfig = field(default_factory=QuantConfig)


@dataclass
class LoftQConfig:
    iters: int = 5
    svd: str = "lowrank"                # lowrank (randomized, fast) | full
    calibration: str | None = None      # text file → activation-aware LoftQ; none → weight-space LoftQ
    calibration_samples: int = 64
    calibration_seq_len: int = 256
    damp: float = 0.01


@dataclass
class LoraConfig:
    r: int = 16
    alpha: float = 32
    dropout: float = 0.05
    target_modules: list[str] | str = "all-linear"
    use_rslora: bool = False
    use_dora: bool = False
    init: str = "zero"                  # zero (B = 0, plain QLoRA) | loftq
    loftq: LoftQConfig = field(default_factory=LoftQConfig)


@dataclass
class DataConfig:
    train_files: list[str] = field(default_factory=list)
    eval_files: list[str] = field(default_factory=list)
    eval_fraction: float = 0.0
    format: str = "text"               # text | prompt_completion | chat
    text_field: str = "text"
    prompt_field: str = "prompt"
    completion_field: str = "completion"
    messages_field: str = "messages"
    max_seq_len: int = 256
    packing: bool = True
    max_train_blocks: int | None = None
    max_eval_blocks: int | None = None


@dataclass
class TrainConfig:
    output_dir: str = "outputs/run"
    overwrite_output: bool = False
    seed: int = 42
    max_steps: int = -1
    epochs: float = 1.0
    batch_size: int = 4
    grad_accum: int = 1
    lr: float = 2e-4
    scheduler: str = "cosine"
    warmup_steps: int = 0
    weight_decay: float = 0.0
    optimizer: str = "adamw_torch"     # adamw_torch | adamw_8bit | paged_adamw_8bit | paged_adamw_32bit
    gradient_checkpointing: bool = True
    max_grad_norm: float = 1.0
    logging_steps: int = 1
    save_steps: int = 0
    save_total_limit: int = 2
    resume_from: str = "none"          # none | auto | <checkpoint dir>
    loss_chunk_tokens: int = 256
    report_to: list[str] = field(default_factory=lambda: ["jsonl", "tensorboard"])


@dataclass
class EvalConfig:
    before: bool = True
    after: bool = True
    batch_size: int = 4


@dataclass
class QatSection:
    """Quantization-aware training on top of the run's LoRA (merge-aware: the merged weight is fake-quantized)."""
    scheme: str = ""              # "" = off; a preset (w4a8kv8, nf4, ...) or a YAML file such as configs/qat/nf4.yaml
    start_step: int | None = None  # overrides every quantizer's start_step (fake quant from this step on)
    kv_position: str | None = None  # overrides the scheme's kv_position (pre_rope | post_rope)
    save_quantized: bool = True   # convert at the end and save the deployment model to <output_dir>/quantized


@dataclass
class DistillSection:
    """Knowledge distillation from a full-precision teacher (LLM-QAT): KL at a temperature, optionally + CE."""
    teacher: str = ""             # "" = off; "base" = model.path unquantized in the compute dtype; or a model folder
    source: str = "online"        # online: run the teacher on each batch; offline: top-k logits stored by lowbit generate
    temperature: float = 1.0
    alpha: float = 1.0            # weight of the KL term; (1 - alpha) weighs next-token cross entropy


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    qat: QatSection = field(default_factory=QatSection)
    distill: DistillSection = field(default_factory=DistillSection)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


CHOICES = {
    "model.quant.quant_type": ("nf4", "fp4"),
    "model.quant.storage_dtype": ("uint8", "bfloat16", "float16", "float32"),
    "model.quant.compute_dtype": ("auto", "bfloat16", "float16", "float32"),
    "lora.init": ("zero", "loftq"),
    "lora.loftq.svd": ("lowrank", "full"),
    "data.format": ("text", "prompt_completion", "chat", "generated"),
    "distill.source": ("online", "offline"),
    "train.optimizer": ("adamw_torch", "adamw_8bit", "paged_adamw_8bit", "paged_adamw_32bit"),
    "train.scheduler": ("cosine", "linear", "constant", "constant_with_warmup"),
    "qat.kv_position": ("pre_rope", "post_rope"),
}


# names users bring from transformers/peft/TRL configs → ours (difflib cannot guess these)
ALIASES = {"learning_rate": "lr", "rank": "r", "lora_r": "r", "lora_alpha": "alpha", "lora_dropout": "dropout",
           "per_device_train_batch_size": "batch_size", "gradient_accumulation_steps": "grad_accum",
           "num_train_epochs": "epochs", "max_length": "max_seq_len", "seq_len": "max_seq_len", "optim": "optimizer",
           "lr_scheduler_type": "scheduler", "bnb_4bit_quant_type": "quant_type", "model_name_or_path": "path"}


def _suggest(key: str, names: list[str]) -> str | None:
    aliases = {a: n for a, n in ALIASES.items() if n in names}
    close = difflib.get_close_matches(key, names + list(aliases), n=1, cutoff=0.6)
    return aliases.get(close[0], close[0]) if close else None


def _type_ok(value, tp) -> tuple[bool, object]:
    """(ok, coerced value) for the small set of annotation shapes used above."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        for arm in typing.get_args(tp):
            ok, v = _type_ok(value, arm)
            if ok:
                return True, v
        return False, value
    if tp is type(None):
        return value is None, value
    if origin is list:
        (inner,) = typing.get_args(tp)
        if isinstance(value, str) and inner is str:
            return True, [value]
        if not isinstance(value, list):
            return False, value
        out = []
        for v in value:
            ok, c = _type_ok(v, inner)
            if not ok:
                return False, value
            out.append(c)
        return True, out
    if tp is float:
        if isinstance(value, str):  # PyYAML reads "1e-3" (no dot) as a string
            try:
                return True, float(value)
            except ValueError:
                return False, value
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        return ok, float(value) if ok else value
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool), value
    if tp is bool:
        return isinstance(value, bool), value
    if tp is str:
        return isinstance(value, str), value
    return isinstance(value, tp), value


def _build(cls, data: dict, where: str):
    if not isinstance(data, dict):
        raise ConfigError(f"{where or 'config'} must be a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        full = f"{where}.{key}" if where else key
        if key not in names:
            close = _suggest(key, names)
            hint = f"; did you mean '{(where + '.') if where else ''}{close}'?" if close else \
                f"; valid keys: {', '.join(names)}"
            raise ConfigError(f"unknown config key '{full}'{hint}")
        tp = hints[key]
        sub = _dataclass_arm(tp)
        if sub is not None and (value is not None or tp is sub):
            kwargs[key] = _build(sub, value or {}, full)
            continue
        ok, coerced = _type_ok(value, tp)
        if not ok:
            raise ConfigError(f"config key '{full}' expects {_type_name(tp)}, got {value!r}")
        if full in CHOICES and coerced not in CHOICES[full]:
            raise ConfigError(f"config key '{full}' must be one of {', '.join(CHOICES[full])}, got {coerced!r}")
        kwargs[key] = coerced
    return cls(**kwargs)


def _dataclass_arm(tp):
    """The dataclass in `X` or `X | None` annotations (optional sections such as qat.weight)."""
    if dataclasses.is_dataclass(tp):
        return tp
    arms = [a for a in typing.get_args(tp) if dataclasses.is_dataclass(a)]
    return arms[0] if len(arms) == 1 else None


def _type_name(tp) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _apply_override(tree: dict, item: str) -> None:
    if "=" not in item:
        raise ConfigError(f"override {item!r} is not key=value (e.g. train.max_steps=10)")
    key, raw = item.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"override {item!r}: value is not valid YAML ({e})") from None
    node = tree
    parts = key.strip().split(".")
    for p in parts[:-1]:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {item!r}: '{p}' is not a section")
    node[parts[-1]] = value


def read_tree(path: str | Path | None, overrides: list[str] = ()) -> dict:
    """The YAML file (if any) with key=value overrides applied: what `_build` turns into a config."""
    from ..utils.io import read_yaml
    tree = read_yaml(path) if path is not None else {}
    for item in overrides:
        _apply_override(tree, item)
    return tree


def load_config(path: str | Path | None, overrides: list[str] = ()) -> RunConfig:
    cfg = _build(RunConfig, read_tree(path, overrides), "")
    check(cfg)
    return cfg


def check(cfg: RunConfig) -> None:
    """Value checks that need more than one key (run before any work starts)."""
    from ..format.codes import BLOCKSIZES
    q = cfg.model.quant
    if q.blocksize not in BLOCKSIZES:
        raise ConfigError(f"invalid model.quant.blocksize {q.blocksize}: choose one of "
                          f"{', '.join(map(str, BLOCKSIZES))}")
    if cfg.lora.r <= 0:
        raise ConfigError(f"lora.r must be positive, got {cfg.lora.r}")
    if cfg.lora.init == "loftq":
        _check_loftq(cfg)
    if not 0 <= cfg.data.eval_fraction < 1:
        raise ConfigError(f"data.eval_fraction must be in [0, 1), got {cfg.data.eval_fraction}")
    if cfg.train.max_steps == 0:
        raise ConfigError("train.max_steps=0 trains nothing; use -1 for epochs or a positive number")
    if cfg.train.batch_size < 1 or cfg.train.grad_accum < 1:
        raise ConfigError("train.batch_size and train.grad_accum must be >= 1")
    if cfg.qat.scheme:
        qat_config(cfg)  # resolvable, and compatible with the LoRA settings
    _check_distill(cfg)


def qat_config(cfg: RunConfig):
    """The run's `lowbit.qat.QATConfig` (None when qat.scheme is empty), with the section's overrides."""
    if not cfg.qat.scheme:
        return None
    from ..qat.config import resolve
    q = resolve(cfg.qat.scheme)
    if cfg.qat.kv_position is not None:
        q.kv_position = cfg.qat.kv_position
    if cfg.qat.start_step is not None:
        for role in (q.weight, q.activation, q.kv):
            if role is not None:
                role.start_step = cfg.qat.start_step
    q.check()
    if q.weight is not None and cfg.lora.dropout:
        raise ConfigError(f"qat.scheme {cfg.qat.scheme!r} fake-quantizes the merged weight deq(W) + s·BA, which LoRA "
                          f"dropout cannot pass through; set lora.dropout: 0 (got {cfg.lora.dropout})")
    return q


def _check_loftq(cfg: RunConfig) -> None:
    lq = cfg.lora.loftq
    if not cfg.model.quant.load_in_4bit:
        raise ConfigError("lora.init=loftq needs a 4-bit base (model.quant.load_in_4bit=true); use lora.init=zero")
    if cfg.lora.use_dora:
        raise ConfigError("lora.init=loftq cannot be combined with lora.use_dora (DoRA's magnitude vector changes "
                          "the delta LoftQ solves for); drop one of them")
    if lq.iters < 1:
        raise ConfigError(f"lora.loftq.iters must be >= 1, got {lq.iters}")
    # (the calibration file itself is checked when read, like data.train_files)
    if lq.calibration_samples < 1 or lq.calibration_seq_len < 2:
        raise ConfigError("lora.loftq.calibration_samples must be >= 1 and calibration_seq_len >= 2")
    if not lq.damp > 0:
        raise ConfigError(f"lora.loftq.damp must be > 0, got {lq.damp}")


def _check_distill(cfg: RunConfig) -> None:
    d = cfg.distill
    if d.source == "offline" and cfg.data.format != "generated":
        raise ConfigError("distill.source=offline reads the teacher's top-k logits stored by `lowbit generate`; set "
                          "data.format=generated with data.train_files=[<generate output dir>], or distill.source=online")
    if d.source == "offline" and not d.teacher:
        d.teacher = "stored"  # offline needs no model, but the section is on
    if d.temperature <= 0 or not 0 <= d.alpha <= 1:
        raise ConfigError(f"distill.temperature must be > 0 and distill.alpha in [0, 1]; got {d.temperature}, {d.alpha}")
    if d.teacher and d.teacher not in ("base", "stored") and not Path(d.teacher).exists():
        raise InputError(f"distill.teacher {d.teacher} does not exist; give a model folder or 'base' (model.path "
                         "unquantized)")
