"""Intermediate-representation distillation: match the student's per-layer hidden states to the teacher's.

For NF4 repair the student is the teacher's own architecture (same layers, same widths), so layer l
of one lines up with layer l of the other, and the quantization error enters every layer: matching
the residual stream after each block tells the adapters *where* the output went wrong, which the
final-logit KL alone does not.

Per chosen layer l (index into HF `hidden_states`: 0 = embeddings, i = output of block i), over the
kept positions P:
    mse:    Σ_P ‖s_l − t_l‖² / Σ_P ‖t_l‖²       (relative: layers of very different scale weigh alike)
    cosine: mean_P (1 − cos(s_l, t_l))
and the loss is the mean over the chosen layers, computed in fp32.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from lowbit.errors import ConfigError
from lowbit.recipes.loss import decoder_and_head

HIDDEN_LOSSES = ("mse", "cosine")


def decoder_states(model, input_ids, attention_mask=None):
    """(final hidden states, every layer's hidden states, lm_head weight, logit softcap)."""
    out, h, w, softcap = decoder_and_head(model, input_ids, attention_mask, output_hidden_states=True)
    return h, out.hidden_states, w, softcap


def layer_indices(n_states: int, layers) -> list[int]:
    """The chosen indices into a `hidden_states` tuple of n_states entries (empty/None: every block's output)."""
    if not layers:
        return list(range(1, n_states))
    bad = [i for i in layers if not 0 <= i < n_states]
    if bad:
        raise ConfigError(f"distill.hidden_layers {bad} out of range: this model has hidden states 0..{n_states - 1} "
                          f"(0 = embeddings, {n_states - 1} = the last block); leave it empty for every block")
    return sorted(set(layers))


def hidden_state_loss(student_states, teacher_states, keep: torch.Tensor, layers=None, kind: str = "mse") -> torch.Tensor:
    """Mean over the chosen layers of the per-layer distance (module docstring) at positions `keep` [B, L] (bool)."""
    if kind not in HIDDEN_LOSSES:
        raise ConfigError(f"distill.hidden_loss {kind!r} unknown; choose one of {', '.join(HIDDEN_LOSSES)}")
    if len(student_states) != len(teacher_states):
        raise ConfigError(f"hidden-state distillation needs teacher and student of the same depth, got "
                          f"{len(teacher_states) - 1} and {len(student_states) - 1} blocks; set distill.hidden_weight=0")
    idx = layer_indices(len(student_states), layers)
    total = torch.zeros((), dtype=torch.float32, device=keep.device)
    for i in idx:
        s, t = student_states[i][keep].float(), teacher_states[i][keep].float()
        if s.shape != t.shape:
            raise ConfigError(f"hidden state {i}: student width {s.shape[-1]}, teacher {t.shape[-1]}; hidden-state "
                              "distillation needs the same architecture, set distill.hidden_weight=0")
        if kind == "mse":
            total = total + (s - t).pow(2).sum() / t.pow(2).sum().clamp_min(1e-12)
        else:
            total = total + (1 - F.cosine_similarity(s, t, dim=-1, eps=1e-6)).mean()
    return total / len(idx)
