"""Rows → `input_ids` / `labels` per data format, as `datasets.map` functions (cached, `num_proc`).

text: BOS + document + EOS; `wrap_blocks` packs the document stream into fixed blocks that each
start with BOS (models like Gemma are far off-distribution on a window without it).
prompt_completion: loss on the completion only. chat: the tokenizer's chat template, loss on the
assistant turns only, found by rendering the conversation up to each turn and tokenizing each
conversation once with character offsets — this works with every template, where TRL's
`assistant_only_loss` needs one with `{% generation %}` markers.
"""
from __future__ import annotations

from lowbit.errors import InputError
from lowbit.utils.batching import IGNORE_INDEX


def _ends(tok) -> tuple[list[int], list[int]]:
    return ([tok.bos_token_id] if tok.bos_token_id is not None else [],
            [tok.eos_token_id] if tok.eos_token_id is not None else [])


def text_document(row: dict, tok, max_len: int | None = None) -> dict:
    """One document: BOS + tokens + EOS (the middle truncated to `max_len` when given)."""
    bos, eos = _ends(tok)
    ids = tok(row["text"], add_special_tokens=False).input_ids
    if max_len is not None:
        ids = ids[:max_len - len(bos) - len(eos)]
    ids = bos + ids + eos
    return {"input_ids": ids, "labels": list(ids)}


def wrap_blocks(batch: dict, tok, block: int) -> dict:
    """Documents (batched) → one token stream (each ends with EOS) → blocks of `block` tokens starting with BOS."""
    bos, eos = _ends(tok)
    stream = [t for text in batch["text"] for t in tok(text, add_special_tokens=False).input_ids + eos]
    step = block - len(bos)
    if len(stream) < step:
        raise InputError(f"data has {len(stream)} tokens, fewer than one block of data.max_seq_len={block}")
    blocks = [bos + stream[i:i + step] for i in range(0, len(stream) - step + 1, step)]
    return {"input_ids": blocks, "labels": [list(b) for b in blocks]}


def prompt_completion(row: dict, tok, max_len: int) -> dict:
    bos, eos = _ends(tok)
    p = bos + tok(row["prompt"], add_special_tokens=False).input_ids
    c = tok(row["completion"], add_special_tokens=False).input_ids + eos
    return {"input_ids": (p + c)[:max_len], "labels": ([IGNORE_INDEX] * len(p) + c)[:max_len]}


class _Renderer:
    """The chat template rendered through its compiled jinja template: apply_chat_template's own rendering
    without its per-call overhead (about half of the time of a large chat set). Checked against
    apply_chat_template on the first conversation; on any difference it is not used."""

    def __init__(self, tok):
        self.tok, self.template = tok, None
        try:
            from transformers.utils.chat_template_utils import _compile_jinja_template
            self.template = _compile_jinja_template(tok.chat_template)
        except (ImportError, AttributeError, TypeError):
            pass
        self.context = dict(tok.special_tokens_map)
        self.checked = False

    def __call__(self, msgs, add_generation_prompt: bool = False) -> str:
        slow = lambda: self.tok.apply_chat_template(msgs, tokenize=False,  # noqa: E731
                                                    add_generation_prompt=add_generation_prompt)
        if self.template is None:
            return slow()
        text = self.template.render(messages=msgs, add_generation_prompt=add_generation_prompt, **self.context)
        if not self.checked:
            self.checked = True
            if text != slow():
                self.template = None
                return slow()
        return text


def chat_batch(batch: dict, tok, max_len: int, drop_unlabelled: bool = True) -> dict:
    """`chat` for a batch, faster: the template is rendered to text (the prefix up to each assistant turn
    only to find where it starts), then all conversations are tokenized in one call and a token is
    labelled when its characters lie inside an assistant turn."""
    texts, spans = [], []
    render = _Renderer(tok)
    rendered = batch.get("rendered") or [None] * len(batch["messages"])
    for msgs, full in zip(batch["messages"], rendered, strict=True):
        full = full if full is not None else render(msgs)
        turns = []
        for i, m in enumerate(msgs):
            if m["role"] == "assistant":
                start = len(render(msgs[:i], add_generation_prompt=True))
                end = len(full) if i == len(msgs) - 1 else len(render(msgs[:i + 1]))
                turns.append((start, end))
        texts.append(full)
        spans.append(turns)
    enc = tok(texts, add_special_tokens=False, return_offsets_mapping=True)
    out_ids, out_labels = [], []
    for ids, offsets, turns in zip(enc["input_ids"], enc["offset_mapping"], spans, strict=True):
        labels = [t if any(s <= a and b <= e for s, e in turns) and b > a else IGNORE_INDEX
                  for t, (a, b) in zip(ids, offsets, strict=True)]
        labels = labels[:max_len]
        if drop_unlabelled and all(x == IGNORE_INDEX for x in labels):
            continue  # truncation cut every assistant token: nothing to learn from this row
        out_ids.append(ids[:max_len])
        out_labels.append(labels)
    return {"input_ids": out_ids, "labels": out_labels}


def chat(row: dict, tok, max_len: int) -> dict:
    """One conversation (see `chat_batch`)."""
    out = chat_batch({"messages": [row["messages"]]}, tok, max_len, drop_unlabelled=False)
    return {"input_ids": out["input_ids"][0], "labels": out["labels"][0]}


def has_labels(row: dict) -> bool:
    return any(x != IGNORE_INDEX for x in row["labels"])


ROW_TOKENIZERS = {"prompt_completion": prompt_completion, "chat": chat}
BATCH_TOKENIZERS = {"chat": chat_batch}
