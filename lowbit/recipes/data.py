"""Training/eval data from local text, JSON/JSONL or parquet files through `datasets`.

Formats: `text` (documents tokenized with BOS/EOS and packed into fixed blocks),
`prompt_completion` (loss on the completion only), `chat` (the tokenizer's chat template,
loss on assistant turns).
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from lowbit.errors import ConfigError, InputError
from lowbit.methods.data_gen.dataset import GeneratedDataset
from lowbit.recipes.config import DataConfig
from lowbit.utils.batching import IGNORE_INDEX

_LOADERS = {".txt": "text", ".text": "text", ".md": "text", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}


def _load_rows(files: list[str], fmt: str):
    from datasets import load_dataset
    if not files:
        raise ConfigError("data.train_files is empty: give at least one .txt/.json/.jsonl/.parquet file")
    kinds = set()
    for f in files:
        if not Path(f).exists():
            raise InputError(f"data file {f} does not exist (run scripts/prepare_data.py for the demo corpus)")
        ext = Path(f).suffix.lower()
        if ext not in _LOADERS:
            raise ConfigError(f"data file {f}: unsupported extension {ext!r}; use one of {', '.join(_LOADERS)}")
        kinds.add(_LOADERS[ext])
    if len(kinds) > 1:
        raise ConfigError(f"data files mix kinds {sorted(kinds)}; use one file type per split")
    kind = kinds.pop()
    if kind == "text" and fmt != "text":
        raise ConfigError(f"data.format={fmt!r} needs JSON/JSONL/parquet rows, got text files")
    kw = {"sample_by": "document"} if kind == "text" else {}
    return load_dataset(kind, data_files=[str(f) for f in files], split="train", **kw)


def _need(rows, field: str, key: str):
    if field not in rows.column_names:
        raise InputError(f"data column '{field}' (data.{key}) not found; available columns: "
                         f"{', '.join(rows.column_names)}")


def _pack_text(rows, tok, cfg: DataConfig) -> list[dict]:
    """Documents → one token stream (each document ends with EOS) → blocks that each start
    with BOS: models like Gemma are far off-distribution on a window without it."""
    _need(rows, cfg.text_field, "text_field")
    bos = [tok.bos_token_id] if tok.bos_token_id is not None else []
    eos = [tok.eos_token_id] if tok.eos_token_id is not None else []
    docs = [tok(doc, add_special_tokens=False).input_ids for doc in rows[cfg.text_field]]
    if not cfg.packing:  # one example per document, truncated to the block length
        keep = cfg.max_seq_len - len(bos) - len(eos)
        return [{"input_ids": bos + d[:keep] + eos, "labels": bos + d[:keep] + eos} for d in docs if d]
    stream = [t for d in docs for t in d + eos]
    step = cfg.max_seq_len - len(bos)
    if len(stream) < step:
        raise InputError(f"data has {len(stream)} tokens, fewer than one block of data.max_seq_len={cfg.max_seq_len}")
    blocks = [bos + stream[i:i + step] for i in range(0, len(stream) - step + 1, step)]
    return [{"input_ids": b, "labels": list(b)} for b in blocks]


def _prompt_completion(rows, tok, cfg: DataConfig) -> list[dict]:
    _need(rows, cfg.prompt_field, "prompt_field")
    _need(rows, cfg.completion_field, "completion_field")
    out = []
    bos = [tok.bos_token_id] if tok.bos_token_id is not None else []
    eos = [tok.eos_token_id] if tok.eos_token_id is not None else []
    for p, c in zip(rows[cfg.prompt_field], rows[cfg.completion_field]):
        pi = bos + tok(p, add_special_tokens=False).input_ids
        ci = tok(c, add_special_tokens=False).input_ids + eos
        ids = (pi + ci)[:cfg.max_seq_len]
        labels = ([IGNORE_INDEX] * len(pi) + ci)[:cfg.max_seq_len]
        if any(x != IGNORE_INDEX for x in labels):
            out.append({"input_ids": ids, "labels": labels})
    return out


def _chat(rows, tok, cfg: DataConfig) -> list[dict]:
    _need(rows, cfg.messages_field, "messages_field")
    if not getattr(tok, "chat_template", None):
        raise ConfigError("data.format=chat needs a tokenizer with a chat template")
    out = []
    for msgs in rows[cfg.messages_field]:
        ids = tok.apply_chat_template(msgs, tokenize=True, return_dict=False)
        labels = [IGNORE_INDEX] * len(ids)
        for i, m in enumerate(msgs):
            if m["role"] != "assistant":
                continue
            # the assistant turn spans from the end of the prompt-so-far to the end of this turn
            start = len(tok.apply_chat_template(msgs[:i], tokenize=True, add_generation_prompt=True,
                                                return_dict=False))
            end = len(tok.apply_chat_template(msgs[:i + 1], tokenize=True, return_dict=False))
            labels[start:end] = ids[start:end]
        ids, labels = ids[:cfg.max_seq_len], labels[:cfg.max_seq_len]
        if any(x != IGNORE_INDEX for x in labels):
            out.append({"input_ids": ids, "labels": labels})
    return out


_BUILDERS = {"text": _pack_text, "prompt_completion": _prompt_completion, "chat": _chat}


def build_examples(files: list[str], tok, cfg: DataConfig, with_topk: bool = False) -> list[dict]:
    if cfg.format == "generated":
        return _generated(files, tok, cfg, with_topk)
    return _BUILDERS[cfg.format](_load_rows(files, cfg.format), tok, cfg)


def _generated(dirs: list[str], tok, cfg: DataConfig, with_topk: bool) -> list[dict]:
    """Sequences written by `lowbit generate` (each directory holds a manifest and shards)."""
    out = []
    for d in dirs:
        ds = GeneratedDataset(d, tok, cfg.max_seq_len, with_topk=with_topk)
        out.extend(ds[i] for i in range(len(ds)))
    return out


def build_datasets(tok, cfg: DataConfig, seed: int = 0, with_topk: bool = False) -> tuple[list[dict], list[dict]]:
    """(train examples, eval examples); eval from data.eval_files or a held-out fraction.
    With data.format=generated the eval files are plain text (held-out real text)."""
    train = build_examples(cfg.train_files, tok, cfg, with_topk)
    if cfg.eval_files:
        evals = build_examples(cfg.eval_files, tok, dataclasses.replace(cfg, format="text")
                               if cfg.format == "generated" else cfg)
    elif cfg.eval_fraction > 0:
        g = torch.Generator().manual_seed(seed)
        order = torch.randperm(len(train), generator=g).tolist()
        n_eval = max(1, int(len(train) * cfg.eval_fraction))
        evals = [train[i] for i in order[:n_eval]]
        train = [train[i] for i in order[n_eval:]]
    else:
        evals = []
    if cfg.max_train_blocks:
        train = train[:cfg.max_train_blocks]
    if cfg.max_eval_blocks:
        evals = evals[:cfg.max_eval_blocks]
    if not train:
        raise InputError("no training examples were produced from data.train_files")
    return train, evals
