"""Atomic file writes: a crash never leaves a half-written file under the final name."""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

from lowbit.errors import ConfigError, InputError


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, overwrite: bool = True):
    """Yield a temp path beside `path`; rename it over `path` only if the block succeeds."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} already exists; pass --overwrite (overwrite=True) to replace it")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_text(path, text: str, overwrite: bool = True) -> None:
    with atomic_path(path, overwrite) as tmp:
        Path(tmp).write_text(text)


def write_json(path, obj, overwrite: bool = True) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n", overwrite)


def save_safetensors(tensors: dict[str, torch.Tensor], path, metadata: dict[str, str] | None = None,
                     overwrite: bool = True) -> None:
    """safetensors.save_file through a temp file; tensors made contiguous and unshared."""
    from safetensors.torch import save_file
    clean, seen = {}, set()
    for k, v in tensors.items():
        v = v.detach().contiguous()
        ptr = v.untyped_storage().data_ptr()
        # safetensors refuses tensors that share memory (views, or one cached code book stored twice)
        clean[k] = v.clone() if _shares(v) or (ptr in seen and v.numel()) else v
        seen.add(ptr)
    with atomic_path(path, overwrite) as tmp:
        save_file(clean, str(tmp), metadata=metadata)


def _shares(t: torch.Tensor) -> bool:
    return t.untyped_storage().nbytes() != t.numel() * t.element_size()


@contextlib.contextmanager
def atomic_dir(path, overwrite: bool = False):
    """Yield a temp folder beside `path`; it replaces `path` only if the block succeeds."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} already exists; pass --overwrite (overwrite=True) to replace it")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield tmp
        for f in tmp.rglob("*"):
            if f.is_file():
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
        old = None
        if path.exists():  # move the old one aside first so the final name is never half-filled
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".old", dir=path.parent))
            os.replace(path, old / "x")
        os.replace(tmp, path)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def read_yaml(path: str | Path, what: str = "config file"):
    """A YAML file's tree ({} when empty); a missing file or bad YAML is one clear error."""
    import yaml

    path = Path(path)
    if not path.exists():
        raise InputError(f"{what} {path} does not exist")
    try:
        return yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path} is not valid YAML: {e}") from None
