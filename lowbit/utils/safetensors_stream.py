"""Read safetensors tensors one at a time with plain reads (no mmap).

safe_open memory-maps the file, and every page it touches stays in this process's RSS
until unmapped; reading each tensor into its own buffer keeps peak memory at the model
being built plus one tensor.
"""
from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Iterator

import torch

from lowbit.errors import InputError

_DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "F64": torch.float64,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool}


def read_header(path: Path) -> tuple[dict, int]:
    """(header without __metadata__, byte offset where tensor data starts)."""
    try:
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(n))
    except (OSError, struct.error, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InputError(f"{path} is not a readable safetensors file ({e}); re-save or re-download it") from e
    header.pop("__metadata__", None)
    return header, 8 + n


def iter_tensors(path: str | Path, keys=None) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (name, tensor) in file order; each tensor is a fresh CPU buffer."""
    path = Path(path)
    header, base = read_header(path)
    items = sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0])
    with open(path, "rb", buffering=0) as f:
        for name, info in items:
            if keys is not None and name not in keys:
                continue
            if info["dtype"] not in _DTYPES:
                raise InputError(f"{path}: tensor {name} has unsupported dtype {info['dtype']}")
            start, end = info["data_offsets"]
            t = torch.empty(info["shape"], dtype=_DTYPES[info["dtype"]])
            buf = t.view(-1).view(torch.uint8).numpy() if t.numel() else None
            if buf is not None:
                f.seek(base + start)
                if f.readinto(memoryview(buf)) != end - start:
                    raise InputError(f"{path} is truncated (tensor {name}); re-save or re-download it")
            yield name, t


def tensor_names(path: str | Path) -> list[str]:
    return list(read_header(Path(path))[0])
