"""Compile the CPU backend once (cached) and register it for the CPU dispatch key.

Where no compiler works, lowbit keeps the pure-torch reference and says so in one line.
LOWBIT_KERNELS=reference skips the build (used by tests to compare backends).
"""
from __future__ import annotations

import os
import warnings
from pathlib import Path

_HERE = Path(__file__).resolve().parent
_STATE: dict = {}


def cache_dir() -> Path:
    root = Path(os.environ.get("LOWBIT_CACHE", Path.home() / ".cache" / "lowbit"))
    import torch
    d = root / f"cpu-ext-torch{torch.__version__.split('+')[0]}"
    d.mkdir(parents=True, exist_ok=True)
    return d


def load() -> bool:
    """True when the C++ CPU backend is registered."""
    if "ok" in _STATE:
        return _STATE["ok"]
    _STATE["ok"] = False
    if os.environ.get("LOWBIT_KERNELS", "") == "reference":
        return False
    try:
        from torch.utils.cpp_extension import load as load_ext
        load_ext(name="lowbit_nf4_cpu", sources=[str(_HERE / "nf4_cpu.cpp")], build_directory=str(cache_dir()),
                 extra_cflags=["-O3", "-fopenmp", "-std=c++17"], extra_ldflags=["-fopenmp"],
                 extra_include_paths=[str(_HERE.parent / "cuda")], is_python_module=False, verbose=False)
        _STATE["ok"] = True
    except Exception as e:  # no compiler / headers: the reference still works
        warnings.warn(f"lowbit: CPU kernels unavailable ({type(e).__name__}: {str(e).splitlines()[0][:160]}); "
                      "using the pure-torch reference", stacklevel=2)
    return _STATE["ok"]
