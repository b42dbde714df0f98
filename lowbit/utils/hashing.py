"""Content hashes that identify files and model folders (recorded in run records and manifests)."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

from lowbit.utils.safetensors_stream import read_header


def file_sha256(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def model_folder_hash(path) -> str:
    """sha256 of config.json + every safetensors header: identifies a model folder without reading its weights."""
    path = Path(path)
    h = hashlib.sha256((path / "config.json").read_bytes())
    for f in sorted(path.glob("*.safetensors")):
        header, _ = read_header(f)
        h.update(json.dumps(header, sort_keys=True).encode())
    return h.hexdigest()
