// Torch binding of the CUDA kernels (built only where torch has CUDA): registers every
// lowbit:: op of the catalog (lowbit/kernels/ops.py) for the CUDA dispatch key. The C++
// signatures must match those schemas exactly (torch checks them when both meet;
// scripts/check_cuda_binding.sh checks them without a GPU).
//
// Only c10's stream and guard headers: ATen/cuda/CUDAContext.h pulls in cuBLAS/cuSPARSE
// headers, which a CUDA toolkit without those libraries lacks, and nothing here needs them
// (matmul_4bit_dx reaches cuBLAS through at::matmul).
#include <torch/library.h>
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>
#include <string>
#include <vector>
#include "nf4_launch.cuh"

namespace {

int dtype_code(at::ScalarType t, const char* what) {
  if (t == at::kFloat) return 0;
  if (t == at::kBFloat16) return 1;
  TORCH_CHECK(t == at::kHalf, what, " must be float32, bfloat16 or float16, got ", t);
  return 2;
}

int qtype_of(c10::string_view s) {
  TORCH_CHECK(s == "nf4" || s == "fp4", "quant_type must be nf4 or fp4, got ", std::string(s));
  return s == "nf4" ? lowbit::NF4 : lowbit::FP4;
}

// The kernels index blocks by shift and give each thread 8 elements of one block.
void check_blocksize(int64_t blocksize) {
  TORCH_CHECK(blocksize >= 32 && blocksize <= 4096 && (blocksize & (blocksize - 1)) == 0,
              "invalid blocksize ", blocksize, ": choose a power of two from 32 to 4096");
}

void check_cuda(const at::Tensor& t, const at::Tensor& like, const char* what) {
  TORCH_CHECK(t.device() == like.device(), "lowbit CUDA op: ", what, " is on ", t.device(), ", expected ",
              like.device());
}

void check_launch(int err, const char* op) {
  TORCH_CHECK(err == 0, "lowbit ", op, " CUDA launch failed: ", cudaGetErrorString(static_cast<cudaError_t>(err)));
}

int64_t numel_of(at::IntArrayRef shape) {
  int64_t n = 1;
  for (auto s : shape) n *= s;
  return n;
}

// The 4-bit state, contiguous, in the dtypes the kernels read, checked against n elements
// (an out-of-range read on the GPU would not fail, it would return garbage).
struct State {
  at::Tensor packed, absmax, nested, code, offset;
  bool double_quant = false;
  const float* absmax_f32() const { return double_quant ? nullptr : absmax.data_ptr<float>(); }
  const uint8_t* absmax_q() const { return double_quant ? absmax.data_ptr<uint8_t>() : nullptr; }
  const float* nested_ptr() const { return double_quant ? nested.data_ptr<float>() : nullptr; }
  const float* code_ptr() const { return double_quant ? code.data_ptr<float>() : nullptr; }
  const float* offset_ptr() const { return double_quant ? offset.data_ptr<float>() : nullptr; }
};

State prep(const at::Tensor& packed, const at::Tensor& absmax, const c10::optional<at::Tensor>& nested_absmax,
           const c10::optional<at::Tensor>& nested_code, const c10::optional<at::Tensor>& offset, int64_t blocksize,
           int64_t n) {
  check_blocksize(blocksize);
  TORCH_CHECK(packed.is_cuda(), "lowbit CUDA op: packed must be a CUDA tensor");
  check_cuda(absmax, packed, "absmax");
  State s;
  s.packed = packed.contiguous().view(at::kByte);
  TORCH_CHECK(s.packed.numel() * 2 >= n, "packed holds ", s.packed.numel() * 2, " codes, shape needs ", n);
  const int64_t nblocks = (n + blocksize - 1) / blocksize;
  TORCH_CHECK(absmax.numel() >= nblocks, "absmax has ", absmax.numel(), " blocks, shape needs ", nblocks);
  s.double_quant = absmax.scalar_type() == at::kByte;
  if (!s.double_quant) {
    s.absmax = absmax.to(at::kFloat).contiguous();
    return s;
  }
  TORCH_CHECK(nested_absmax && nested_code && offset, "uint8 absmax needs nested_absmax, nested_code and offset");
  check_cuda(*nested_absmax, packed, "nested_absmax");
  check_cuda(*nested_code, packed, "nested_code");
  TORCH_CHECK(nested_code->numel() == 256, "nested_code must have 256 entries, got ", nested_code->numel());
  TORCH_CHECK(nested_absmax->numel() * 256 >= nblocks, "nested_absmax has ", nested_absmax->numel(),
              " entries, ", nblocks, " blocks need ", (nblocks + 255) / 256);
  TORCH_CHECK(offset->numel() == 1, "offset must be a scalar");
  s.absmax = absmax.contiguous();
  s.nested = nested_absmax->to(at::kFloat).contiguous();
  s.code = nested_code->to(at::kFloat).contiguous();
  // a state loaded from disk may keep its offset on the CPU; the kernels read it on the GPU
  s.offset = offset->to(packed.device(), at::kFloat).contiguous();
  return s;
}

void dequantize_into_cuda(const at::Tensor& packed, const at::Tensor& absmax, const c10::optional<at::Tensor>& na,
                          const c10::optional<at::Tensor>& nc, const c10::optional<at::Tensor>& off, int64_t blocksize,
                          c10::string_view quant_type, at::IntArrayRef shape, const at::Tensor& out) {
  const int qt = qtype_of(quant_type);
  const int64_t n = numel_of(shape);
  TORCH_CHECK(out.numel() == n, "dequantize_4bit_into: out has ", out.numel(), " elements, shape needs ", n);
  check_cuda(out, packed, "out");
  const int dt = dtype_code(out.scalar_type(), "dequantize_4bit: dtype");
  const c10::cuda::CUDAGuard guard(packed.device());
  if (!out.is_contiguous()) {  // the kernel writes a dense buffer; the reference takes any out
    auto dense = at::empty(shape, out.options().memory_format(at::MemoryFormat::Contiguous));
    dequantize_into_cuda(packed, absmax, na, nc, off, blocksize, quant_type, shape, dense);
    out.copy_(dense.view(out.sizes()));
    return;
  }
  const State s = prep(packed, absmax, na, nc, off, blocksize, n);
  check_launch(lowbit_cuda_dequantize_4bit(s.packed.data_ptr<uint8_t>(), s.absmax_f32(), s.absmax_q(), s.nested_ptr(),
                                           s.code_ptr(), s.offset_ptr(), blocksize, qt, n, out.data_ptr(), dt,
                                           c10::cuda::getCurrentCUDAStream()),
               "dequantize_4bit");
}

at::Tensor dequantize_cuda(const at::Tensor& packed, const at::Tensor& absmax, const c10::optional<at::Tensor>& na,
                           const c10::optional<at::Tensor>& nc, const c10::optional<at::Tensor>& off,
                           int64_t blocksize, c10::string_view quant_type, at::IntArrayRef shape, at::ScalarType dtype) {
  auto out = at::empty(shape, packed.options().dtype(dtype));
  dequantize_into_cuda(packed, absmax, na, nc, off, blocksize, quant_type, shape, out);
  return out;
}

std::tuple<at::Tensor, at::Tensor> quantize_cuda(const at::Tensor& w_in, int64_t blocksize,
                                                 c10::string_view quant_type) {
  const int qt = qtype_of(quant_type);
  check_blocksize(blocksize);
  TORCH_CHECK(w_in.is_cuda(), "lowbit CUDA op: w must be a CUDA tensor");
  const int dt = dtype_code(w_in.scalar_type(), "quantize_4bit: weights");
  const c10::cuda::CUDAGuard guard(w_in.device());
  auto w = w_in.contiguous();
  const int64_t n = w.numel();
  auto packed = at::empty({(n + 1) / 2, 1}, w.options().dtype(at::kByte));
  auto absmax = at::empty({(n + blocksize - 1) / blocksize}, w.options().dtype(at::kFloat));
  check_launch(lowbit_cuda_quantize_4bit(w.data_ptr(), dt, n, blocksize, lowbit::quant_tables(qt),
                                         packed.data_ptr<uint8_t>(), absmax.data_ptr<float>(),
                                         c10::cuda::getCurrentCUDAStream()),
               "quantize_4bit");
  return {packed, absmax};
}

at::Tensor gemv_cuda(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& absmax,
                     const c10::optional<at::Tensor>& na, const c10::optional<at::Tensor>& nc,
                     const c10::optional<at::Tensor>& off, int64_t blocksize, c10::string_view quant_type,
                     at::IntArrayRef shape) {
  TORCH_CHECK(shape.size() == 2, "gemv_4bit: the weight must be 2-D, got shape ", shape);
  const int64_t N = shape[0], K = shape[1];
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) == K, "gemv_4bit: x has ", x.dim() ? x.size(-1) : 0,
              " features, the weight ", K);
  check_cuda(x, packed, "x");
  const int qt = qtype_of(quant_type);
  const int dt = dtype_code(x.scalar_type(), "gemv_4bit: x");
  const c10::cuda::CUDAGuard guard(packed.device());
  auto x2 = x.reshape({-1, K}).contiguous();
  const int64_t M = x2.size(0);
  if (M > 16) {  // the kernel keeps 16 accumulators per lane; more rows go to cuBLAS
    auto w = dequantize_cuda(packed, absmax, na, nc, off, blocksize, quant_type, shape, x.scalar_type());
    return at::matmul(x, w.t());
  }
  const State s = prep(packed, absmax, na, nc, off, blocksize, N * K);
  auto y = at::empty({M, N}, x.options());
  check_launch(lowbit_cuda_gemv_4bit(x2.data_ptr(), static_cast<int>(M), s.packed.data_ptr<uint8_t>(), s.absmax_f32(),
                                     s.absmax_q(), s.nested_ptr(), s.code_ptr(), s.offset_ptr(), blocksize, qt, N, K,
                                     y.data_ptr(), dt, c10::cuda::getCurrentCUDAStream()),
               "gemv_4bit");
  std::vector<int64_t> out_shape(x.sizes().begin(), x.sizes().end() - 1);
  out_shape.push_back(N);
  return y.reshape(out_shape);
}

// dX = dY @ deq(W): dequantize in grad's dtype, then cuBLAS.
at::Tensor matmul_dx_cuda(const at::Tensor& grad, const at::Tensor& packed, const at::Tensor& absmax,
                          const c10::optional<at::Tensor>& na, const c10::optional<at::Tensor>& nc,
                          const c10::optional<at::Tensor>& off, int64_t blocksize, c10::string_view quant_type,
                          at::IntArrayRef shape) {
  TORCH_CHECK(shape.size() == 2, "matmul_4bit_dx: the weight must be 2-D, got shape ", shape);
  TORCH_CHECK(grad.dim() >= 1 && grad.size(-1) == shape[0], "matmul_4bit_dx: grad has ",
              grad.dim() ? grad.size(-1) : 0, " features, the weight ", shape[0], " outputs");
  check_cuda(grad, packed, "grad");
  const c10::cuda::CUDAGuard guard(packed.device());
  return at::matmul(grad, dequantize_cuda(packed, absmax, na, nc, off, blocksize, quant_type, shape,
                                          grad.scalar_type()));
}

}  // namespace

TORCH_LIBRARY_IMPL(lowbit, CUDA, m) {
  m.impl("dequantize_4bit", &dequantize_cuda);
  m.impl("dequantize_4bit_into", &dequantize_into_cuda);
  m.impl("quantize_4bit", &quantize_cuda);
  m.impl("gemv_4bit", &gemv_cuda);
  m.impl("matmul_4bit_dx", &matmul_dx_cuda);
}
