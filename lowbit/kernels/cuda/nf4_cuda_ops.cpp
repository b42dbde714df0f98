// Torch binding of the CUDA kernels (built only where torch has CUDA): registers the
// lowbit:: ops for the CUDA dispatch key. quantize_4bit and matmul_4bit_dx stay on the
// composite path (reference quantize; dequantize + cuBLAS matmul).
#include <torch/library.h>
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <cuda_runtime.h>

extern "C" int lowbit_cuda_dequantize_4bit(const uint8_t*, const float*, const uint8_t*, const float*, const float*,
                                           const float*, int64_t, int, int64_t, void*, int, cudaStream_t);
extern "C" int lowbit_cuda_gemv_4bit(const void*, int, const uint8_t*, const float*, const uint8_t*, const float*,
                                     const float*, const float*, int64_t, int, int64_t, int64_t, void*, int,
                                     cudaStream_t);

namespace {

int dtype_code(at::ScalarType t) {
  if (t == at::kFloat) return 0;
  if (t == at::kBFloat16) return 1;
  TORCH_CHECK(t == at::kHalf, "lowbit CUDA kernels support float32, bfloat16, float16");
  return 2;
}

struct State {
  at::Tensor packed, absmax, nested, code, offset;
};

State prep(const at::Tensor& packed, const at::Tensor& absmax, const c10::optional<at::Tensor>& nested_absmax,
           const c10::optional<at::Tensor>& nested_code, const c10::optional<at::Tensor>& offset) {
  State s{packed.contiguous().view(at::kByte), absmax.contiguous(), {}, {}, {}};
  if (absmax.scalar_type() == at::kByte) {
    TORCH_CHECK(nested_absmax && nested_code && offset, "uint8 absmax needs nested_absmax, nested_code, offset");
    s.nested = nested_absmax->contiguous();
    s.code = nested_code->contiguous();
    s.offset = offset->to(at::kFloat).contiguous();
  }
  return s;
}

at::Tensor dequantize_cuda(const at::Tensor& packed, const at::Tensor& absmax, const c10::optional<at::Tensor>& na,
                           const c10::optional<at::Tensor>& nc, const c10::optional<at::Tensor>& off,
                           int64_t blocksize, c10::string_view quant_type, at::IntArrayRef shape, at::ScalarType dtype) {
  State s = prep(packed, absmax, na, nc, off);
  auto out = at::empty(shape, packed.options().dtype(dtype));
  const bool q = s.absmax.scalar_type() == at::kByte;
  const int err = lowbit_cuda_dequantize_4bit(
      s.packed.data_ptr<uint8_t>(), q ? nullptr : s.absmax.data_ptr<float>(), q ? s.absmax.data_ptr<uint8_t>() : nullptr,
      q ? s.nested.data_ptr<float>() : nullptr, q ? s.code.data_ptr<float>() : nullptr,
      q ? s.offset.data_ptr<float>() : nullptr, blocksize, quant_type == "nf4" ? 0 : 1, out.numel(), out.data_ptr(),
      dtype_code(dtype), at::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == 0, "lowbit dequantize_4bit CUDA launch failed: ", cudaGetErrorString((cudaError_t)err));
  return out;
}

at::Tensor gemv_cuda(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& absmax,
                     const c10::optional<at::Tensor>& na, const c10::optional<at::Tensor>& nc,
                     const c10::optional<at::Tensor>& off, int64_t blocksize, c10::string_view quant_type,
                     at::IntArrayRef shape) {
  const int64_t N = shape[0], K = shape[1];
  auto x2 = x.reshape({-1, K}).contiguous();
  const int64_t M = x2.size(0);
  if (M > 16) {
    auto w = dequantize_cuda(packed, absmax, na, nc, off, blocksize, quant_type, shape, x.scalar_type());
    return at::matmul(x, w.t());
  }
  State s = prep(packed, absmax, na, nc, off);
  auto y = at::empty({M, N}, x.options());
  const bool q = s.absmax.scalar_type() == at::kByte;
  const int err = lowbit_cuda_gemv_4bit(
      x2.data_ptr(), static_cast<int>(M), s.packed.data_ptr<uint8_t>(), q ? nullptr : s.absmax.data_ptr<float>(),
      q ? s.absmax.data_ptr<uint8_t>() : nullptr, q ? s.nested.data_ptr<float>() : nullptr,
      q ? s.code.data_ptr<float>() : nullptr, q ? s.offset.data_ptr<float>() : nullptr, blocksize,
      quant_type == "nf4" ? 0 : 1, N, K, y.data_ptr(), dtype_code(x.scalar_type()), at::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == 0, "lowbit gemv_4bit CUDA launch failed: ", cudaGetErrorString((cudaError_t)err));
  std::vector<int64_t> out_shape(x.sizes().begin(), x.sizes().end() - 1);
  out_shape.push_back(N);
  return y.reshape(out_shape);
}

}  // namespace

TORCH_LIBRARY_IMPL(lowbit, CUDA, m) {
  m.impl("dequantize_4bit", &dequantize_cuda);
  m.impl("gemv_4bit", &gemv_cuda);
}
