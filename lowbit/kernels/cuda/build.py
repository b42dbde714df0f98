"""Build the CUDA backend on machines whose torch has CUDA, and register it (CUDA key).

`compile_extension()` is the one build path: `load()` uses it at run time, and
scripts/check_cuda_binding.sh uses it to compile and link the binding against a CUDA torch
on a machine without a GPU (no GPU is needed to build or to load the library).
"""
from __future__ import annotations

import os
import warnings
from pathlib import Path

from lowbit.kernels.cuda import bnb_backend

_HERE = Path(__file__).resolve().parent
SOURCES = ("nf4_kernels.cu", "nf4_cuda_ops.cpp")
# No --use_fast_math: dequantize/quantize must round like the reference (IEEE divide, no
# flush of subnormals); the one a*b + c that must not become an FMA is written with
# __fmul_rn/__fadd_rn in nf4_math.cuh, so the GEMV keeps its FMAs.
CUDA_CFLAGS = ["-O3"]
EXT_NAME = "lowbit_nf4_cuda"


def default_build_dir() -> Path:
    """~/.cache/lowbit/cuda-ext-torch<version>/ (or under $LOWBIT_CACHE), beside the CPU build."""
    import torch
    root = Path(os.environ.get("LOWBIT_CACHE", Path.home() / ".cache" / "lowbit"))
    return root / f"cuda-ext-torch{torch.__version__.split('+')[0]}"


def compile_extension(build_dir: str | Path | None = None, verbose: bool = False) -> Path:
    """Compile and link the extension (ninja: only what changed) and load it into this process,
    registering the CUDA kernels. Returns the built library's path; raises on any build error.
    Target GPUs: $TORCH_CUDA_ARCH_LIST, else the visible GPUs' (torch's default)."""
    from torch.utils.cpp_extension import load as load_ext
    d = Path(build_dir) if build_dir is not None else default_build_dir()
    d.mkdir(parents=True, exist_ok=True)
    load_ext(name=EXT_NAME, sources=[str(_HERE / s) for s in SOURCES], build_directory=str(d),
             extra_cuda_cflags=CUDA_CFLAGS, extra_include_paths=[str(_HERE)], is_python_module=False,
             verbose=verbose)
    return d / f"{EXT_NAME}.so"


def load() -> bool | str:
    """True: lowbit's CUDA kernels; "bitsandbytes": its CUDA kernels (no nvcc here); False: the reference.
    LOWBIT_CUDA_BACKEND=bitsandbytes picks bitsandbytes' kernels even where ours build (parity checks)."""
    if os.environ.get("LOWBIT_CUDA_BACKEND") == "bitsandbytes" and bnb_backend.register():
        return "bitsandbytes"
    try:
        compile_extension()
        return True
    except Exception as e:
        reason = f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"
    if bnb_backend.register():
        warnings.warn(f"lowbit: CUDA extension not built ({reason}); running the 4-bit ops on bitsandbytes' CUDA "
                      "kernels (same bytes)", stacklevel=2)
        return "bitsandbytes"
    warnings.warn(f"lowbit: CUDA kernels unavailable ({reason}) and bitsandbytes is not installed; using the "
                  "pure-torch reference on the GPU", stacklevel=2)
    return False
