"""Build the CUDA backend on machines whose torch has CUDA, and register it (CUDA key)."""
from __future__ import annotations

import warnings
from pathlib import Path

_HERE = Path(__file__).resolve().parent


def load() -> bool:
    try:
        from torch.utils.cpp_extension import load as load_ext

        from lowbit.kernels.cpu.build import cache_dir
        load_ext(name="lowbit_nf4_cuda", sources=[str(_HERE / "nf4_kernels.cu"), str(_HERE / "nf4_cuda_ops.cpp")],
                 build_directory=str(cache_dir().with_name(cache_dir().name.replace("cpu", "cuda"))),
                 extra_cuda_cflags=["-O3"], extra_include_paths=[str(_HERE)], is_python_module=False)
        return True
    except Exception as e:
        warnings.warn(f"lowbit: CUDA kernels unavailable ({type(e).__name__}: {str(e).splitlines()[0][:160]}); "
                      "using the pure-torch reference on the GPU", stacklevel=2)
        return False
