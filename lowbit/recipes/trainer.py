"""lowbit's trainers: thin subclasses of TRL's SFT / DPO / ORPO / GRPO trainers.

TRL (over HF `Trainer`) owns the loop, checkpoints, scheduler, accelerate/DDP/DeepSpeed, the
preference and RL losses, generation and the reference model (the 4-bit base with the adapters
off); lowbit adds the optimizers (paged / 8-bit), the non-finite-loss stop and, for SFT, its
chunked vocabulary loss (or the distillation loss) in place of TRL's full-logits loss.
"""
from __future__ import annotations

import torch
from trl import DPOConfig, DPOTrainer, GRPOConfig, GRPOTrainer, SFTConfig, SFTTrainer

from lowbit.errors import TrainingError
from lowbit.recipes.checks import reward_function
from lowbit.recipes.distill import distill_loss
from lowbit.recipes.loss import causal_lm_loss
from lowbit.recipes.optim import build_optimizer


def available_memory_bytes(device=None) -> int:
    """Memory free for this process now: the GPU's free memory, else the host's MemAvailable."""
    if device is not None and torch.device(device).type == "cuda":
        return int(torch.cuda.mem_get_info(torch.device(device))[0])
    try:
        with open("/proc/meminfo") as f:
            info = dict(line.split(":", 1) for line in f)
        return int(info["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        import psutil
        return int(psutil.virtual_memory().available)


def checkpoint_plan(model_config, *, batch: int, seq: int, compute_dtype: str, lora_r: int, lora_dropout: float,
                    budget_bytes: int) -> dict:
    """How many decoder layers to checkpoint so the kept activations fit `budget_bytes` (fewest first).

    Checkpointing k of L layers keeps k layer inputs plus L-k layers' full activations, plus one
    layer's recomputed activations during backward when k > 0 (the estimator's formula); every
    layer not checkpointed saves its recompute, about a sixth of a small model's step."""
    from lowbit.estimate.memory import DTYPE_BYTES, ModelShape, Setup, layer_activation_bytes
    shape = ModelShape.from_config(model_config)
    shape.config = None  # the closed formula: the meta-device probe costs seconds
    setup = Setup(seq=seq, batch=batch, compute_dtype=compute_dtype, lora_r=lora_r, lora_dropout=lora_dropout)
    full = layer_activation_bytes(shape, setup)
    kept = DTYPE_BYTES[compute_dtype] * batch * seq * shape.hidden
    n = shape.layers
    need = {k: (n - k) * full + k * kept + (full if k else 0) for k in range(n + 1)}
    k = next((k for k in range(n + 1) if need[k] <= budget_bytes), n)
    return {"layers": n, "checkpointed": k, "activation_bytes": need[k], "budget_bytes": budget_bytes,
            "per_layer_bytes": full}


def resolve_checkpoint_layers(cfg, model) -> int | None:
    """train.checkpoint_layers as a layer count for `prepare_for_kbit_training` (None: every layer)."""
    t, choice = cfg.train, cfg.train.checkpoint_layers
    if not t.gradient_checkpointing or choice == "all":
        return None
    if choice != "auto":
        return int(choice)
    dt = next((m.compute_dtype for m in model.modules() if isinstance(getattr(m, "compute_dtype", None), torch.dtype)),
              torch.float32)
    budget = int(t.activation_budget_gb * 2**30) if t.activation_budget_gb else \
        available_memory_bytes(next(model.parameters()).device) // 2
    plan = checkpoint_plan(model.config.to_dict(), batch=t.batch_size, seq=cfg.data.max_seq_len,
                           compute_dtype=str(dt).removeprefix("torch."), lora_r=cfg.lora.r,
                           lora_dropout=cfg.lora.dropout, budget_bytes=budget)
    print(f"gradient checkpointing: {plan['checkpointed']} of {plan['layers']} decoder layers (activations "
          f"~{plan['activation_bytes'] / 2**30:.2f} GiB of a {budget / 2**30:.2f} GiB budget)", flush=True)
    return plan["checkpointed"]


def grad_filter_eps(value) -> float:
    """train.loss_grad_filter as the threshold the chunked loss takes (0: off)."""
    return 0.0 if value in ("auto", "off") else float(value)


class _Lowbit:
    """What every lowbit trainer adds to its TRL trainer (a mixin before it in the bases)."""

    def __init__(self, *a, lowbit_cfg, **kw):
        self.lowbit_cfg = lowbit_cfg
        super().__init__(*a, **kw)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        out = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        self._check_finite(out[0] if return_outputs else out)
        return out

    def create_optimizer(self, *a, **kw):
        if self.optimizer is None:
            t = self.lowbit_cfg.train
            self.optimizer = build_optimizer(t.optimizer, self.model.parameters(), t.lr, t.weight_decay)
        return self.optimizer

    def _check_finite(self, loss: torch.Tensor) -> torch.Tensor:
        if not torch.isfinite(loss):
            raise TrainingError(f"loss became {loss.item()} at step {self.state.global_step}; stopping. The last "
                                f"good checkpoint in {self.args.output_dir} is kept — lower train.lr or check the data")
        return loss


class LowbitTrainer(_Lowbit, SFTTrainer):
    """SFT (and distillation) with lowbit's chunked loss; data arrives tokenized and packed (`recipes.data`)."""

    def __init__(self, *a, teacher=None, **kw):
        self.teacher = teacher  # frozen full-precision model for online distillation (None: CE or stored top-k)
        super().__init__(*a, **kw)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        inner = self.accelerator.unwrap_model(model)
        if inner is model:
            loss = self._loss(model, **inputs)
        else:
            # a DDP/DeepSpeed wrapper only all-reduces gradients (ZeRO-3: gathers params) for a forward
            # that goes through it, so run the chunked loss as the inner forward
            inner.forward = lambda **kw: self._loss(inner, **kw)
            try:
                loss = model(**inputs)
            finally:
                del inner.forward
        loss = self._check_finite(loss)
        return (loss, None) if return_outputs else loss

    def _loss(self, model, input_ids, labels, attention_mask=None, topk_values=None, topk_indices=None,
              position_ids=None):
        """Next-token CE, or the distillation loss when the run has a teacher (online or stored top-k)."""
        cfg = self.lowbit_cfg
        chunk = cfg.train.loss_chunk_tokens
        if not cfg.distill.enabled:
            return causal_lm_loss(model, input_ids, labels, attention_mask, chunk, position_ids,
                                  grad_filter_eps(cfg.train.loss_grad_filter))
        d = cfg.distill
        stored = self.teacher is None
        return distill_loss(model, input_ids, labels, attention_mask, teacher=self.teacher,
                            topk_values=topk_values if stored else None, topk_indices=topk_indices if stored else None,
                            temperature=d.temperature, alpha=d.alpha, chunk_tokens=chunk, top_k=d.top_k,
                            hidden_weight=d.hidden_weight, hidden_layers=d.hidden_layers, hidden_loss=d.hidden_loss)


class LowbitDPOTrainer(_Lowbit, DPOTrainer):
    """TRL's DPO with lowbit's optimizers and finite-loss stop; reference = the base with adapters off."""


class LowbitGRPOTrainer(_Lowbit, GRPOTrainer):
    """TRL's GRPO with lowbit's optimizers and finite-loss stop."""


def _orpo():
    from trl.experimental.orpo import ORPOConfig, ORPOTrainer  # experimental in TRL 1.x: imported only when used

    class LowbitORPOTrainer(_Lowbit, ORPOTrainer):
        """TRL's ORPO with lowbit's optimizers and finite-loss stop (no reference model)."""
    return ORPOConfig, LowbitORPOTrainer


def method_config(cfg, common: dict):
    """The TRL config of the run's method, from lowbit's sections (TRL's own names where they exist)."""
    m, p, g, d = cfg.train.method, cfg.preference, cfg.grpo, cfg.data
    if m == "sft":
        return SFTConfig(**common, max_length=d.max_seq_len, packing=False, dataset_kwargs={"skip_prepare_dataset":
                                                                                             True})
    if m == "dpo":
        return DPOConfig(**common, beta=p.beta, loss_type=[p.loss_type], max_length=d.max_seq_len)
    if m == "orpo":
        orpo_config, _ = _orpo()
        return orpo_config(**common, beta=p.beta, max_length=d.max_seq_len)
    return GRPOConfig(**common, num_generations=g.num_generations, max_completion_length=g.max_completion_length,
                      temperature=g.temperature, beta=g.beta)


def method_trainer(cfg, model, args, tok, train, collate, callbacks, teacher=None):
    """The run's trainer: SFT on lowbit's tokenized data, or TRL's preference / RL trainer on raw rows."""
    m = cfg.train.method
    if m == "sft":
        return LowbitTrainer(model=model, args=args, train_dataset=train, data_collator=collate, processing_class=tok,
                             callbacks=callbacks, lowbit_cfg=cfg, teacher=teacher)
    kw = dict(model=model, args=args, train_dataset=train, processing_class=tok, callbacks=callbacks, lowbit_cfg=cfg)
    if m == "dpo":
        return LowbitDPOTrainer(**kw)
    if m == "orpo":
        return _orpo()[1](**kw)
    return LowbitGRPOTrainer(reward_funcs=[reward_function(s) for s in cfg.grpo.reward_funcs], **kw)
