"""The CUDA kernels' per-element math (nf4_math.cuh), compiled for the host, is bit-exact
against the reference; and every .cu file compiles with nvcc when nvcc is installed."""
import ctypes
import shutil
import subprocess
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from lowbit.format import dequantize_reference, quantize
from lowbit.format.blockwise import quantize_4bit_packed
from lowbit.format.codes import quantize_bounds

CUDA_DIR = Path(__file__).resolve().parents[1] / "lowbit" / "kernels" / "cuda"


@pytest.fixture(scope="module")
def host_lib(tmp_path_factory):
    out = tmp_path_factory.mktemp("host") / "libnf4host.so"
    subprocess.run(["g++", "-O2", "-shared", "-fPIC", "-std=c++17", f"-I{CUDA_DIR}", str(CUDA_DIR / "host_check.cpp"),
                    "-o", str(out)], check=True)
    lib = ctypes.CDLL(str(out))
    lib.lowbit_host_f32_to_f16.restype = ctypes.c_uint32
    lib.lowbit_host_f32_to_f16.argtypes = [ctypes.c_float]
    lib.lowbit_host_f32_to_bf16.restype = ctypes.c_uint32
    lib.lowbit_host_f32_to_bf16.argtypes = [ctypes.c_float]
    return lib


def _bits(t):
    """Bit patterns, so -0.0 and +0.0 (equal values) count as different."""
    return t.view({4: torch.int32, 2: torch.int16}[t.element_size()])


def _ptr(t):
    return ctypes.c_void_p(t.data_ptr()) if t is not None else None


def _host_dequant(lib, q, dtype):
    n = q.numel
    out = torch.empty(n, dtype=torch.int64)  # room for uint32 per element
    bits = np.zeros(n, dtype=np.uint32)
    dq = q.double_quant
    lib.lowbit_host_dequantize(
        _ptr(q.codes_u8().contiguous()), None if dq else _ptr(q.absmax), _ptr(q.absmax) if dq else None,
        _ptr(q.nested_absmax) if dq else None, _ptr(q.nested_code) if dq else None,
        ctypes.c_float(q.offset.item() if dq else 0.0), ctypes.c_int64(q.blocksize),
        ctypes.c_int(0 if q.quant_type == "nf4" else 1), ctypes.c_int64(n),
        ctypes.c_int({torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}[dtype]),
        bits.ctypes.data_as(ctypes.c_void_p))
    del out
    if dtype == torch.float32:
        return torch.from_numpy(bits.view(np.float32).copy())
    return torch.from_numpy(bits.astype(np.uint16).view(np.int16).copy()).view(dtype)


@pytest.mark.parametrize("shape", [(7,), (63,), (33, 97), (128, 320), (3, 4097)])
@pytest.mark.parametrize("blocksize", [32, 64, 512, 4096])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("double_quant", [True, False])
def test_host_compiled_device_math_is_bit_exact(host_lib, shape, blocksize, quant_type, double_quant):
    q = quantize(torch.randn(shape) * 3, blocksize, double_quant, quant_type)
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        got = _host_dequant(host_lib, q, dtype)
        assert torch.equal(_bits(got), _bits(dequantize_reference(q, dtype).reshape(-1))), dtype


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_every_packed_byte_decodes_to_the_reference_bits(host_lib, quant_type):
    # all 16 codes in both nibbles, states bitsandbytes may write but our quantizer never
    # does (FP4's code 8 is +0.0 there, not -0.0)
    q = quantize(torch.randn(512), 64, False, quant_type)
    q = replace(q, packed=torch.arange(256, dtype=torch.uint8).reshape(-1, 1))
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        ref = dequantize_reference(q, dtype).reshape(-1)
        assert torch.equal(_bits(_host_dequant(host_lib, q, dtype)), _bits(ref)), dtype


def _host_quantize(lib, w, blocksize, quant_type):
    flat = w.reshape(-1).float().contiguous()  # bf16/fp16 widen exactly, as in the kernel
    n = flat.numel()
    packed = torch.empty(((n + 1) // 2, 1), dtype=torch.uint8)
    absmax = torch.empty(-(-n // blocksize), dtype=torch.float32)
    lib.lowbit_host_quantize(_ptr(flat), ctypes.c_int64(n), ctypes.c_int64(blocksize),
                             ctypes.c_int(0 if quant_type == "nf4" else 1), _ptr(packed), _ptr(absmax))
    return packed, absmax


@pytest.mark.parametrize("n", [7, 63, 64, 1000, 3 * 4097])
@pytest.mark.parametrize("blocksize", [32, 64, 512, 4096])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_host_compiled_quantize_math_is_bit_exact(host_lib, n, blocksize, quant_type, dtype):
    torch.manual_seed(n + blocksize)
    w = torch.randn(n) * 3
    w[: n // 5] = 0.0  # all-zero blocks, full (absmax 0) and tail (absmax 1e-38, as the reference stores)
    w[-min(n, 20):] = 0.0
    if n >= 64:  # block 0 holds every decision boundary exactly (absmax 1): ties go to the lower code
        w[:15], w[15] = quantize_bounds(quant_type)[0], 1.0
        w[n // 2] = 1e-39  # subnormal
        w[n // 2 + 1], w[n // 2 + 2], w[-25] = float("inf"), -float("inf"), float("nan")  # torch's max keeps NaN
    w = w.to(dtype)
    got_p, got_a = _host_quantize(host_lib, w, blocksize, quant_type)
    ref_p, ref_a = quantize_4bit_packed(w, blocksize, quant_type)
    nan = ref_a.isnan()  # NaN payloads are torch's business: NaN where the reference has NaN, bits elsewhere
    assert torch.equal(got_a.isnan(), nan) and torch.equal(_bits(got_a[~nan]), _bits(ref_a[~nan]))
    assert torch.equal(got_p, ref_p)


def test_fp16_and_bf16_rounding_match_torch_everywhere(host_lib):
    # normals, subnormals, halfway cases, overflow, zeros
    x = torch.cat([torch.randn(20000) * s for s in (1e-8, 1e-6, 1e-4, 1.0, 1e3, 6e4)] +
                  [torch.tensor([0.0, -0.0, 65504.0, 65519.0, 65520.0, 1e9, 2.0 ** -24, 2.0 ** -25, 3 * 2.0 ** -26])])
    f16 = torch.tensor([host_lib.lowbit_host_f32_to_f16(float(v)) for v in x], dtype=torch.int64)
    bf16 = torch.tensor([host_lib.lowbit_host_f32_to_bf16(float(v)) for v in x], dtype=torch.int64)
    assert torch.equal(f16, x.half().view(torch.int16).to(torch.int64) & 0xFFFF)
    assert torch.equal(bf16, x.bfloat16().view(torch.int16).to(torch.int64) & 0xFFFF)


# what torch.utils.cpp_extension adds to every nvcc command: no implicit half/bf16 conversions
TORCH_NVCC_FLAGS = ["-D__CUDA_NO_HALF_OPERATORS__", "-D__CUDA_NO_HALF_CONVERSIONS__", "-D__CUDA_NO_BFLOAT16_CONVERSIONS__",
                    "-D__CUDA_NO_HALF2_OPERATORS__", "--expt-relaxed-constexpr"]


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not installed")
def test_every_cu_file_compiles_with_nvcc_as_torch_builds_it(tmp_path):
    for cu in sorted(CUDA_DIR.glob("*.cu")):
        subprocess.run(["nvcc", "-std=c++17", "-c", str(cu), "-o", str(tmp_path / (cu.stem + ".o")),
                        "-gencode", "arch=compute_80,code=sm_80", f"-I{CUDA_DIR}", *TORCH_NVCC_FLAGS], check=True)
