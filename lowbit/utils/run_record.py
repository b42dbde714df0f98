"""`lowbit_run.json`: what a training run was, written by the trainer, read by merge, export and generate.

One typed record instead of a dict literal read back with scattered defaults: the base model it
trained on (path, content hash, architecture), the resolved config, the metrics, the engine and,
for LoftQ runs, the hash of the base file the adapters were trained against.
"""
from __future__ import annotations

import dataclasses
import json
import os
import platform
from dataclasses import dataclass, field
from pathlib import Path

from lowbit import __version__
from lowbit.errors import InputError
from lowbit.utils.io import write_json

RUN_FILE = "lowbit_run.json"
FORMAT = "lowbit.run"
VERSION = 1


@dataclass
class BaseModelRecord:
    path: str
    sha256: str = ""          # lowbit.utils.hashing.model_folder_hash of the folder
    model_type: str = ""


@dataclass
class EngineRecord:
    name: str = "single"
    zero_stage: int | None = None
    world_size: int = 1
    wrapper: str = ""


@dataclass
class RunRecord:
    base_model: BaseModelRecord
    config: dict = field(default_factory=dict)       # RunConfig.to_dict() as resolved
    metrics: dict = field(default_factory=dict)
    engine: EngineRecord = field(default_factory=EngineRecord)
    loftq: dict | None = None                         # LoftQ summary + base_file / base_sha256
    lowbit_version: str = __version__
    torch: str = ""
    python: str = field(default_factory=platform.python_version)
    world_size: int = field(default_factory=lambda: int(os.environ.get("WORLD_SIZE", "1")))
    format: str = FORMAT
    version: int = VERSION

    @property
    def quant(self) -> dict:
        """The base's 4-bit settings (the keys `load_model` takes), with the defaults of the config schema."""
        q = (self.config.get("model") or {}).get("quant") or {}
        return {"quant_type": q.get("quant_type", "nf4"), "blocksize": q.get("blocksize", 64),
                "double_quant": q.get("double_quant", True), "skip_modules": tuple(q.get("skip_modules", ["lm_head"]))}

    @property
    def loftq_base_sha256(self) -> str | None:
        return (self.loftq or {}).get("base_sha256")

    def write(self, folder) -> Path:
        if not self.torch:
            import torch
            self.torch = torch.__version__
        write_json(Path(folder) / RUN_FILE, dataclasses.asdict(self))
        return Path(folder) / RUN_FILE

    @classmethod
    def read(cls, path) -> RunRecord:
        """From a run folder or the file itself; a corrupt or foreign file is one clear error."""
        path = Path(path)
        path = path / RUN_FILE if path.is_dir() else path
        try:
            d = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
            raise InputError(f"{path} is not a readable lowbit run record ({e}); re-run training or delete it") from None
        if not isinstance(d, dict) or d.get("format") != FORMAT or "base_model" not in d:
            raise InputError(f"{path} is not a lowbit run record (format {d.get('format') if isinstance(d, dict) else d!r})")
        if d.get("version", 0) > VERSION:
            raise InputError(f"{path} was written by a newer lowbit (record version {d['version']}); update lowbit")
        known = {f.name for f in dataclasses.fields(cls)}
        d = {k: v for k, v in d.items() if k in known}
        d["base_model"] = BaseModelRecord(**d["base_model"])
        d["engine"] = EngineRecord(**(d.get("engine") or {}))
        return cls(**d)

    @classmethod
    def find(cls, *folders) -> RunRecord | None:
        """The record in the first of `folders` that has one (an adapter dir, then its run dir)."""
        for d in folders:
            if (Path(d) / RUN_FILE).exists():
                return cls.read(Path(d) / RUN_FILE)
        return None
