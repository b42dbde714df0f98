"""Bit-compatibility with the installed bitsandbytes: bytes, state, dequantized values."""
import bitsandbytes.functional as bnbF
import pytest
import torch
from bitsandbytes.backends.default.ops import _dequantize_4bit_compute

from lowbit import nf4
from lowbit.format import Quantized4bit, code_4bit, dequantize_reference, dynamic_map

SHAPES = [(64,), (7,), (3, 5), (128, 64), (33, 97), (256, 320), (1, 4097)]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bytes: torch.equal calls -0.0 and +0.0 equal, a serialized state does not."""
    return t.contiguous().reshape(-1).view(torch.uint8)


def test_code_books_match_bitsandbytes():
    for ours, theirs in ((code_4bit("nf4"), bnbF.get_4bit_type("nf4", "cpu")),
                         (code_4bit("fp4"), bnbF.get_4bit_type("fp4", "cpu")),
                         (dynamic_map(), bnbF.create_dynamic_map())):
        assert ours.dtype == theirs.dtype and torch.equal(_bits(ours), _bits(theirs))


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("blocksize", [32, 64, 256, 4096])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("double_quant", [True, False])
def test_bytes_and_state_match_bitsandbytes(shape, dtype, blocksize, quant_type, double_quant):
    torch.manual_seed(hash((shape, blocksize)) % 1000)
    w = (torch.randn(shape) * 0.05).to(dtype)
    q = nf4.quantize(w, blocksize=blocksize, double_quant=double_quant, quant_type=quant_type)
    packed, st = bnbF.quantize_4bit(w, blocksize=blocksize, compress_statistics=double_quant, quant_type=quant_type)
    assert torch.equal(q.packed, packed)
    ours = q.state_dict("w")
    theirs = {"w": packed, **{f"w.{k}": v for k, v in st.as_dict(packed=True).items()}}
    assert set(ours) == set(theirs)
    for k in theirs:
        assert ours[k].dtype == theirs[k].dtype and torch.equal(_bits(ours[k]), _bits(theirs[k])), k
    # dequantize equals bitsandbytes' (default-backend) decode of its own state
    absmax = st.absmax
    if double_quant:
        absmax = bnbF.dequantize_blockwise(st.absmax, st.state2) + st.offset
    # bitsandbytes' pure-torch decode (uncompiled: dynamo would recompile per shape)
    ref = _dequantize_4bit_compute.__wrapped__(packed.reshape(-1), absmax, code_4bit(quant_type), blocksize, shape, dtype)
    got = nf4.dequantize(q)
    assert torch.equal(got, ref)
    # and bitsandbytes' public dequantize_4bit wherever its CPU kernel is self-consistent
    # (it assumes blocks never cross rows: see lowbit/format/blockwise.py)
    if len(shape) == 1 or shape[-1] % blocksize == 0 or shape[-1] % 2 or blocksize >= 2048:
        theirs_dq = bnbF.dequantize_4bit(packed, st)
        assert torch.equal(got, theirs_dq.reshape(shape))


def test_double_quant_costs_4_127_bits_per_param():
    q = nf4.quantize(torch.randn(4096, 4096), blocksize=64, double_quant=True)
    assert abs(q.bits_per_param() - 4.127) < 1e-3


def test_state_dict_round_trip_and_storage_container():
    w = torch.randn(96, 80, dtype=torch.bfloat16)
    q = nf4.quantize(w)
    q2 = Quantized4bit.from_state_dict(q.state_dict("layer.weight"), "layer.weight")
    assert torch.equal(dequantize_reference(q2), dequantize_reference(q))
    for storage in (torch.bfloat16, torch.float32, torch.float16):
        qs = nf4.quantize(w, storage_dtype=storage)
        assert qs.packed.dtype == storage
        assert torch.equal(dequantize_reference(qs), dequantize_reference(q))


def test_from_bnb_adopts_without_requantizing():
    w = torch.randn(64, 128)
    packed, st = bnbF.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
    q = Quantized4bit.from_bnb(packed, st)
    assert torch.equal(nf4.dequantize(q), bnbF.dequantize_4bit(packed, st))


@pytest.mark.parametrize("bad", [16, 100, 8192])
def test_invalid_blocksize_is_a_clear_error(bad):
    with pytest.raises(ValueError, match=r"invalid blocksize .*choose one of 32, 64"):
        nf4.quantize(torch.randn(64), blocksize=bad)


def test_invalid_quant_type_and_dtype():
    with pytest.raises(ValueError, match="quant_type"):
        nf4.quantize(torch.randn(64), quant_type="int4")
    with pytest.raises(TypeError, match="float32/bfloat16/float16"):
        nf4.quantize(torch.randint(0, 3, (64,)))
