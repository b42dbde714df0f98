"""The bitsandbytes-backed CUDA ops (used where lowbit's CUDA extension cannot be built) compute what the
reference does. Their argument mapping is checked here on the CPU, where bitsandbytes also runs; on a GPU
machine scripts/gpu_check.sh runs the same ops through the CUDA dispatch key."""
import pytest
import torch

from lowbit.format import quantize
from lowbit.kernels import ops
from lowbit.kernels.cuda import bnb_backend
from lowbit.kernels.ops import state_args


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("double_quant", [True, False])
@pytest.mark.parametrize("shape,blocksize", [((64, 128), 64), ((32, 256), 128)])
def test_bnb_backed_ops_equal_the_reference(quant_type, double_quant, shape, blocksize):
    torch.manual_seed(0)
    w = torch.randn(shape)
    q = quantize(w, blocksize, double_quant, quant_type)
    args = state_args(q)
    ref = ops._dequantize_ref(*args, torch.float32)
    got = bnb_backend.dequantize(*args, torch.float32)
    assert torch.equal(got, ref)
    out = torch.empty(shape)
    bnb_backend.dequantize_into(*args, out)
    assert torch.equal(out, ref)
    x = torch.randn(3, shape[1])
    torch.testing.assert_close(bnb_backend.gemv(x, *args), x @ ref.t(), atol=1e-5, rtol=1e-5)
    g = torch.randn(3, shape[0])
    torch.testing.assert_close(bnb_backend.matmul_dx(g, *args), g @ ref, atol=1e-5, rtol=1e-5)
    packed, absmax = bnb_backend.quantize(w, blocksize, quant_type)
    rp, ra = ops._quantize_ref(w, blocksize, quant_type)
    assert torch.equal(packed.view(-1), rp.view(-1)) and torch.equal(absmax, ra)
