"""A preference set for DPO/ORPO from the plays: chosen = the real reply, rejected = another character's reply.

Reads the chat conversations `scripts/prepare_data.py` builds (a speech as the user turn, the next speech
as the assistant turn) and writes TRL's standard preference rows {prompt, chosen, rejected}: the prompt
is the conversation up to the reply rendered with the model's chat template (generation prompt included),
chosen the real reply, rejected a reply drawn from another conversation of the same split (fixed seed).

  .venv/bin/python scripts/prepare_preference.py --tokenizer .cache/models/smollm2-135m-instruct
"""
from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

from transformers import AutoTokenizer

from lowbit.utils.io import write_text


def build(chat_file: Path, tok, seed: int, limit: int | None) -> list[dict]:
    convs = [json.loads(line) for line in chat_file.read_text().splitlines() if line.strip()]
    replies = [c["messages"][-1]["content"] for c in convs]
    rng = random.Random(seed)
    rows = []
    for i, c in enumerate(convs[:limit]):
        j = rng.randrange(len(convs) - 1)
        j += j >= i  # never the conversation's own reply
        prompt = tok.apply_chat_template(c["messages"][:-1], tokenize=False, add_generation_prompt=True)
        rows.append({"prompt": prompt, "chosen": replies[i], "rejected": replies[j]})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokenizer", default=".cache/models/smollm2-135m-instruct")
    ap.add_argument("--data", default="data/shakespeare")
    ap.add_argument("--limit", type=int, default=None)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    tok = AutoTokenizer.from_pretrained(a.tokenizer)
    for split in ("train", "heldout"):
        rows = build(Path(a.data) / f"chat_{split}.jsonl", tok, a.seed, a.limit)
        out = Path(a.data) / f"dpo_{split}.jsonl"
        write_text(out, "".join(json.dumps(r) + "\n" for r in rows))
        print(f"{out}: {len(rows)} pairs")


if __name__ == "__main__":
    main()
