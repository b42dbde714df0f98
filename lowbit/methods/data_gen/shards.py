"""Sharded output of `lowbit generate`: JSONL shards of token ids, optional top-k teacher
logits beside each shard (safetensors), and manifest.json describing all of it.

Shard s always holds sequences [s*shard_size, (s+1)*shard_size): a shard is the unit of
work, of atomic writing and of resuming. Each file is written to a temp name and renamed;
the manifest (also atomic) lists a shard only once both of its files are in place, with their
sha256. A run killed at any moment therefore leaves complete shards listed and nothing else
counted, and a restart regenerates only the shards the manifest lacks.
"""
from __future__ import annotations

import errno
import hashlib
import json
from pathlib import Path
from typing import Iterator

import torch

from lowbit.errors import ConfigError, InputError
from lowbit.utils.hashing import file_sha256
from lowbit.utils.io import atomic_path, save_safetensors, write_json

MANIFEST = "manifest.json"
FORMAT = "lowbit-generate/1"


def shard_file(s: int) -> str:
    return f"shard-{s:05d}.jsonl"


def topk_file(s: int) -> str:
    return f"shard-{s:05d}.topk.safetensors"


def read_manifest(out_dir) -> dict:
    path = Path(out_dir) / MANIFEST
    if not path.exists():
        raise InputError(f"{out_dir} has no {MANIFEST}: it is not the output of `lowbit generate` (or nothing has "
                         "been written yet)")
    try:
        m = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InputError(f"{path} is corrupt ({e}); delete {out_dir} and generate again") from None
    if m.get("format") != FORMAT:
        raise InputError(f"{path} has format {m.get('format')!r}, expected {FORMAT!r}")
    return m


def shard_problem(out_dir: Path, entry: dict) -> str | None:
    """Why a listed shard is not usable (missing file, checksum mismatch), or None."""
    for key, sha in (("file", "sha256"), ("topk_file", "topk_sha256")):
        if not entry.get(key):
            continue
        f = out_dir / entry[key]
        if not f.exists():
            return f"{f.name} is missing"
        if file_sha256(f) != entry[sha]:
            return f"{f.name} does not match its sha256 in {MANIFEST} (truncated or modified)"
    return None


def _corrupt_error(out_dir: Path, s: int, problem: str) -> InputError:
    return InputError(f"shard {s} in {out_dir} is corrupt: {problem}. Rerun the same `lowbit generate` command with "
                      f"output.repair=true to regenerate it (generation is deterministic: it gets the same "
                      f"sequences back); the other shards are left as they are")


class ShardWriter:
    """Owns output.dir: checks a previous run's manifest and shards, lists the shards still
    to generate, writes shards and keeps the manifest current."""

    def __init__(self, out_dir, identity: dict, num_sequences: int, shard_size: int, repair: bool = False):
        self.dir = Path(out_dir)
        self.identity, self.num_sequences, self.shard_size = identity, num_sequences, shard_size
        self.entries: dict[int, dict] = {}
        self.metadata: dict = {}
        self._open(repair)

    @property
    def num_shards(self) -> int:
        return -(-self.num_sequences // self.shard_size)

    def shard_range(self, s: int) -> range:
        return range(s * self.shard_size, min((s + 1) * self.shard_size, self.num_sequences))

    def pending(self) -> list[int]:
        return [s for s in range(self.num_shards)
                if s not in self.entries or self.entries[s]["n_seqs"] != len(self.shard_range(s))]

    def _open(self, repair: bool) -> None:
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise InputError(f"output.dir {self.dir} cannot be created ({e.strerror}); choose another") from None
        if not (self.dir / MANIFEST).exists():
            if any(p for p in self.dir.iterdir() if not p.name.startswith(".")):
                raise ConfigError(f"output.dir {self.dir} is not empty and holds no {MANIFEST}; choose an empty or "
                                  "new directory (it is not a previous `lowbit generate` output to resume)")
            return
        m = read_manifest(self.dir)
        self._check_identity(m)
        if m["shard_size"] != self.shard_size:
            raise ConfigError(f"{self.dir} was written with output.shard_size={m['shard_size']}, not "
                              f"{self.shard_size}; keep it to resume, or use a new output.dir")
        if m["num_sequences"] > self.num_sequences:
            raise ConfigError(f"{self.dir} was started for generate.num_sequences={m['num_sequences']}; resuming "
                              f"can only keep or raise it (got {self.num_sequences})")
        self.metadata = m.get("metadata", {})
        for entry in m["shards"]:
            s = entry["shard"]
            problem = shard_problem(self.dir, entry)
            if problem is None:
                self.entries[s] = entry
            elif not repair:
                raise _corrupt_error(self.dir, s, problem)
        for pattern in (".shard-*.tmp", f".{MANIFEST}.*.tmp"):  # left by a kill in the middle of a write
            for tmp in self.dir.glob(pattern):
                tmp.unlink(missing_ok=True)

    def _check_identity(self, m: dict) -> None:
        old, new = _flatten(m["identity"]), _flatten(self.identity)
        diff = [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in sorted(set(old) | set(new))
                if old.get(k) != new.get(k)]
        if diff:
            raise ConfigError(f"{self.dir} was generated with other settings ({'; '.join(diff[:4])}); resuming would "
                              "mix two datasets. Use the original settings, or a new output.dir")

    def write(self, s: int, seqs: list, metadata: dict) -> dict:
        """Write shard s (its sequences in index order) and list it in the manifest."""
        expected = list(self.shard_range(s))
        if [g.index for g in seqs] != expected:
            raise ValueError(f"shard {s} must hold sequences {expected[0]}..{expected[-1]} in order")
        entry = {"shard": s, "file": shard_file(s), "first_index": expected[0], "n_seqs": len(seqs),
                 "n_tokens": sum(len(g.ids) for g in seqs)}
        try:
            if seqs[0].topk_values is not None:
                lengths = torch.tensor([0] + [g.topk_values.shape[0] for g in seqs])
                save_safetensors({"values": torch.cat([g.topk_values for g in seqs]),
                                  "indices": torch.cat([g.topk_indices for g in seqs]),
                                  "offsets": lengths.cumsum(0)}, self.dir / topk_file(s),
                                 metadata={"first_index": str(expected[0])})
                entry["topk_file"] = topk_file(s)
                entry["topk_sha256"] = file_sha256(self.dir / topk_file(s))
            lines = "".join(json.dumps({"index": g.index, "ids": g.ids}, separators=(",", ":")) + "\n" for g in seqs)
            with atomic_path(self.dir / shard_file(s)) as tmp:
                Path(tmp).write_text(lines)
            entry["sha256"] = hashlib.sha256(lines.encode()).hexdigest()
            self.entries[s] = entry
            self.metadata = metadata
            self.write_manifest()
        except OSError as e:
            self.entries.pop(s, None)
            kept = len(self.entries)
            why = "the disk is full" if e.errno in (errno.ENOSPC, errno.EDQUOT) else e.strerror or str(e)
            raise InputError(f"cannot write shard {s} to {self.dir}: {why}. Free space (or fix the path) and rerun "
                             f"the same command: the {kept} shard(s) already written are kept and generation "
                             f"resumes with the missing ones") from None
        return entry

    def write_manifest(self) -> None:
        shards = [self.entries[s] for s in sorted(self.entries)]
        n_done = sum(e["n_seqs"] for e in shards)
        write_json(self.dir / MANIFEST, {
            "format": FORMAT, "identity": self.identity, "metadata": self.metadata,
            "num_sequences": self.num_sequences, "shard_size": self.shard_size, "shards": shards,
            "total_sequences": n_done, "total_tokens": sum(e["n_tokens"] for e in shards),
            "complete": not self.pending()})


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def iter_shards(out_dir, verify: bool = True) -> Iterator[tuple[dict, list[dict]]]:
    """(manifest entry, rows {'index', 'ids'}) for every listed shard, in order."""
    out_dir = Path(out_dir)
    m = read_manifest(out_dir)
    for entry in m["shards"]:
        if verify and (problem := shard_problem(out_dir, entry)):
            raise _corrupt_error(out_dir, entry["shard"], problem)
        try:
            rows = [json.loads(line) for line in (out_dir / entry["file"]).read_text().splitlines()]
        except (json.JSONDecodeError, UnicodeDecodeError, FileNotFoundError) as e:
            raise _corrupt_error(out_dir, entry["shard"], f"unreadable ({e})") from None
        if len(rows) != entry["n_seqs"]:
            raise _corrupt_error(out_dir, entry["shard"], f"{len(rows)} rows, manifest says {entry['n_seqs']}")
        yield entry, rows


def read_sequences(out_dir, verify: bool = True) -> Iterator[list[int]]:
    """Token id lists (first token .. last, no BOS) of every written sequence, in index order."""
    for _, rows in iter_shards(out_dir, verify):
        for r in rows:
            yield r["ids"]


def read_topk(out_dir, entry: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(values fp16 [P, k], indices int32 [P, k], offsets int64 [n_seqs + 1]) of one shard."""
    from safetensors.torch import load_file
    if not entry.get("topk_file"):
        raise InputError(f"{out_dir} holds no top-k logits; generate with output.topk_logits=K")
    t = load_file(str(Path(out_dir) / entry["topk_file"]))
    return t["values"], t["indices"], t["offsets"]
