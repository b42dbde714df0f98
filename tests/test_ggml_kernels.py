"""The C++ GGUF quantizers (torch.ops.lowbit_cpu.ggml_quantize, lowbit.kernels.quantize_ggml) against llama.cpp's
own C code (the oracle of lowbit.testing.ggml_oracle) and the pure-torch reference, byte for byte.

Every vector path the CPU has (AVX-512, AVX2, the SSE2 baseline called scalar) runs in its own process with
LOWBIT_CPU_ISA set, over corner-case rows (zero, constant, tiny, huge, outliers, ties), 1 row and many rows,
block counts that leave vector lanes empty, 32..4096 columns, fp32/bf16/fp16 inputs, with and without an
importance matrix (one row, or one per group of rows), and 1 or 2 threads.
"""
import json

import numpy as np
import pytest
import torch

from lowbit.testing.isa import run_python

ISAS = ("avx512", "avx2", "scalar")
LEGACY = ("Q4_0", "Q5_0", "Q8_0")
KQUANTS = ("Q4_K", "Q5_K", "Q6_K")
WIDTHS = {t: (32, 96, 640, 4096) for t in LEGACY} | {t: (256, 768, 4096) for t in KQUANTS}


def corner_rows(n: int, seed: int = 0) -> np.ndarray:
    """One kind of hard input per row: the branches of the C code (all-zero, constant, clamped min, ties...)."""
    rng = np.random.default_rng(seed)
    g = lambda s=0.02: (rng.standard_normal(n) * s).astype(np.float32)  # noqa: E731
    i = np.arange(n)
    rows = [np.zeros(n), np.full(n, 0.37), np.full(n, -1.25), g(1e-30), g(3e4), g(1.0), g(),
            g() * np.where(rng.random(n) < 0.02, 40.0, 1.0),  # outliers
            rng.integers(-8, 8, n),                             # integers: rounding ties
            g() * (i // 32 % 2),                                # every other 32-block zero
            g() * np.where(i % 32 < 16, 1e-6, 1.0),             # a near-zero half block
            g() * (i % 32 == 5),                                # one value per block
            np.where(rng.random(n) < 0.5, -0.5, 0.5),           # |x| ties of both signs
            -np.abs(g()), np.abs(g()) + 0.01]
    return np.stack(rows).astype(np.float32)


def imatrix(n: int, seed: int = 1) -> np.ndarray:
    rng = np.random.default_rng(seed)
    qw = (rng.random(n) * rng.random(n) * 10 + 1e-3).astype(np.float32)
    qw[::37] = 0.0  # never-active inputs
    return qw


def _cases():
    """(tag, x tensor, qtype, quant_weights or None, threads)."""
    rng = np.random.default_rng(5)
    for qtype, widths in WIDTHS.items():
        for n in widths:
            x = torch.from_numpy(corner_rows(n, seed=n))
            for qw in (None, imatrix(n)):
                q = None if qw is None else torch.from_numpy(qw)
                yield f"{qtype} n={n} rows={x.shape[0]} qw={q is not None}", x, qtype, q, 1
                yield f"{qtype} n={n} 1 row qw={q is not None}", x[7:8], qtype, q, 1
        n = widths[1]
        x = torch.from_numpy(corner_rows(n, seed=3)).clamp(-6e4, 6e4)  # finite in fp16 too
        for dtype in (torch.bfloat16, torch.float16):
            yield f"{qtype} n={n} {dtype}", x.to(dtype), qtype, None, 1
            yield f"{qtype} n={n} {dtype} qw", x.to(dtype), qtype, torch.from_numpy(imatrix(n)), 1
        # overflowing sums of squares, fp16 scale overflow (inf) and underflow, subnormal inputs
        ext = np.concatenate([rng.standard_normal((2, n)) * s for s in (1e7, 1e15, 1e-38, 1e-44)]).astype(np.float32)
        for q in (None, torch.from_numpy(imatrix(n))):
            yield f"{qtype} n={n} extreme magnitudes qw={q is not None}", torch.from_numpy(ext), qtype, q, 1
        groups = torch.from_numpy(np.stack([imatrix(n, 2), imatrix(n, 3), imatrix(n, 4)]))  # 15 rows, 3 groups
        yield f"{qtype} n={n} qw per group", x, qtype, groups, 1
        # many chunks (16 super-blocks / 128 blocks each) split over 2 threads: each thread gets at least
        # 1-2 ms of work (2^21 values element-wise, 2^17 in the searches), so these are big enough for two
        big = torch.from_numpy((rng.standard_normal((2100 if qtype in LEGACY else 160, 2048)) * 0.05).astype(np.float32))
        big[3, 100] = 7.0
        for q in (None, torch.from_numpy(imatrix(2048))):
            yield f"{qtype} {tuple(big.shape)} 2 threads qw={q is not None}", big, qtype, q, 2


def _oracle_bytes(oracle, x: torch.Tensor, qtype: str, qw) -> np.ndarray:
    xf = x.float().numpy()
    if qw is None or qw.ndim == 1 or qw.shape[0] == 1:
        return oracle.quantize(xf, qtype, None if qw is None else qw.reshape(-1).numpy())
    per = x.shape[0] // qw.shape[0]  # llama.cpp quantizes each expert with its own imatrix row
    return np.concatenate([oracle.quantize(xf[g * per:(g + 1) * per], qtype, qw[g].numpy())
                           for g in range(qw.shape[0])])


def _checks() -> dict:
    """Worker (one ISA, from LOWBIT_CPU_ISA): every case against the oracle."""
    from lowbit.kernels.cpu import build
    from lowbit.kernels.ggml import backend, quantize_ggml
    from lowbit.testing import ggml_oracle
    try:
        oracle = ggml_oracle.load()
    except ggml_oracle.OracleUnavailable as e:
        return {"skip": str(e)}
    assert backend() == "cpp", "the C++ CPU backend failed to build"
    fails, n = [], 0
    for tag, x, qtype, qw, threads in _cases():
        torch.set_num_threads(threads)
        ours = quantize_ggml(x, qtype, qw).numpy()
        ref = _oracle_bytes(oracle, x, qtype, qw)
        n += 1
        if ours.shape != ref.shape or not np.array_equal(ours, ref):
            bad = np.argwhere(ours != ref) if ours.shape == ref.shape else "shape"
            fails.append(f"{tag}: {len(bad)} bytes differ, first (row, byte) {np.asarray(bad)[:3].tolist()}")
    return {"isa": build.active_isa(), "ggml_isa": torch.ops.lowbit_cpu.ggml_isa(), "checked": n, "failures": fails}


def _run(code, isa=None, kernels=None, timeout=240):  # code None: this file's worker
    return run_python(__file__, code, isa, kernels, timeout=timeout)


@pytest.mark.parametrize("isa", ISAS)
def test_isa_path_matches_llama_cpp(isa, cpu_isas):
    if isa not in cpu_isas:
        pytest.skip(f"this CPU has no {isa} (supports {cpu_isas})")
    r = json.loads(_run(None, isa).stdout.strip().splitlines()[-1])
    if "skip" in r:
        pytest.skip(f"llama.cpp reference quantizer unavailable: {r['skip']}")
    assert r["isa"] == r["ggml_isa"] == isa, r
    assert not r["failures"], f"{len(r['failures'])} mismatches on {isa}, e.g.:\n" + "\n".join(r["failures"][:20])
    assert r["checked"] > 100


@pytest.mark.parametrize("qtype", LEGACY + KQUANTS)
def test_matches_torch_reference(qtype, cpu_isas):
    """Same bytes as lowbit.format.ggml_quants.quantize (the torch reference), input dtypes and imatrix included."""
    from lowbit.format import ggml_quants as gq
    from lowbit.kernels.ggml import quantize_ggml
    n = WIDTHS[qtype][1]
    x = torch.from_numpy(corner_rows(n, seed=11)).clamp(-6e4, 6e4)
    qw = torch.from_numpy(imatrix(n))
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        for q in (None, qw):
            assert torch.equal(quantize_ggml(x.to(dtype), qtype, q), gq.quantize(x.to(dtype), qtype, q)), (dtype, q)


def test_bad_input_is_one_clear_error(cpu_isas):
    from lowbit.kernels.ggml import quantize_ggml
    x = torch.randn(4, 512)
    for qtype in LEGACY + KQUANTS:
        bad = x.clone()
        bad[2, 300] = float("nan" if qtype.endswith("K") else "inf")
        with pytest.raises(ValueError, match="finite"):
            quantize_ggml(bad, qtype)
    with pytest.raises(ValueError, match="multiple of 256"):
        quantize_ggml(torch.randn(2, 320), "Q4_K")
    with pytest.raises(ValueError, match="do not fit"):
        quantize_ggml(x, "Q4_K", torch.ones(3, 512))
    with pytest.raises(ValueError, match="finite"):
        quantize_ggml(x, "Q6_K", torch.full((512,), float("inf")))


def test_reference_kernels_force_the_torch_path():
    code = ("import torch; from lowbit.kernels.ggml import backend, quantize_ggml; from lowbit.format import ggml_quants;"
            "x = torch.randn(3, 256); print(backend(), torch.equal(quantize_ggml(x, 'Q4_K'), ggml_quants.quantize(x, 'Q4_K')),"
            "hasattr(torch.ops.lowbit_cpu, 'ggml_quantize'))")
    assert _run(code, kernels="reference").stdout.split()[-3:] == ["reference", "True", "False"]


if __name__ == "__main__":  # worker: one ISA, chosen by LOWBIT_CPU_ISA
    import warnings
    warnings.filterwarnings("ignore")
    print(json.dumps(_checks()))
