"""Importance matrices for GGUF quantization: computed from text like `llama-imatrix`, or read from its files.

llama.cpp's quantizers weigh each column j of a weight by the mean of x_j² over the tokens the layer saw
(`quant_weights`). `compute_imatrix` runs the dense model over calibration text with a hook on every
Linear and returns {gguf tensor name: mean x²}; `read_imatrix` reads llama-imatrix's output, either the
GGUF format (`<name>.in_sum2` / `<name>.counts`) or the legacy `.dat`.
"""
from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from lowbit.errors import InputError


def compute_imatrix(model: nn.Module, tok, text_file, gguf_names: dict[str, str], n_ctx: int = 512,
                    max_chunks: int = 64, progress: bool = True) -> dict[str, torch.Tensor]:
    """{gguf name: per-column mean x²} over `text_file` cut into `n_ctx`-token chunks (BOS first, as llama-imatrix)."""
    path = Path(text_file)
    if not path.exists():
        raise InputError(f"calibration text {path} does not exist")
    ids = tok(path.read_text(), add_special_tokens=False).input_ids
    bos = [tok.bos_token_id] if tok.bos_token_id is not None else []
    step = n_ctx - len(bos)
    chunks = [bos + ids[i:i + step] for i in range(0, len(ids) - step + 1, step)][:max_chunks]
    if not chunks:
        raise InputError(f"calibration text {path} has {len(ids)} tokens, fewer than one chunk of {n_ctx}")
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}
    hooks = []
    for hf_name, mod in model.named_modules():
        gname = gguf_names.get(f"{hf_name}.weight")
        if isinstance(mod, nn.Linear) and gname is not None:
            def hook(m, args, out, gname=gname):
                x = args[0].detach().float().reshape(-1, args[0].shape[-1])
                sums[gname] = sums.get(gname, 0) + (x * x).sum(0)
                counts[gname] = counts.get(gname, 0) + x.shape[0]
            hooks.append(mod.register_forward_hook(hook))
    try:
        with torch.no_grad():
            for c in tqdm(chunks, desc="imatrix", unit="chunk", disable=not progress):
                model(input_ids=torch.tensor([c]))
    finally:
        for h in hooks:
            h.remove()
    return {n: (sums[n] / counts[n]).float() for n in sums}


def read_imatrix(path) -> dict[str, torch.Tensor]:
    """llama-imatrix output → {gguf name: per-column mean x²}."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"imatrix file {path} does not exist")
    with open(path, "rb") as f:
        magic = f.read(4)
    return _read_gguf_imatrix(path) if magic == b"GGUF" else _read_dat_imatrix(path)


def _read_gguf_imatrix(path: Path) -> dict[str, torch.Tensor]:
    import gguf
    tensors = {t.name: np.asarray(t.data, dtype=np.float32) for t in gguf.GGUFReader(str(path)).tensors}
    out = {}
    for name, s2 in tensors.items():
        if not name.endswith(".in_sum2"):
            continue
        base = name.removesuffix(".in_sum2")
        counts = tensors.get(f"{base}.counts")
        if counts is None:
            raise InputError(f"{path}: {base}.in_sum2 has no {base}.counts")
        n = s2.size // max(counts.size, 1)
        out[base] = torch.from_numpy((s2.reshape(counts.size, n) / np.maximum(counts.reshape(-1, 1), 1)).reshape(-1))
    return out


def _read_dat_imatrix(path: Path) -> dict[str, torch.Tensor]:
    out = {}
    try:
        with open(path, "rb") as f:
            (n,) = struct.unpack("<i", f.read(4))
            for _ in range(n):
                (ln,) = struct.unpack("<i", f.read(4))
                name = f.read(ln).decode()
                ncall, nval = struct.unpack("<ii", f.read(8))
                vals = np.frombuffer(f.read(4 * nval), dtype=np.float32)
                out[name] = torch.from_numpy(vals / max(ncall, 1))
    except (struct.error, UnicodeDecodeError, ValueError) as e:
        raise InputError(f"{path} is not a llama-imatrix file (GGUF or .dat): {e}") from None
    return out
