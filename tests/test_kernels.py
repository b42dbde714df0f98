"""Every backend of the lowbit:: ops against the pure-torch reference (the contract)."""
import os
import subprocess
import sys

import pytest
import torch

from lowbit import kernels
from lowbit.format import dequantize_reference, quantize
from lowbit.kernels.ops import state_args

SHAPES = [(7,), (64,), (33, 97), (128, 320), (96, 2048), (1, 4099)]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@pytest.fixture(scope="module", autouse=True)
def cpu_backend():
    active = kernels.ensure_backends()
    assert active["cpu"], "the C++ CPU backend failed to build on this machine"


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("blocksize", [32, 64, 256, 4096])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("double_quant", [True, False])
def test_cpu_dequantize_and_quantize_bit_exact(shape, blocksize, quant_type, double_quant):
    for in_dtype in DTYPES:
        w = torch.randn(shape, dtype=in_dtype)
        q = quantize(w, blocksize, double_quant, quant_type)
        q2 = kernels.quantize_4bit(w, blocksize, double_quant, quant_type)
        assert torch.equal(q2.packed, q.packed) and torch.equal(q2.absmax, q.absmax)
        for out_dtype in DTYPES:
            assert torch.equal(kernels.dequantize_4bit(q, out_dtype), dequantize_reference(q, out_dtype))


def test_dequantize_into_workspace_is_exact_and_reused():
    q = quantize(torch.randn(256, 192))
    a = kernels.dequantize_to_workspace(q, torch.bfloat16).clone()
    assert torch.equal(a, dequantize_reference(q, torch.bfloat16))
    small = quantize(torch.randn(64, 64))
    b = kernels.dequantize_to_workspace(small, torch.bfloat16)
    assert torch.equal(b, dequantize_reference(small, torch.bfloat16))


@pytest.mark.parametrize("rows", [1, 2, 5, 16, 17, 64])
@pytest.mark.parametrize("dtype", DTYPES)
def test_matmul_forward_and_dx_backward(rows, dtype):
    torch.manual_seed(rows)
    q = quantize(torch.randn(160, 256) * 0.05)
    w = dequantize_reference(q, dtype)
    x = torch.randn(rows, 256, dtype=dtype, requires_grad=True)
    xr = x.detach().clone().requires_grad_(True)
    y = kernels.matmul_4bit(x, q)
    yr = xr @ w.t()
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(y.float(), yr.float(), rtol=tol, atol=tol * yr.abs().max().item())
    g = torch.randn_like(y)
    y.backward(g)
    yr.backward(g)
    if rows > kernels.GEMV_MAX_ROWS or dtype == torch.float16:  # dequantize + matmul (fp32 and bf16 M<=16: fused GEMV)
        assert torch.equal(y, yr)
    torch.testing.assert_close(x.grad, xr.grad, rtol=0, atol=0)


def test_reference_backend_used_when_disabled_equals_cpu():
    code = ("import torch; from lowbit import kernels; from lowbit.format import quantize;"
            "print(kernels.ensure_backends()['cpu'])")
    env = {**os.environ, "LOWBIT_KERNELS": "reference"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert out.strip().endswith("False")


def test_missing_compiler_falls_back_with_one_warning(tmp_path):
    code = ("import warnings, torch; warnings.simplefilter('always');"
            "from lowbit import kernels; from lowbit.format import quantize, dequantize_reference;"
            "q = quantize(torch.randn(64, 64));"
            "print(kernels.ensure_backends()['cpu'], torch.equal(kernels.dequantize_4bit(q, torch.bfloat16),"
            " dequantize_reference(q, torch.bfloat16)))")
    env = {**os.environ, "CXX": "/nonexistent/c++", "LOWBIT_CACHE": str(tmp_path)}
    p = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert p.returncode == 0, p.stderr[-2000:]
    assert p.stdout.strip().endswith("False True")
    assert p.stderr.count("lowbit: CPU kernels unavailable") == 1


def _args(q, extra=()):
    return (*extra, *state_args(q))


@pytest.mark.parametrize("double_quant", [True, False])
def test_opcheck_every_op(double_quant):
    q = quantize(torch.randn(64, 128), 64, double_quant)
    x = torch.randn(3, 128)
    grad = torch.randn(5, 64)
    ops = torch.ops.lowbit
    torch.library.opcheck(ops.dequantize_4bit.default, (*state_args(q), torch.bfloat16))
    torch.library.opcheck(ops.dequantize_4bit_into.default, (*state_args(q), torch.empty(64, 128)))
    torch.library.opcheck(ops.quantize_4bit.default, (torch.randn(33, 65), 64, "nf4"))
    torch.library.opcheck(ops.gemv_4bit.default, (x, *state_args(q)))
    torch.library.opcheck(ops.gemv_4bit.default, (x.bfloat16(), *state_args(q)))
    torch.library.opcheck(ops.matmul_4bit_dx.default, (grad, *state_args(q)))


def test_torch_compile_traces_through_the_ops():
    q = quantize(torch.randn(64, 128))
    args = state_args(q)

    def f(x):
        return x @ torch.ops.lowbit.dequantize_4bit(*args, torch.float32).t()
    x = torch.randn(4, 128)
    compiled = torch.compile(f, backend="eager", fullgraph=True)
    torch.testing.assert_close(compiled(x), f(x))


@pytest.mark.parametrize("shape", [(33, 64), (8, 1024), (5, 4096)])
@pytest.mark.parametrize("blocksize", [64, 128, 256])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("double_quant", [True, False])
def test_fused_gemv_matches_reference(shape, blocksize, quant_type, double_quant):
    # bf16 rows ≤ 16 take the fused AVX-512 kernel (x permuted, bf16 code values, fp32
    # accumulation): equal to the fp32 product of the reference weight up to bf16 rounding
    torch.manual_seed(shape[0])
    q = quantize(torch.randn(shape), blocksize, double_quant, quant_type)
    w = dequantize_reference(q, torch.float32)
    for rows in (1, 3, 16):
        x = torch.randn(rows, shape[1], dtype=torch.bfloat16)
        y = torch.ops.lowbit.gemv_4bit(x, *state_args(q))
        yr = x.float() @ w.t()
        err = (y.float() - yr).abs().max().item()
        assert err <= 1e-2 * (x.float().abs() @ w.abs().t()).max().item(), (rows, err)
