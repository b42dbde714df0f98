"""Compile the CPU backend once (cached) and register it for the CPU dispatch key.

Where no compiler works, lowbit keeps the pure-torch reference and says so in one line.
LOWBIT_KERNELS=reference skips the build (used by tests to compare backends).
The vector paths (AVX-512+BF16, AVX2+FMA+F16C, scalar) are chosen at run time, once per
process: the best the CPU has, or LOWBIT_CPU_ISA=avx512|avx2|scalar; `active_isa()` says which.
"""
from __future__ import annotations

import os
import warnings
from pathlib import Path

_HERE = Path(__file__).resolve().parent
_STATE: dict = {}
# torch glue, then one file per ISA (nf4_kernels.h between them); ninja tracks the headers.
# The GGUF quantizers likewise: glue, then ggml_quant_body.h compiled once per ISA.
SOURCES = ("nf4_cpu.cpp", "nf4_scalar.cpp", "nf4_avx2.cpp", "nf4_avx512.cpp",
           "ggml_quant.cpp", "ggml_quant_scalar.cpp", "ggml_quant_avx2.cpp", "ggml_quant_avx512.cpp")
# -ffp-contract=off: no a*b+c may become an FMA inside the AVX2/AVX-512 functions, or
# dequantize/quantize (and the GGUF quantizers' byte equality with llama.cpp) would stop
# rounding exactly like the reference
CFLAGS = ["-O3", "-fopenmp", "-std=c++17", "-ffp-contract=off"]


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
        load_ext(name="lowbit_nf4_cpu", sources=[str(_HERE / s) for s in SOURCES], build_directory=str(cache_dir()),
                 extra_cflags=CFLAGS, extra_ldflags=["-fopenmp"],
                 extra_include_paths=[str(_HERE.parent / "cuda")], is_python_module=False, verbose=False)
        _STATE["ok"] = True
    except Exception as e:  # no compiler / headers: the reference still works
        warnings.warn(f"lowbit: CPU kernels unavailable ({type(e).__name__}: {str(e).splitlines()[0][:160]}); "
                      "using the pure-torch reference", stacklevel=2)
    return _STATE["ok"]


def active_isa() -> str:
    """The CPU kernels' vector path in this process: "avx512", "avx2" or "scalar"
    ("reference" when the C++ backend is not loaded). Fixed on first use."""
    if not load():
        return "reference"
    import torch
    return torch.ops.lowbit_cpu.isa()


def supported_isas() -> list[str]:
    """The vector paths this CPU can run, best first ([] without the C++ backend)."""
    if not load():
        return []
    import torch
    return list(torch.ops.lowbit_cpu.supported_isas())
