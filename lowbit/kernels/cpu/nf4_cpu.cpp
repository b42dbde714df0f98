// CPU backend of the lowbit:: op catalog: NF4/FP4 dequantize (nested absmax decoded in the
// same pass), quantize, and a fused small-M dequant-matmul. This file is the torch glue:
// argument checks, the ISA choice, and OpenMP over blocks/rows; the kernels are in
// nf4_{scalar,avx2,avx512}.cpp behind nf4_kernels.h. Per-element math comes from
// ../cuda/nf4_math.cuh, the same source the CUDA kernels use.
//
// ISA: the best the CPU has (AVX-512 F/BW/VL+BF16, else AVX2+FMA+F16C, else scalar), or
// LOWBIT_CPU_ISA=avx512|avx2|scalar, read once on first use (at run time: one build serves
// every machine and every setting). torch.ops.lowbit_cpu.isa() reports the one in use.
#include <torch/library.h>
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <algorithm>
#include <cstdlib>
#include <cstring>
#include "nf4_kernels.h"

namespace {

using namespace lowbit_cpu;
using lowbit::code_value;

Isa active_isa() {
  static const Isa isa = [] {
    const Isa best = best_isa();
    IsaRequest why;
    const Isa got = requested_isa(best, &why);
    if (why == IsaRequest::Unknown) {
      TORCH_WARN("lowbit: LOWBIT_CPU_ISA=", std::getenv("LOWBIT_CPU_ISA"), " is not one of avx512, avx2, scalar, auto; using ",
                 isa_name(best));
    } else if (why == IsaRequest::Unsupported) {  // levels nest: a lower one always works
      TORCH_WARN("lowbit: LOWBIT_CPU_ISA=", std::getenv("LOWBIT_CPU_ISA"), " is not supported by this CPU; using ",
                 isa_name(best));
    }
    return got;
  }();
  return isa;
}

std::string isa_op() { return isa_name(active_isa()); }

std::vector<std::string> supported_isas_op() {
  std::vector<std::string> out;
  for (int i = static_cast<int>(best_isa()); i >= 0; --i) out.emplace_back(isa_name(static_cast<Isa>(i)));
  return out;
}

int qtype_of(const std::string& s) {
  TORCH_CHECK(s == "nf4" || s == "fp4", "quant_type must be nf4 or fp4, got ", s);
  return s == "nf4" ? lowbit::NF4 : lowbit::FP4;
}

int kind_of(at::ScalarType t, const char* what) {
  if (t == at::kFloat) return F32;
  if (t == at::kBFloat16) return BF16;
  if (t == at::kHalf) return F16;
  TORCH_CHECK(false, what, " must be float32, bfloat16 or float16, got ", t);
}

AbsmaxView make_absmax(const at::Tensor& absmax, const c10::optional<at::Tensor>& nested_absmax,
                       const c10::optional<at::Tensor>& nested_code, const c10::optional<at::Tensor>& offset) {
  AbsmaxView v;
  if (absmax.scalar_type() == at::kByte) {
    TORCH_CHECK(nested_absmax && nested_code && offset, "uint8 absmax needs nested_absmax, nested_code and offset");
    v.q = absmax.data_ptr<uint8_t>();
    v.nested = nested_absmax->data_ptr<float>();
    v.nested_code = nested_code->data_ptr<float>();
    v.offset = offset->item<float>();
  } else {
    TORCH_CHECK(absmax.scalar_type() == at::kFloat, "absmax must be float32 or uint8");
    v.f32 = absmax.data_ptr<float>();
  }
  return v;
}

// ---- dequantize -----------------------------------------------------------------------
void dequantize_4bit_into_cpu(const at::Tensor& packed, const at::Tensor& absmax,
                              const c10::optional<at::Tensor>& nested_absmax,
                              const c10::optional<at::Tensor>& nested_code, const c10::optional<at::Tensor>& offset,
                              int64_t blocksize, c10::string_view quant_type, at::IntArrayRef shape,
                              const at::Tensor& out) {
  const int qt = qtype_of(std::string(quant_type));
  TORCH_CHECK(out.is_contiguous(), "dequantize_4bit_into: out must be contiguous");
  TORCH_CHECK(blocksize > 0, "invalid blocksize ", blocksize);
  auto p = packed.contiguous().view(at::kByte);
  auto nested_c = nested_absmax ? c10::optional<at::Tensor>(nested_absmax->contiguous()) : c10::nullopt;
  auto am_t = absmax.contiguous();
  int64_t n = 1;
  for (auto s : shape) n *= s;
  TORCH_CHECK(out.numel() == n, "dequantize_4bit_into: out has ", out.numel(), " elements, shape needs ", n);
  TORCH_CHECK(p.numel() * 2 >= n, "packed holds ", p.numel() * 2, " codes, shape needs ", n);
  DequantJob j;
  j.packed = p.data_ptr<uint8_t>();
  j.am = make_absmax(am_t, nested_c, nested_code, offset);
  for (int q = 0; q < 16; ++q) j.code[q] = code_value(qt, q);
  j.blocksize = blocksize;
  j.n = n;
  j.kind = kind_of(out.scalar_type(), "dequantize_4bit: dtype");
  j.out = out.data_ptr();
  // the vector paths start every block on a whole packed byte and vector: true for all of
  // bitsandbytes' blocksizes (32 ... 4096)
  const Isa isa = blocksize % 32 == 0 ? active_isa() : Isa::Scalar;
  const int64_t esize = j.kind == F32 ? 4 : 2;
  // stream only big outputs, and only from aligned rows: a small weight dequantized for the
  // matmul right after it should stay in cache
  j.stream = isa != Isa::Scalar && n * esize > (int64_t(24) << 20) &&
             reinterpret_cast<uintptr_t>(j.out) % 64 == 0 && (blocksize * esize) % 64 == 0;
  const int64_t nblocks = (n + blocksize - 1) / blocksize;
  at::parallel_for(0, nblocks, 16, [&](int64_t b0, int64_t b1) {
    if (isa == Isa::Avx512) dequant_blocks_avx512(j, b0, b1);
    else if (isa == Isa::Avx2) dequant_blocks_avx2(j, b0, b1);
    else dequant_blocks_scalar(j, b0, b1);
  });
}

at::Tensor dequantize_4bit_cpu(const at::Tensor& packed, const at::Tensor& absmax,
                               const c10::optional<at::Tensor>& nested_absmax,
                               const c10::optional<at::Tensor>& nested_code, const c10::optional<at::Tensor>& offset,
                               int64_t blocksize, c10::string_view quant_type, at::IntArrayRef shape,
                               at::ScalarType dtype) {
  auto out = at::empty(shape, packed.options().dtype(dtype));
  dequantize_4bit_into_cpu(packed, absmax, nested_absmax, nested_code, offset, blocksize, quant_type, shape, out);
  return out;
}

// ---- quantize (4-bit part; bitsandbytes' arithmetic, see lowbit/format/blockwise.py) ----
std::tuple<at::Tensor, at::Tensor> quantize_4bit_cpu(const at::Tensor& w_in, int64_t blocksize,
                                                     c10::string_view quant_type) {
  const int qt = qtype_of(std::string(quant_type));
  TORCH_CHECK(blocksize >= 32 && blocksize <= 4096 && (blocksize & (blocksize - 1)) == 0,
              "invalid blocksize ", blocksize);
  auto w = w_in.contiguous();
  const int64_t n = w.numel();
  const int64_t nblocks = (n + blocksize - 1) / blocksize;
  auto packed = at::empty({(n + 1) / 2, 1}, w.options().dtype(at::kByte));
  auto absmax = at::empty({nblocks}, w.options().dtype(at::kFloat));
  QuantJob j;
  j.w = w.data_ptr();
  j.kind = kind_of(w.scalar_type(), "quantize_4bit: weights");
  j.blocksize = blocksize;
  j.n = n;
  j.full_blocks = n / blocksize;
  // sorted code book, midpoints in fp32 exactly as the reference computes them
  float code[16], sorted[16];
  for (int q = 0; q < 16; ++q) { code[q] = code_value(qt, q); j.order[q] = q; }
  std::stable_sort(j.order, j.order + 16, [&](uint8_t a, uint8_t b) { return code[a] < code[b]; });
  for (int q = 0; q < 16; ++q) sorted[q] = code[j.order[q]];
  for (int t = 0; t < 15; ++t) j.bounds[t] = (sorted[t] + sorted[t + 1]) / 2.0f;
  int zero_k = 0;  // the code of a padded 0.0: bucketize(0.0)
  for (int t = 0; t < 15; ++t) zero_k += j.bounds[t] < 0.0f;
  j.pad = j.order[zero_k];
  j.packed = packed.data_ptr<uint8_t>();
  j.absmax = absmax.data_ptr<float>();
  const Isa isa = active_isa();
  at::parallel_for(0, nblocks, 16, [&](int64_t b0, int64_t b1) {
    if (isa == Isa::Avx512) quant_blocks_avx512(j, b0, b1);
    else if (isa == Isa::Avx2) quant_blocks_avx2(j, b0, b1);
    else quant_blocks_scalar(j, b0, b1);
  });
  return {packed, absmax};
}

// ---- fused small-M dequant-matmul: y[m, n] = sum_k x[m, k] * deq(W)[n, k] ---------------
at::Tensor gemv_4bit_cpu(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& absmax,
                         const c10::optional<at::Tensor>& nested_absmax, const c10::optional<at::Tensor>& nested_code,
                         const c10::optional<at::Tensor>& offset, int64_t blocksize, c10::string_view quant_type,
                         at::IntArrayRef shape) {
  const int qt = qtype_of(std::string(quant_type));
  TORCH_CHECK(shape.size() == 2, "gemv_4bit: weight shape must be 2-D");
  const int64_t N = shape[0], K = shape[1];
  TORCH_CHECK(x.size(-1) == K, "gemv_4bit: x has ", x.size(-1), " features, weight expects ", K);
  auto x2 = x.reshape({-1, K});
  std::vector<int64_t> out_shape(x.sizes().begin(), x.sizes().end() - 1);
  out_shape.push_back(N);
  GemvJob j;
  j.M = x2.size(0);
  j.N = N;
  j.K = K;
  j.blocksize = blocksize;
  const Isa isa = active_isa();
  const auto xt = x.scalar_type();
  const bool fast = j.M >= 1 && j.M <= 16 && N > 0 && blocksize >= 32 && (blocksize & (blocksize - 1)) == 0 &&
                    (xt == at::kFloat || xt == at::kBFloat16) &&
                    ((isa == Isa::Avx512 && K % 16 == 0) || (isa == Isa::Avx2 && K % 8 == 0));
  if (!fast) {  // general case (fp16 x included): dequantize once, then the BLAS matmul
    auto w = dequantize_4bit_cpu(packed, absmax, nested_absmax, nested_code, offset, blocksize, quant_type, shape,
                                 x.scalar_type());
    return at::matmul(x, w.t());
  }
  // bf16 x: AVX-512-BF16 dot products straight from bf16; otherwise widen x to fp32 once
  // (M x K values) rather than in the inner loop once per weight row
  j.kind = xt == at::kBFloat16 && isa == Isa::Avx512 && gemv_dpbf16_fits(j) ? BF16 : F32;
  auto xc = j.kind == BF16 ? x2.contiguous() : x2.to(at::kFloat).contiguous();
  auto p = packed.contiguous().view(at::kByte);
  TORCH_CHECK(p.numel() * 2 >= N * K, "packed holds ", p.numel() * 2, " codes, shape needs ", N * K);
  auto am_t = absmax.contiguous();
  auto nested_c = nested_absmax ? c10::optional<at::Tensor>(nested_absmax->contiguous()) : c10::nullopt;
  j.am = make_absmax(am_t, nested_c, nested_code, offset);
  j.bs_shift = __builtin_ctzll(static_cast<unsigned long long>(blocksize));
  j.packed = p.data_ptr<uint8_t>();
  for (int q = 0; q < 16; ++q) {
    j.code[q] = code_value(qt, q);
    j.code_bf16[q] = j.code_bf16[q + 16] = lowbit::f32_to_bf16_bits(j.code[q]);
  }
  auto y = at::empty({j.M, N}, xc.options());
  j.x = xc.data_ptr();
  at::Tensor xperm;
  if (isa == Isa::Avx512) {
    xperm = at::empty_like(xc);
    gemv_prepare_x_avx512(j, xperm.data_ptr());
    j.x = xperm.data_ptr();
  }
  j.y = y.data_ptr();
  at::parallel_for(0, N, 16, [&](int64_t n0, int64_t n1) {
    if (isa == Isa::Avx512) gemv_rows_avx512(j, n0, n1);
    else gemv_rows_avx2(j, n0, n1);
  });
  if (y.scalar_type() != xt) y = y.to(xt);  // fp32 sums rounded once, as the bf16 kernel does
  return y.reshape(out_shape);
}

}  // namespace

TORCH_LIBRARY(lowbit_cpu, m) {
  m.def("isa() -> str", &isa_op);
  m.def("supported_isas() -> str[]", &supported_isas_op);
}

TORCH_LIBRARY_IMPL(lowbit, CPU, m) {
  m.impl("dequantize_4bit", &dequantize_4bit_cpu);
  m.impl("dequantize_4bit_into", &dequantize_4bit_into_cpu);
  m.impl("quantize_4bit", &quantize_4bit_cpu);
  m.impl("gemv_4bit", &gemv_4bit_cpu);
}
