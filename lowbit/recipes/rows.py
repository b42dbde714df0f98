"""Rows from local files, each checked against its data format; a bad row is named by file and line.

`datasets`' own JSON reader stops on a broken line with a pyarrow traceback that names neither the
file nor the line, so JSON Lines are read here line by line (the `json` module, in one pass) and
every row is validated before any tokenizer or model work: a malformed line, a message without
role/content, a role order the chat template rejects, an empty completion. `on_bad_rows=error`
stops on the first with one line; `skip` drops them and reports how many (and the first few).
JSON arrays, parquet and `datasets.save_to_disk` folders are read with `datasets` and checked
row by row the same way (numbered from 1); text files are one document each.
"""
from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from lowbit.errors import ConfigError, InputError

ROLES = ("system", "user", "assistant", "tool")
TEXT_SUFFIXES = (".txt", ".text", ".md")
JSON_SUFFIXES = (".json", ".jsonl")


class BadRow(ValueError):
    """One row that does not fit its format; the message says what is wrong with it."""


@dataclass
class Fields:
    """Column names per format (TRL's names by default)."""
    text: str = "text"
    prompt: str = "prompt"
    completion: str = "completion"
    messages: str = "messages"
    chosen: str = "chosen"
    rejected: str = "rejected"


@dataclass
class BadRows:
    """What was skipped: a count and the first few messages, for the run record and the log line."""
    count: int = 0
    examples: list[str] = field(default_factory=list)

    def add(self, where: str) -> None:
        self.count += 1
        if len(self.examples) < 5:
            self.examples.append(where)


def kind_of(path: Path) -> str:
    if path.is_dir():
        if not (path / "dataset_info.json").exists() and not (path / "state.json").exists():
            raise InputError(f"data folder {path} is not a `datasets.save_to_disk` folder (no dataset_info.json); "
                             "give files or such a folder")
        return "disk"
    suffix = path.suffix.lower()
    if suffix in TEXT_SUFFIXES:
        return "text"
    if suffix == ".jsonl" or (suffix == ".json" and _is_json_lines(path)):
        return "jsonl"
    if suffix == ".json":
        return "json"
    if suffix == ".parquet":
        return "parquet"
    raise ConfigError(f"data file {path}: unsupported extension {suffix!r}; use .txt, .json, .jsonl, .parquet or a "
                      "datasets.save_to_disk folder")


def _is_json_lines(path: Path) -> bool:
    with open(path, "rb") as f:
        head = f.read(1 << 12).lstrip()
    return not head.startswith(b"[")


def _raw_rows(path: Path, kind: str) -> Iterator[tuple[int, object]]:
    """(1-based line or row number, parsed row) — a row that does not parse is a BadRow."""
    if kind == "jsonl":
        with open(path, encoding="utf-8", errors="strict") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    yield n, json.loads(line)
                except json.JSONDecodeError as e:
                    yield n, BadRow(f"not valid JSON ({e.msg} at column {e.colno})")
        return
    if kind == "json":
        try:
            rows = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise InputError(f"{path}: not valid JSON ({e.msg} at line {e.lineno} column {e.colno})") from None
        if not isinstance(rows, list):
            raise InputError(f"{path}: a .json data file must hold a list of rows (or use JSON Lines, .jsonl)")
        yield from enumerate(rows, 1)
        return
    if kind == "text":
        yield 1, {"text": path.read_text()}
        return
    import datasets
    ds = datasets.load_from_disk(str(path)) if kind == "disk" else \
        datasets.load_dataset("parquet", data_files=str(path), split="train")
    if isinstance(ds, datasets.DatasetDict):
        ds = ds["train"] if "train" in ds else next(iter(ds.values()))
    yield from enumerate(ds, 1)


def _missing(row: dict, key: str) -> BadRow:
    return BadRow(f"no '{key}' field (fields: {', '.join(row) or 'none'}; name the column with the data.*_field keys)")


def _text(row: dict, key: str, allow_empty: bool = False) -> str:
    if key not in row:
        raise _missing(row, key)
    v = row[key]
    if not isinstance(v, str):
        raise BadRow(f"'{key}' must be a string, got {type(v).__name__}")
    if not allow_empty and not v.strip():
        raise BadRow(f"'{key}' is empty")
    return v


def _messages(row: dict, key: str, tok=None) -> list[dict]:
    if key not in row:
        raise _missing(row, key)
    msgs = row[key]
    if not isinstance(msgs, list) or not msgs:
        raise BadRow(f"'{key}' must be a non-empty list of {{role, content}} messages")
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise BadRow(f"message {i} has no role/content (got {m!r:.80})")
        if m["role"] not in ROLES:
            raise BadRow(f"message {i} has role {m['role']!r}; roles are {', '.join(ROLES)}")
        if not isinstance(m["content"], str):
            raise BadRow(f"message {i} content must be a string")
    return [{"role": m["role"], "content": m["content"]} for m in msgs]


def _render(msgs: list[dict], tok) -> str | None:
    """The conversation through the chat template (kept, so tokenization does not render it again)."""
    if tok is None:
        return None
    try:
        return tok.apply_chat_template(msgs, tokenize=False)
    except Exception as e:  # jinja's raise_exception: the template's own rule (e.g. roles must alternate)
        raise BadRow(f"the chat template rejects this conversation: {str(e).splitlines()[0][:160]}") from None


def check_row(row, fmt: str, fields: Fields, tok=None) -> dict:
    """The row reduced to the columns its format reads; raises BadRow naming what is wrong."""
    if isinstance(row, BadRow):
        raise row
    if not isinstance(row, dict):
        raise BadRow(f"a row must be a JSON object, got {type(row).__name__}")
    if fmt == "text":
        return {"text": _text(row, fields.text)}
    if fmt == "prompt_completion":
        return {"prompt": _text(row, fields.prompt, allow_empty=True), "completion": _text(row, fields.completion)}
    if fmt == "chat":
        msgs = _messages(row, fields.messages, tok)
        if not any(m["role"] == "assistant" for m in msgs):
            raise BadRow("no assistant turn: nothing to train on")
        return {"messages": msgs, "rendered": _render(msgs, tok)}
    if fmt == "preference":
        return {"prompt": _text(row, fields.prompt, allow_empty=True), "chosen": _text(row, fields.chosen),
                "rejected": _text(row, fields.rejected)}
    if fmt == "prompt":
        return {"prompt": _text(row, fields.prompt)}
    raise ConfigError(f"data.format {fmt!r} has no row reader")


def iter_rows(path, fmt: str, fields: Fields, on_bad_rows: str = "error", tok=None,
              bad: BadRows | None = None) -> Iterator[dict]:
    """Validated rows of one file; bad ones stop the run (`error`) or are counted in `bad` (`skip`)."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"data file {path} does not exist (run scripts/prepare_data.py for the demo corpus)")
    kind = kind_of(path)
    if kind == "text" and fmt != "text":
        raise ConfigError(f"data.format={fmt!r} needs JSON/JSONL/parquet rows, got the text file {path}")
    unit = "line" if kind == "jsonl" else "row"
    for n, raw in _raw_rows(path, kind):
        try:
            yield check_row(raw, fmt, fields, tok)
        except BadRow as e:
            where = f"{path}:{n}: {e}" if kind == "jsonl" else f"{path} {unit} {n}: {e}"
            if on_bad_rows == "error":
                raise InputError(f"bad data row — {where} (fix it, or set data.on_bad_rows=skip)") from None
            if bad is not None:
                bad.add(where)
