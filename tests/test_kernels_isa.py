"""Every vector path of the C++ CPU backend (AVX-512, AVX2, scalar) against the pure-torch
reference: each ISA runs in its own process with LOWBIT_CPU_ISA set (the choice is made
once per process), over odd shapes and tails, every blocksize, fp32/bf16/fp16, nf4/fp4,
double quant on and off. Dequantize and quantize must be bit-exact; the fused GEMV within
fp32 summation tolerance (fp32 x) or bf16 rounding (bf16 x)."""
import json
import os
import subprocess
import sys

import pytest
import torch

from lowbit.testing.isa import run_python

ISAS = ("avx512", "avx2", "scalar")
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# element counts not a multiple of 8/16/32/64/blocksize, single partial blocks, a row that
# is one block plus 3 elements, and the odd sizes seen in real models
QUANT_SHAPES = [(7,), (64,), (3, 100), (33, 97), (1, 4099), (128, 320), (96, 2048), (640, 2048)]
BLOCKSIZES = (32, 64, 128, 256, 512, 4096)
# (N, K, blocksize): K % 64 == 0 (every kernel), K % 16 but not 64, K % 8 but not 16 (AVX2
# fused, AVX-512 falls back), K % 8 != 0 (all fall back), rows crossing block boundaries,
# blocks spanning several rows
GEMV_CASES = [(33, 64, 64), (8, 1024, 128), (5, 4096, 256), (40, 2048, 64), (10, 96, 64), (7, 136, 32),
              (12, 200, 64), (6, 100, 64), (4, 2048, 4096), (3, 160, 256)]
GEMV_ROWS = (1, 2, 3, 5, 8, 9, 16, 17)


def _checks() -> dict:
    """Run in a worker process; returns the ISA in use and every mismatch found."""
    from lowbit import kernels
    from lowbit.format import dequantize_reference, quantize
    from lowbit.kernels.cpu import build
    from lowbit.kernels.ops import state_args

    assert kernels.ensure_backends()["cpu"], "the C++ CPU backend failed to build"
    fails, n = [], 0

    def check(ok, what):
        nonlocal n
        n += 1
        if not ok and len(fails) < 50:
            fails.append(what)

    gen = torch.Generator().manual_seed(0)
    combo = 0
    for shape in QUANT_SHAPES:
        big = shape[-1] >= 2048  # the reference is the slow side: fewer blocksizes, one input dtype each
        for blocksize in (64, 256, 4096) if big else BLOCKSIZES:
            for quant_type in ("nf4", "fp4"):
                for dq in (False, True):
                    w32 = torch.randn(shape, generator=gen)
                    combo += 1
                    for in_dtype in (DTYPES[combo % 3],) if big else DTYPES:
                        w = w32.to(in_dtype)
                        tag = f"{shape} bs={blocksize} {quant_type} dq={dq} in={in_dtype}"
                        q = quantize(w, blocksize, dq, quant_type)
                        q2 = kernels.quantize_4bit(w, blocksize, dq, quant_type)
                        check(torch.equal(q2.packed, q.packed) and torch.equal(q2.absmax, q.absmax),
                              f"quantize {tag}")
                        ref32 = dequantize_reference(q, torch.float32)
                        for out_dtype in DTYPES:
                            got = kernels.dequantize_4bit(q, out_dtype)
                            check(torch.equal(got, ref32.to(out_dtype)), f"dequantize {tag} out={out_dtype}")

    # extremes of the output conversions: fp32 subnormals (bf16 must keep them, as torch
    # does), fp16 subnormals and overflow to inf
    for scale in (1e-39, 1e-6, 3e4, 1e6):
        q = quantize(torch.randn(64, 96, generator=gen) * scale, 64, False, "nf4")
        ref32 = dequantize_reference(q, torch.float32)
        for out_dtype in DTYPES:
            check(torch.equal(kernels.dequantize_4bit(q, out_dtype), ref32.to(out_dtype)),
                  f"dequantize scale={scale} out={out_dtype}")

    # big enough for the non-temporal-store path (> 24 MB of output), fresh and into a buffer
    q = quantize(torch.randn(4096, 3200, generator=gen, dtype=torch.bfloat16), 64, True, "nf4")
    ref32 = dequantize_reference(q, torch.float32)
    for out_dtype in (torch.float32, torch.bfloat16):
        check(torch.equal(kernels.dequantize_4bit(q, out_dtype), ref32.to(out_dtype)), f"dequantize big {out_dtype}")
        out = torch.empty(q.shape, dtype=out_dtype)
        torch.ops.lowbit.dequantize_4bit_into(*state_args(q), out)
        check(torch.equal(out, ref32.to(out_dtype)), f"dequantize_into big {out_dtype}")

    for N, K, blocksize in GEMV_CASES:
        for quant_type in ("nf4", "fp4"):
            for dq in (False, True):
                q = quantize(torch.randn(N, K, generator=gen), blocksize, dq, quant_type)
                w32 = dequantize_reference(q, torch.float32)
                for rows in GEMV_ROWS:
                    x32 = torch.randn(rows, K, generator=gen)
                    for dtype in DTYPES:
                        x = x32.to(dtype)
                        tag = f"gemv N={N} K={K} bs={blocksize} {quant_type} dq={dq} M={rows} {dtype}"
                        y = torch.ops.lowbit.gemv_4bit(x, *state_args(q))
                        if dtype == torch.float16:  # dequantize + matmul: the reference's own ops
                            check(torch.equal(y, x @ dequantize_reference(q, dtype).t()), tag)
                            continue
                        yr = x.float() @ w32.t()
                        bound = (x.float().abs() @ w32.abs().t()).max().item()
                        tol = 1e-5 if dtype == torch.float32 else 1e-2
                        err = (y.float() - yr).abs().max().item()
                        check(y.dtype == dtype and y.shape == yr.shape and err <= tol * bound,
                              f"{tag}: err {err:.3g} > {tol * bound:.3g}")
    x = torch.randn(2, 3, 256, generator=gen)  # leading dims fold into M
    q = quantize(torch.randn(48, 256, generator=gen))
    y = torch.ops.lowbit.gemv_4bit(x, *state_args(q))
    check(y.shape == (2, 3, 48) and torch.allclose(y, x @ dequantize_reference(q, torch.float32).t(),
                                                   rtol=1e-5, atol=1e-4), "gemv 3-D x")
    return {"isa": build.active_isa(), "supported": build.supported_isas(), "checked": n, "failures": fails}


def _run(code, isa=None, timeout=240):  # code None: this file's worker
    return run_python(__file__, code, isa, timeout=timeout)


@pytest.mark.parametrize("isa", ISAS)
def test_isa_path_matches_reference(isa, cpu_isas):
    if isa not in cpu_isas:
        pytest.skip(f"this CPU has no {isa} (supports {cpu_isas})")
    r = json.loads(_run(None, isa).stdout.strip().splitlines()[-1])
    assert r["isa"] == isa, r
    assert not r["failures"], f"{len(r['failures'])} mismatches on {isa}, e.g.:\n" + "\n".join(r["failures"][:20])
    assert r["checked"] > 1000


def test_isa_default_is_best_and_choice_is_read_once(cpu_isas):
    code = ("import os, torch; from lowbit.kernels.cpu import build; from lowbit import kernels;"
            "kernels.ensure_backends(); a = build.active_isa(); os.environ['LOWBIT_CPU_ISA'] = 'scalar';"
            "print(a, build.active_isa(), torch.ops.lowbit_cpu.isa())")
    best = cpu_isas[0]
    assert _run(code).stdout.split()[-3:] == [best, best, best]
    if "scalar" != best:  # a lower level is honoured
        assert _run(code, "scalar").stdout.split()[-3:] == ["scalar"] * 3


def test_isa_unknown_value_warns_and_uses_best(cpu_isas):
    code = ("import torch, warnings; warnings.simplefilter('always'); from lowbit.kernels.cpu import build;"
            "print(build.active_isa())")
    p = _run(code, "sse9")
    assert p.stdout.split()[-1] == cpu_isas[0]
    assert "LOWBIT_CPU_ISA=sse9" in p.stderr


def test_reference_backend_reports_reference():
    code = "from lowbit.kernels.cpu import build; print(build.active_isa(), build.supported_isas())"
    env = {**os.environ, "LOWBIT_KERNELS": "reference"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert out.split()[-2:] == ["reference", "[]"]


if __name__ == "__main__":  # worker: one ISA, chosen by LOWBIT_CPU_ISA
    import warnings
    warnings.filterwarnings("ignore")
    print(json.dumps(_checks()))
