"""Our GGUF quantizers vs llama.cpp's reference C code (ggml-quants.c), byte for byte.

The oracle is built from the llama-cpp-python sdist (lowbit.testing.ggml_oracle); without network/sdist or a C
compiler these tests skip, saying why.
"""
import numpy as np
import pytest
import torch

from lowbit.format import ggml_quants as gq

LEGACY = ("Q4_0", "Q5_0", "Q8_0")
KQUANTS = ("Q4_K", "Q5_K", "Q6_K")


def _mixed(n: int, seed: int = 0) -> np.ndarray:
    """Rows that hit the corner cases of the C code (one kind per row)."""
    rng = np.random.default_rng(seed)
    g = lambda s=0.02: (rng.standard_normal(n) * s).astype(np.float32)  # noqa: E731
    rows = [np.zeros(n, np.float32),                       # all zero
            np.full(n, 0.37, np.float32),                  # constant > 0
            np.full(n, -1.25, np.float32),                 # constant < 0
            g(1e-30),                                      # tiny (sums of squares underflow)
            g() * np.where(rng.random(n) < 0.02, 40.0, 1.0).astype(np.float32),  # heavy outliers
            g(3e4),                                        # large
            rng.integers(-8, 8, n).astype(np.float32),     # integers: exact rounding ties
            g() * (np.arange(n) // 32 % 2).astype(np.float32),  # every other 32-block zero
            g() * np.where(np.arange(n) % 32 < 16, 1e-6, 1.0).astype(np.float32),  # a near-zero sub-block
            g() * (np.arange(n) % 32 == 5).astype(np.float32),  # one value per block
            np.where(rng.random(n) < 0.5, -0.5, 0.5).astype(np.float32),  # |x| ties of both signs
            -np.abs(g()),                                  # all <= 0
            np.abs(g()) + 0.01,                            # all > 0
            g(), g(1.0), g(0.002)]
    return np.stack(rows).astype(np.float32)


def _imatrix(n: int, seed: int = 1) -> np.ndarray:
    rng = np.random.default_rng(seed)
    qw = (rng.random(n) * rng.random(n) * 10 + 1e-3).astype(np.float32)  # positive, wide dynamic range
    qw[::37] = 0.0  # zero importance happens (never-active inputs)
    return qw


def _check(oracle, x: np.ndarray, qtype: str, qw=None):
    ours = gq.quantize(torch.from_numpy(x), qtype, None if qw is None else torch.from_numpy(qw)).numpy()
    ref = oracle.quantize(x, qtype, qw)
    assert ours.shape == ref.shape == (x.shape[0], gq.row_bytes(qtype, x.shape[1]))
    if not np.array_equal(ours, ref):
        bad = np.argwhere(ours != ref)
        pytest.fail(f"{qtype} (imatrix={qw is not None}) differs in {len(bad)} bytes, first (row, byte): "
                    f"{bad[:5].tolist()}")


@pytest.mark.parametrize("imatrix", [False, True], ids=["ref", "imatrix"])
@pytest.mark.parametrize("qtype,n", [(t, n) for t in LEGACY for n in (32, 96, 256, 4096)]
                         + [(t, n) for t in KQUANTS for n in (256, 512, 4096)])
def test_matches_llama_cpp(oracle, qtype, n, imatrix):
    """quantize == quantize_<type>(src, dst, nrow, n, quant_weights): the _ref path without, _impl with imatrix."""
    _check(oracle, _mixed(n), qtype, _imatrix(n) if imatrix else None)


@pytest.mark.parametrize("qtype", LEGACY + KQUANTS)
def test_matches_row_ref(oracle, qtype):
    """Without an imatrix it is exactly quantize_row_<type>_ref; many blocks (crosses our work-item splits)."""
    x = (np.random.default_rng(2).standard_normal((24, 2048)) * 0.05).astype(np.float32)
    x[3, 100] = 7.0
    assert np.array_equal(gq.quantize(torch.from_numpy(x), qtype).numpy(), oracle.quantize_ref(x, qtype))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("qtype", LEGACY + KQUANTS)
def test_low_precision_inputs(oracle, qtype, dtype):
    """bf16/fp16 weights are quantized from their exact fp32 values."""
    w = (torch.randn(8, 512, generator=torch.Generator().manual_seed(3)) * 0.03).to(dtype)
    ref = oracle.quantize(w.float().numpy(), qtype)
    assert np.array_equal(gq.quantize(w, qtype).numpy(), ref)


@pytest.mark.parametrize("qtype", LEGACY + KQUANTS)
def test_extreme_magnitudes(oracle, qtype):
    """Overflowing sums of squares, fp16 scale overflow (inf) and underflow follow the C code too."""
    rng = np.random.default_rng(4)
    x = np.concatenate([rng.standard_normal((2, 256)) * s for s in (1e7, 1e15, 1e-38, 1e-44)]).astype(np.float32)
    _check(oracle, x, qtype)
    _check(oracle, x, qtype, _imatrix(256))


@pytest.mark.parametrize("qtype", ("Q4_0", "Q4_K", "Q6_K"))
def test_per_expert_imatrix(oracle, qtype):
    """One imatrix row per group of rows (llama.cpp passes each expert its own slice)."""
    x = _mixed(256)[:12]
    qw = np.stack([_imatrix(256, 5), _imatrix(256, 6), _imatrix(256, 7)])
    ours = gq.quantize(torch.from_numpy(x), qtype, torch.from_numpy(qw)).numpy()
    ref = np.concatenate([oracle.quantize(x[4 * e:4 * e + 4], qtype, qw[e]) for e in range(3)])
    assert np.array_equal(ours, ref)


@pytest.mark.parametrize("qtype", LEGACY + KQUANTS)
def test_chunking_and_threads_do_not_change_bytes(qtype):
    x = torch.from_numpy(np.concatenate([_mixed(512)] * 5))
    qw = torch.from_numpy(_imatrix(512))
    threads = torch.get_num_threads()
    for q in (None, qw):
        ref = gq.quantize(x, qtype, q)
        assert torch.equal(ref, gq.quantize(x, qtype, q, chunk_elems=512))
        try:
            torch.set_num_threads(1 if threads > 1 else 2)
            assert torch.equal(ref, gq.quantize(x, qtype, q))
        finally:
            torch.set_num_threads(threads)


@pytest.mark.parametrize("qtype", LEGACY + KQUANTS)
def test_dequantize_matches_ggml_and_gguf_py(oracle, qtype):
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize as gguf_dequantize

    x = _mixed(512)
    raw = oracle.quantize(x, qtype)
    ours = gq.dequantize(torch.from_numpy(raw), qtype, x.shape).numpy()
    ref = oracle.dequantize(raw, qtype, x.shape)
    gguf_py = gguf_dequantize(raw, GGMLQuantizationType[qtype]).astype(np.float32).reshape(x.shape)
    assert np.array_equal(ours.view(np.int32), ref.view(np.int32))
    assert np.array_equal(gguf_py.view(np.int32), ref.view(np.int32))
    assert torch.equal(gq.dequantize(raw.tobytes(), qtype, x.shape), torch.from_numpy(ours))


def test_block_constants(oracle):
    assert gq.QK_K == 256
    for t in LEGACY + KQUANTS:
        assert gq.TYPE_SIZE[t] == oracle.block_bytes(t)
        assert gq.row_bytes(t, 4096) == 4096 // gq.BLOCK_SIZE[t] * gq.TYPE_SIZE[t]


def test_errors():
    with pytest.raises(ValueError, match="multiple of 256"):
        gq.quantize(torch.zeros(2, 640), "Q4_K")
    with pytest.raises(ValueError, match="finite"):
        gq.quantize(torch.tensor([[float("nan")] * 32]), "Q8_0")
    with pytest.raises(ValueError, match="unsupported"):
        gq.quantize(torch.zeros(1, 32), "Q4_1")
    with pytest.raises(ValueError, match="quant_weights"):
        gq.quantize(torch.zeros(2, 32), "Q4_0", torch.ones(64))


def test_oracle_reports_why_it_is_unavailable(tmp_path, monkeypatch):
    """No sdist and no index -> OracleUnavailable (tests skip with that message); no compiler -> the same."""
    from lowbit.testing import ggml_oracle

    monkeypatch.setenv("LOWBIT_CACHE", str(tmp_path))
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    with pytest.raises(ggml_oracle.OracleUnavailable, match="could not download"):
        ggml_oracle.ensure_sources()
    src = tmp_path / "src-fake"
    (src / "ggml" / "src").mkdir(parents=True)
    (src / "ggml" / "src" / "ggml-quants.c").write_text("int x;\n")
    monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
    with pytest.raises(ggml_oracle.OracleUnavailable, match="compiling ggml-quants.c failed"):
        ggml_oracle._build(src)
