"""Verifiable rewards for GRPO tests and examples (`grpo.reward_funcs: [lowbit.testing.rewards:...]`)."""
from __future__ import annotations


def _text(completion) -> str:
    return completion if isinstance(completion, str) else " ".join(m.get("content", "") for m in completion)


def letter_e(prompts, completions, **_) -> list[float]:
    """Fraction of the completion's letters that are 'e': checkable by reading the text, learnable by a tiny model."""
    out = []
    for c in completions:
        letters = [ch for ch in _text(c).lower() if ch.isalpha()]
        out.append(sum(ch == "e" for ch in letters) / max(len(letters), 1))
    return out


def brevity(prompts, completions, **_) -> list[float]:
    """1 for an empty completion, falling linearly to 0 at 64 characters: learnable by ending early (EOS)."""
    return [max(0.0, 1.0 - len(_text(c)) / 64) for c in completions]
