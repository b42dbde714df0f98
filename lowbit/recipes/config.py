"""The training run's schema: YAML sections model (with quant), lora, data, train, eval, qat, distill.

Parsed by `lowbit.config` (unknown keys name the closest valid one; types, choices and bounds are
checked on build); cross-field checks live in `recipes.checks` and run before any work starts.
`lowbit config show CONFIG [key=value ...]` prints the resolved config with this help text.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Literal

from lowbit import config as engine
from lowbit.config import option
from lowbit.errors import ConfigError
from lowbit.recipes.checks import check_run

Dtype = Literal["auto", "bfloat16", "float16", "float32"]
Reporter = Literal["jsonl", "tensorboard"]


@dataclass
class QuantConfig:
    """How the base model's Linear layers are stored (bitsandbytes 4-bit layout)."""
    load_in_4bit: bool = option(True, help="quantize the Linear layers to 4 bits while loading (false: dense base)")
    quant_type: Literal["nf4", "fp4"] = option("nf4", help="4-bit code book")
    blocksize: int = option(64, help="weights per absmax block (64, 128, ..., 4096)")
    double_quant: bool = option(True, help="quantize the absmax values again (8-bit, blocks of 256)")
    storage_dtype: Literal["uint8", "bfloat16", "float16", "float32"] = option(
        "uint8", help="container dtype of the packed codes (non-uint8 for FSDP/ZeRO-3 sharding)")
    compute_dtype: Dtype = option("auto", help="matmul dtype; auto = bf16 on GPUs and AVX512-BF16/AMX CPUs, else fp32")
    skip_modules: list[str] = option(default_factory=lambda: ["lm_head"], help="Linear layers kept dense (name or "
                                     "suffix)")
    keep_embeddings_in_compute_dtype: bool = option(True, help="cast the non-quantized tensors to compute_dtype")


@dataclass
class ModelConfig:
    """The base model: an HF safetensors folder, streamed into the 4-bit base."""
    path: str = option("", help="HF model folder (config.json + safetensors)")
    tokenizer: str | None = option(None, help="tokenizer folder (default: model.path)")
    trust_remote_code: bool = option(False, help="run the model folder's own Python code (off unless you trust it)")
    quant: QuantConfig = option(default_factory=QuantConfig, help="")


@dataclass
class LoftQConfig:
    """LoftQ initialization (lora.init=loftq)."""
    iters: int = option(5, help="alternations of quantize and rank-r SVD", ge=1)
    svd: Literal["lowrank", "full"] = option("lowrank", help="lowrank: randomized SVD (fast); full: exact")
    calibration: str | None = option(None, help="text file or `lowbit generate` output folder (data-free) → "
                                     "activation-aware LoftQ; none → weight-space LoftQ")
    calibration_samples: int = option(64, help="calibration sequences", ge=1)
    calibration_seq_len: int = option(256, help="tokens per calibration sequence", ge=2)
    damp: float = option(0.01, help="ridge added to the activation moment, relative to its mean diagonal", gt=0)


@dataclass
class LoraConfig:
    """The LoRA adapters (peft)."""
    r: int = option(16, help="adapter rank", ge=1)
    alpha: float = option(32, help="scaling numerator: the delta is alpha/r · B·A", gt=0)
    dropout: float = option(0.05, help="dropout on the adapter input", ge=0, lt=1)
    target_modules: str | list[str] = option("all-linear", help="all-linear, a regex, or a list of layer names")
    target_parameters: str | list[str] | None = option(
        None, help="MoE experts: 'all-experts' (or parameter names) puts LoRA on the fused expert tensors (peft "
        "target_parameters; needs lora.dropout 0)")
    use_rslora: bool = option(False, help="scale by alpha/sqrt(r) (rsLoRA)")
    use_dora: bool = option(False, help="DoRA (refused on a 4-bit base: peft dequantizes through bnb types)")
    init: Literal["zero", "loftq"] = option("zero", help="zero: B = 0 (plain QLoRA); loftq: LoftQ initialization")
    loftq: LoftQConfig = option(default_factory=LoftQConfig, help="")


Format = Literal["text", "prompt_completion", "chat", "preference", "prompt", "generated"]


@dataclass
class DatasetSpec:
    """One dataset of a mixture (data.datasets): its files, format, fields and sampling weight."""
    files: list[str] = option(default_factory=list, help=".txt/.json/.jsonl/.parquet files or save_to_disk folders")
    format: Format | None = option(None, help="this dataset's format (default: data.format)")
    weight: float = option(1.0, help="relative sampling probability in the mixture", gt=0)
    text_field: str | None = option(None, help="column of the documents (default: data.text_field)")
    prompt_field: str | None = option(None, help="column of the prompts (default: data.prompt_field)")
    completion_field: str | None = option(None, help="column of the completions (default: data.completion_field)")
    messages_field: str | None = option(None, help="column of the messages (default: data.messages_field)")


@dataclass
class DataConfig:
    """Training and evaluation data (local files), in TRL's dataset formats."""
    train_files: list[str] = option(default_factory=list, help=".txt/.json/.jsonl/.parquet files or save_to_disk "
                                    "folders (generated: `lowbit generate` output folders)")
    datasets: list[DatasetSpec] = option(default_factory=list, help="several datasets mixed by weight (instead of "
                                         "train_files), each with its own format and fields")
    eval_files: list[str] = option(default_factory=list, help="held-out files (plain text with format=generated)")
    eval_fraction: float = option(0.0, help="hold out this fraction of train when eval_files is empty", ge=0, lt=1)
    format: Format = option(
        "text", help="text: documents; prompt_completion / chat: loss on the answer; preference: prompt/chosen/"
        "rejected (dpo, orpo); prompt: prompts only (grpo); generated: lowbit generate shards")
    text_field: str = option("text", help="column of the documents (JSON/parquet)")
    prompt_field: str = option("prompt", help="column of the prompts")
    completion_field: str = option("completion", help="column of the completions")
    messages_field: str = option("messages", help="column of the chat messages")
    chosen_field: str = option("chosen", help="preference: column of the preferred answer")
    rejected_field: str = option("rejected", help="preference: column of the rejected answer")
    max_seq_len: int = option(256, help="tokens per example (block length when packing)", ge=2)
    packing: bool = option(True, help="pack several examples into each row of max_seq_len tokens")
    packing_strategy: Literal["auto", "wrapped", "bfd"] = option(
        "auto", help="wrapped: one stream cut into BOS-led blocks; bfd: best-fit-decreasing, documents kept whole "
        "and isolated by the attention mask; auto: wrapped for text, bfd otherwise")
    on_bad_rows: Literal["error", "skip"] = option("error", help="a malformed row stops the run naming file and line, "
                                                   "or is skipped and counted")
    num_proc: int | None = option(None, help="processes for tokenization (datasets.map)", ge=1)
    streaming: bool = option(False, help="read training data lazily (memory bounded; needs train.max_steps)")
    max_train_blocks: int | None = option(None, help="keep only the first N training examples", ge=1)
    max_eval_blocks: int | None = option(None, help="keep only the first N eval examples", ge=1)


@dataclass
class TrainConfig:
    """The optimizer loop (HF Trainer)."""
    method: Literal["sft", "dpo", "orpo", "grpo"] = option(
        "sft", help="sft: supervised (incl. distill: with a distill section); dpo / orpo: preference pairs; grpo: "
        "RL with reward functions (TRL's trainers underneath)")
    output_dir: str = option("outputs/run", help="where adapters, checkpoints, logs and lowbit_run.json go")
    overwrite_output: bool = option(False, help="replace a finished run in output_dir")
    seed: int = option(42, help="seed for data order, LoRA init and dropout")
    max_steps: int = option(-1, help="optimizer steps (-1: train.epochs)")
    epochs: float = option(1.0, help="passes over the data when max_steps is -1", gt=0)
    batch_size: int = option(4, help="examples per device and micro-step", ge=1)
    grad_accum: int = option(1, help="micro-steps per optimizer step", ge=1)
    lr: float = option(2e-4, help="peak learning rate (0 keeps the start: e.g. to score an initialization)", ge=0)
    scheduler: Literal["cosine", "linear", "constant", "constant_with_warmup"] = option("cosine", help="LR schedule")
    warmup_steps: int = option(0, help="linear warm-up steps", ge=0)
    weight_decay: float = option(0.0, help="AdamW weight decay", ge=0)
    optimizer: Literal["adamw_torch", "adamw_8bit", "paged_adamw_8bit", "paged_adamw_32bit"] = option(
        "adamw_torch", help="paged variants page to CPU on CUDA; on CPU they run as their non-paged twins")
    gradient_checkpointing: bool = option(True, help="recompute decoder layers in backward (less memory)")
    checkpoint_layers: Literal["auto", "all"] | int = option(
        "auto", help="with gradient_checkpointing: auto = only as many decoder layers as the activation budget "
        "requires (memory estimator; each layer not recomputed saves its forward again), all = every layer, N = N "
        "evenly spaced layers", ge=0)
    activation_budget_gb: float | None = option(None, help="activations the auto checkpoint policy may keep (default: "
                                                "half the memory available at start)", gt=0)
    max_grad_norm: float = option(1.0, help="gradient clipping norm (0: off)", ge=0)
    logging_steps: int = option(1, help="log every N steps", ge=1)
    save_steps: int = option(0, help="checkpoint every N steps (0: only the final adapter)", ge=0)
    save_total_limit: int = option(2, help="checkpoints kept (newest complete ones)", ge=1)
    resume_from: str = option("none", help="none | auto (latest complete checkpoint) | a checkpoint folder")
    loss_chunk_tokens: int = option(256, help="tokens per vocabulary-projection chunk of the loss", ge=1)
    loss_grad_filter: Literal["auto", "off"] | float = option(
        "auto", help="skip d(loss)/dh vocabulary blocks whose softmax entries are all below this (Cut Cross-Entropy's "
        "filter, 2**-12 there; changes the gradient). auto = off: on Gemma-3-270M a threshold that keeps the gradient "
        "within fp32/bf16 rounding skips under 3% of blocks", ge=0)
    report_to: list[Reporter] = option(default_factory=lambda: ["jsonl", "tensorboard"],
                                       help="metric sinks: jsonl (logs.jsonl) and/or tensorboard (runs/)")


@dataclass
class EvalConfig:
    """Held-out perplexity before and after training."""
    before: bool = option(True, help="evaluate before training")
    after: bool = option(True, help="evaluate after training")
    batch_size: int = option(4, help="eval batch size", ge=1)


@dataclass
class QatSection:
    """Quantization-aware training on top of the run's LoRA (merge-aware: the merged weight is fake-quantized)."""
    scheme: str = option("", help="'' = off; a preset (w4a8kv8, nf4, ...) or a YAML file such as "
                         "configs/qat/nf4.yaml")
    start_step: int | None = option(None, help="overrides every quantizer's start_step", ge=0)
    kv_position: Literal["pre_rope", "post_rope"] | None = option(None, help="overrides the scheme's kv_position")
    save_quantized: bool = option(True, help="convert at the end and save the deployment model to "
                                  "<output_dir>/quantized")


@dataclass
class DistillSection:
    """Knowledge distillation from a full-precision teacher (LLM-QAT): KL at a temperature, optionally + CE."""
    teacher: str = option("", help="'' = off; base = model.path unquantized in the compute dtype; or a model folder")
    source: Literal["online", "offline"] = option(
        "online", help="online: run the teacher on each batch; offline: top-k logits stored by lowbit generate")
    temperature: float = option(1.0, help="softmax temperature of both distributions", gt=0)
    alpha: float = option(1.0, help="weight of the KL term; (1 - alpha) weighs next-token cross entropy", ge=0, le=1)
    top_k: int = option(0, help="online: keep the teacher's top-k tokens per position (renormalised); 0 = all", ge=0)
    hidden_weight: float = option(0.0, help="weight of per-layer hidden-state matching added to the KL (online "
                                  "teacher of the student's architecture, e.g. NF4 repair); 0 = off", ge=0)
    hidden_layers: list[int] = option(default_factory=list, help="hidden states to match (0 = embeddings, i = "
                                      "block i's output); empty = every block")
    hidden_loss: Literal["mse", "cosine"] = option("mse", help="mse: squared error relative to the teacher's norm; "
                                                   "cosine: 1 - cosine similarity per token")

    @property
    def enabled(self) -> bool:
        """Offline distillation needs no teacher model, but the section is on."""
        return bool(self.teacher) or self.source == "offline"

    @property
    def online(self) -> bool:
        return bool(self.teacher) and self.source == "online"

    def validate(self, where: str = "") -> None:
        if (self.hidden_weight or self.top_k) and not self.online:
            what = "hidden_weight" if self.hidden_weight else "top_k"
            raise ConfigError(f"{where}.{what} needs an online teacher ({where}.teacher set, {where}.source=online): "
                              "stored top-k logits carry no hidden states and are already truncated")
        if any(i < 0 for i in self.hidden_layers):
            raise ConfigError(f"{where}.hidden_layers must be indices >= 0 (0 = embeddings, i = block i), got "
                              f"{self.hidden_layers}")


@dataclass
class PreferenceSection:
    """DPO / ORPO settings (TRL's DPOConfig / ORPOConfig names); the reference model is the base with adapters off."""
    beta: float = option(0.1, help="DPO: KL strength against the reference; ORPO: weight of the odds-ratio term",
                         gt=0)
    loss_type: Literal["sigmoid", "ipo", "hinge", "robust"] = option("sigmoid", help="DPO loss variant")


@dataclass
class GrpoSection:
    """GRPO settings (TRL's GRPOConfig names)."""
    reward_funcs: list[str] = option(default_factory=list, help="'module:function' rewards, each called as "
                                     "f(prompts, completions, **columns) -> list[float]")
    num_generations: int = option(4, help="completions sampled per prompt (the group)", ge=2)
    max_completion_length: int = option(64, help="tokens per sampled completion", ge=1)
    temperature: float = option(1.0, help="sampling temperature", gt=0)
    beta: float = option(0.0, help="KL coefficient against the reference (0: no reference model)", ge=0)


@dataclass
class RunConfig:
    """A QLoRA / QAT / distillation training run."""
    model: ModelConfig = option(default_factory=ModelConfig, help="")
    lora: LoraConfig = option(default_factory=LoraConfig, help="")
    data: DataConfig = option(default_factory=DataConfig, help="")
    train: TrainConfig = option(default_factory=TrainConfig, help="")
    eval: EvalConfig = option(default_factory=EvalConfig, help="")
    qat: QatSection = option(default_factory=QatSection, help="")
    distill: DistillSection = option(default_factory=DistillSection, help="")
    preference: PreferenceSection = option(default_factory=PreferenceSection, help="")
    grpo: GrpoSection = option(default_factory=GrpoSection, help="")

    # names users bring from transformers/peft/TRL configs → ours (difflib cannot guess these)
    ALIASES: ClassVar[dict[str, str]] = {
        "learning_rate": "lr", "rank": "r", "lora_r": "r", "lora_alpha": "alpha", "lora_dropout": "dropout",
        "per_device_train_batch_size": "batch_size", "gradient_accumulation_steps": "grad_accum",
        "num_train_epochs": "epochs", "max_length": "max_seq_len", "seq_len": "max_seq_len", "optim": "optimizer",
        "lr_scheduler_type": "scheduler", "bnb_4bit_quant_type": "quant_type", "model_name_or_path": "path"}

    def validate(self, where: str = "") -> None:
        check_run(self)

    def to_dict(self) -> dict:
        return engine.to_dict(self)


def load_config(path: str | Path | None, overrides=()) -> RunConfig:
    """YAML file + `key=value` overrides → a validated RunConfig (before any model is loaded)."""
    return engine.load(RunConfig, path, overrides)
