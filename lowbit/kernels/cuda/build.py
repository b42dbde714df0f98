"""Build the CUDA backend on machines whose torch has CUDA, and register it (CUDA key)."""
from __future__ import annotations

import os
import warnings
from pathlib import Path

from lowbit.kernels.cuda import bnb_backend

_HERE = Path(__file__).resolve().parent


def load() -> bool | str:
    """True: lowbit's CUDA kernels; "bitsandbytes": its CUDA kernels (no nvcc here); False: the reference.
    LOWBIT_CUDA_BACKEND=bitsandbytes picks bitsandbytes' kernels even where ours build (parity checks)."""
    if os.environ.get("LOWBIT_CUDA_BACKEND") == "bitsandbytes" and bnb_backend.register():
        return "bitsandbytes"
    try:
        from torch.utils.cpp_extension import load as load_ext

        from lowbit.kernels.cpu.build import cache_dir
        load_ext(name="lowbit_nf4_cuda", sources=[str(_HERE / "nf4_kernels.cu"), str(_HERE / "nf4_cuda_ops.cpp")],
                 build_directory=str(cache_dir().with_name(cache_dir().name.replace("cpu", "cuda"))),
                 extra_cuda_cflags=["-O3"], extra_include_paths=[str(_HERE)], is_python_module=False)
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
