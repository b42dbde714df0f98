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
            return causal_lm_loss(model, input_ids, labels, attention_mask, chunk, position_ids)
        d = cfg.distill
        stored = self.teacher is None
        return distill_loss(model, input_ids, labels, attention_mask, teacher=self.teacher,
                            topk_values=topk_values if stored else None, topk_indices=topk_indices if stored else None,
                            temperature=d.temperature, alpha=d.alpha, chunk_tokens=chunk)


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
