"""`LowbitTrainer`: HF `Trainer` with lowbit's chunked loss (or distillation loss) and optimizers.

HF `Trainer` owns the loop, checkpoints, scheduler and the accelerate/DDP/DeepSpeed integration;
we supply the loss and the optimizer. The recipe that builds it is `recipes.phases`.
"""
from __future__ import annotations

import torch
from transformers import Trainer

from lowbit.errors import TrainingError
from lowbit.recipes.distill import distill_loss
from lowbit.recipes.loss import causal_lm_loss
from lowbit.recipes.optim import build_optimizer


class LowbitTrainer(Trainer):
    def __init__(self, *a, lowbit_cfg, teacher=None, **kw):
        self.lowbit_cfg = lowbit_cfg
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
        if not torch.isfinite(loss):
            raise TrainingError(f"loss became {loss.item()} at step {self.state.global_step}; stopping. The last "
                                f"good checkpoint in {self.args.output_dir} is kept — lower train.lr or check the data")
        return (loss, None) if return_outputs else loss

    def _loss(self, model, input_ids, labels, attention_mask=None, topk_values=None, topk_indices=None):
        """Next-token CE, or the distillation loss when the run has a teacher (online or stored top-k)."""
        cfg = self.lowbit_cfg
        chunk = cfg.train.loss_chunk_tokens
        if not cfg.distill.enabled:
            return causal_lm_loss(model, input_ids, labels, attention_mask, chunk)
        d = cfg.distill
        stored = self.teacher is None
        return distill_loss(model, input_ids, labels, attention_mask, teacher=self.teacher,
                            topk_values=topk_values if stored else None, topk_indices=topk_indices if stored else None,
                            temperature=d.temperature, alpha=d.alpha, chunk_tokens=chunk)

    def create_optimizer(self):
        if self.optimizer is None:
            t = self.lowbit_cfg.train
            self.optimizer = build_optimizer(t.optimizer, self.model.parameters(), t.lr, t.weight_decay)
        return self.optimizer
