"""Training and eval data through `datasets`: validated rows → tokenized → packed → mixed.

Sources are local JSON/JSONL/parquet/text files and `datasets.save_to_disk` folders (`rows`
checks every row and names a bad one by file and line). Tokenization is a cached `datasets.map`
(`data.num_proc`), packing is TRL's best-fit-decreasing packer (`trl.pack_dataset`) with the
documents kept apart by the collator's attention mask, or BOS-led fixed blocks for plain text;
several sources are interleaved by weight. `lowbit generate` output (format `generated`) is
read by its own dataset class. DPO/ORPO/GRPO rows stay untokenized: TRL's trainers tokenize them.
"""
from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import datasets
import torch
from trl import pack_dataset

from lowbit.errors import ConfigError, InputError, LowbitError
from lowbit.methods.data_gen.dataset import GeneratedDataset
from lowbit.recipes.config import DataConfig, DatasetSpec
from lowbit.recipes.rows import BadRows, Fields, iter_rows
from lowbit.recipes.tokenize import BATCH_TOKENIZERS, ROW_TOKENIZERS, has_labels, text_document, wrap_blocks

log = logging.getLogger("lowbit")
UNTOKENIZED = ("preference", "prompt")  # TRL tokenizes these itself


def _fields(cfg: DataConfig, spec: DatasetSpec | None = None) -> Fields:
    pick = lambda name: (getattr(spec, name, None) if spec else None) or getattr(cfg, name)  # noqa: E731
    return Fields(text=pick("text_field"), prompt=pick("prompt_field"), completion=pick("completion_field"),
                  messages=pick("messages_field"), chosen=cfg.chosen_field, rejected=cfg.rejected_field)


def _stamp(files) -> list:
    """What the cache key of a source depends on: each file's path, size and modification time."""
    out = []
    for f in files:
        st = Path(f).stat() if Path(f).exists() else None
        out.append((str(f), st.st_size if st else -1, st.st_mtime_ns if st else -1))
    return out


def _gen(files, fmt, fields, on_bad_rows, tok, stamp):
    """Rows for `Dataset.from_generator`; skipped rows are yielded as markers (`_bad`) so the count survives caching."""
    empty = dict.fromkeys(_features(fmt))
    for f in files:
        bad = BadRows()
        for row in iter_rows(f, fmt, fields, on_bad_rows, tok, bad):
            yield {**row, "_bad": None}
        for i in range(bad.count):  # BadRows keeps the first messages; the rest are counted
            yield {**empty, "_bad": bad.examples[i] if i < len(bad.examples) else f"{f}: another bad row"}


def _features(fmt: str) -> datasets.Features:
    """The columns of a format's validated rows (chat keeps the template's rendering, made while checking)."""
    text = datasets.Value("string")
    cols = {"text": {"text": text}, "prompt_completion": {"prompt": text, "completion": text},
            "chat": {"messages": datasets.List({"role": text, "content": text}), "rendered": text},
            "preference": {"prompt": text, "chosen": text, "rejected": text}, "prompt": {"prompt": text}}[fmt]
    return datasets.Features({**cols, "_bad": text})


def source_rows(files: list[str], fmt: str, cfg: DataConfig, tok, spec: DatasetSpec | None = None,
                streaming: bool = False):
    """Validated rows of one source as a `datasets` dataset with one column per field of its format."""
    if not files:
        raise ConfigError("data.train_files is empty: give at least one .txt/.json/.jsonl/.parquet file or folder")
    if fmt == "chat" and not getattr(tok, "chat_template", None):
        raise ConfigError("data.format=chat needs a tokenizer with a chat template, and this one has none; set "
                          "model.tokenizer to a folder whose tokenizer has one (or use data.format=prompt_completion)")
    kw = dict(files=[str(f) for f in files], fmt=fmt, fields=_fields(cfg, spec), on_bad_rows=cfg.on_bad_rows,
              tok=tok if fmt == "chat" else None, stamp=_stamp(files))
    if streaming:
        ds = datasets.IterableDataset.from_generator(_gen, gen_kwargs=kw, features=_features(fmt))
        return ds.filter(lambda b: b is None, input_columns="_bad").remove_columns("_bad")
    try:
        ds = datasets.Dataset.from_generator(_gen, gen_kwargs=kw, features=_features(fmt))
    except datasets.exceptions.DatasetGenerationError as e:
        if isinstance(e.__cause__, LowbitError):  # ours, raised inside the generator: one line, no traceback
            raise e.__cause__ from None
        raise
    bad = ds.filter(lambda b: b is not None, input_columns="_bad")
    if len(bad):
        shown = "; ".join(bad["_bad"][:3])
        print(f"skipped {len(bad)} bad data rows (data.on_bad_rows=skip), e.g. {shown}", flush=True)
        ds = ds.filter(lambda b: b is None, input_columns="_bad")
    return ds.remove_columns("_bad")


def _strategy(cfg: DataConfig, fmt: str) -> str | None:
    if not cfg.packing:
        return None
    if cfg.packing_strategy == "auto":
        return "wrapped" if fmt == "text" else "bfd"
    return cfg.packing_strategy


def tokenize(rows, fmt: str, tok, cfg: DataConfig):
    """input_ids/labels per example, packed as data.packing says."""
    cols = [c for c in _features(fmt) if c != "_bad"]  # (an IterableDataset after map() may not know its columns)
    strategy = _strategy(cfg, fmt)
    mp = {} if isinstance(rows, datasets.IterableDataset) else {"num_proc": cfg.num_proc}
    if fmt == "text" and strategy == "wrapped":  # one stream over the whole source, as one batch
        return rows.map(wrap_blocks, batched=True, batch_size=None, remove_columns=cols,
                        fn_kwargs={"tok": tok, "block": cfg.max_seq_len})
    if fmt == "text":
        ds = rows.map(text_document, remove_columns=cols, fn_kwargs={"tok": tok, "max_len": None if strategy else
                                                                    cfg.max_seq_len}, **mp)
    else:
        batched = fmt in BATCH_TOKENIZERS
        fn = BATCH_TOKENIZERS[fmt] if batched else ROW_TOKENIZERS[fmt]
        ds = rows.map(fn, batched=batched, remove_columns=cols, fn_kwargs={"tok": tok, "max_len": cfg.max_seq_len},
                      **mp)
        if not batched:  # the batched tokenizers drop unlabelled rows themselves
            ds = ds.filter(has_labels, **mp)
    if strategy is None:
        return ds
    # long documents continue in the next row (bfd_split); a conversation or completion is never split
    return pack_dataset(ds, cfg.max_seq_len, "bfd_split" if fmt == "text" else "bfd")


def _mix(parts: list, weights: list[float], seed: int):
    if len(parts) == 1:
        return parts[0]
    total = sum(weights)
    return datasets.interleave_datasets(parts, probabilities=[w / total for w in weights], seed=seed,
                                        stopping_strategy="first_exhausted")


def _specs(cfg: DataConfig) -> list[DatasetSpec]:
    return cfg.datasets or [DatasetSpec(files=list(cfg.train_files), format=cfg.format)]


def train_dataset(tok, cfg: DataConfig, seed: int = 0):
    """The training set of a run: every source validated, tokenized (unless TRL does it) and mixed."""
    parts = []
    for spec in _specs(cfg):
        fmt = spec.format or cfg.format
        rows = source_rows(spec.files, fmt, cfg, tok, spec, streaming=cfg.streaming)
        parts.append(rows if fmt in UNTOKENIZED else tokenize(rows, fmt, tok, cfg))
    return _mix(parts, [s.weight for s in _specs(cfg)], seed)


def build_examples(files: list[str], tok, cfg: DataConfig, with_topk: bool = False) -> list[dict]:
    """Tokenized examples of `files` as a list (eval sets, tests, benchmarks)."""
    if cfg.format == "generated":
        return _generated(files, tok, cfg, with_topk)
    if cfg.format in UNTOKENIZED:
        return list(source_rows(files, cfg.format, cfg, tok))
    return list(tokenize(source_rows(files, cfg.format, cfg, tok), cfg.format, tok, cfg))


def _generated(dirs: list[str], tok, cfg: DataConfig, with_topk: bool) -> list[dict]:
    """Sequences written by `lowbit generate` (each directory holds a manifest and shards)."""
    out = []
    for d in dirs:
        ds = GeneratedDataset(d, tok, cfg.max_seq_len, with_topk=with_topk)
        out.extend(ds[i] for i in range(len(ds)))
    return out


def _eval_config(cfg: DataConfig) -> DataConfig:
    """The eval set's own settings: never BFD-packed (perplexity is scored one example per row); text keeps its
    BOS-led wrapped blocks; generated, preference and prompt runs are scored on plain held-out text."""
    fmt = "text" if cfg.format in ("generated", *UNTOKENIZED) else cfg.format  # held-out real text
    return dataclasses.replace(cfg, format=fmt, packing=cfg.packing and fmt == "text", packing_strategy="wrapped")


def build_datasets(tok, cfg: DataConfig, seed: int = 0, with_topk: bool = False):
    """(train set, eval examples as a list); eval from data.eval_files or a held-out fraction of train.
    With data.format generated, preference or prompt the eval files are plain text (held-out perplexity)."""
    if cfg.format == "generated":
        train = _generated(cfg.train_files, tok, cfg, with_topk)
    else:
        train = train_dataset(tok, cfg, seed)
    evals = []
    if cfg.eval_files:
        evals = build_examples(cfg.eval_files, tok, _eval_config(cfg))
    elif cfg.eval_fraction > 0:
        if cfg.streaming:
            raise ConfigError("data.eval_fraction needs the whole training set; with data.streaming=true give "
                              "data.eval_files")
        g = torch.Generator().manual_seed(seed)
        order = torch.randperm(len(train), generator=g).tolist()
        n_eval = max(1, int(len(train) * cfg.eval_fraction))
        evals = [train[i] for i in order[:n_eval]]
        train = [train[i] for i in order[n_eval:]] if isinstance(train, list) else train.select(order[n_eval:])
    if cfg.max_train_blocks:
        train = train.take(cfg.max_train_blocks) if isinstance(train, datasets.IterableDataset) else \
            train[:cfg.max_train_blocks] if isinstance(train, list) else train.select(range(min(len(train),
                                                                                                  cfg.max_train_blocks)))
    if cfg.max_eval_blocks:
        evals = evals[:cfg.max_eval_blocks]
    if not isinstance(train, datasets.IterableDataset) and len(train) == 0:
        raise InputError("no training examples were produced from data.train_files")
    if isinstance(train, list):  # generated shards (with the teacher's top-k tensors): TRL's trainers take datasets
        train = datasets.Dataset.from_list(train).with_format("torch")
    return train, evals
