// CPU backend of the lowbit:: op catalog: NF4/FP4 dequantize (nested absmax decoded in the
// same pass), quantize, and a fused small-M dequant-matmul. OpenMP over blocks/rows;
// AVX-512 (+BF16) intrinsics chosen at run time, scalar code multiversioned for AVX2.
// Per-element math comes from ../cuda/nf4_math.cuh, the same source the CUDA kernels use.
#include <torch/library.h>
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <cstring>
#include "../cuda/nf4_math.cuh"

namespace {

using lowbit::code_value;

struct AbsmaxView {  // per-block absmax, fp32 or double-quantized
  const float* f32 = nullptr;
  const uint8_t* q = nullptr;
  const float* nested = nullptr;
  const float* nested_code = nullptr;
  float offset = 0.f;
  int nested_shift = 8;  // bitsandbytes' nested blocksize is always 256
  inline float get(int64_t b) const {
    return lowbit::block_absmax(f32, q, nested, nested_code, offset, b, nested_shift);
  }
};

int qtype_of(const std::string& s) {
  TORCH_CHECK(s == "nf4" || s == "fp4", "quant_type must be nf4 or fp4, got ", s);
  return s == "nf4" ? lowbit::NF4 : lowbit::FP4;
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

bool cpu_has_avx512bf16() {
  static const bool ok = (__builtin_cpu_init(), true) && __builtin_cpu_supports("avx512f") &&
                         __builtin_cpu_supports("avx512bw") &&
                         __builtin_cpu_supports("avx512bf16");
  return ok;
}

// ---- dequantize -----------------------------------------------------------------------
template <typename Out>
inline void store_scalar(Out* out, int64_t i, float v);
template <> inline void store_scalar<float>(float* out, int64_t i, float v) { out[i] = v; }
template <> inline void store_scalar<uint16_t>(uint16_t* out, int64_t i, float v) { out[i] = lowbit::f32_to_bf16_bits(v); }
struct Half16 { uint16_t v; };
template <> inline void store_scalar<Half16>(Half16* out, int64_t i, float v) { out[i].v = lowbit::f32_to_f16_bits(v); }

template <typename Out>
__attribute__((target_clones("avx2", "default")))
void dequant_range_scalar(const uint8_t* packed, int qt, float a, Out* out, int64_t start, int64_t end) {
  for (int64_t i = start; i < end; ++i) store_scalar<Out>(out, i, lowbit::dequant_element(packed, qt, a, i));
}

// 16 elements (8 packed bytes) → 16 fp32 codes * absmax, in element order.
__attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16")))
inline __m512 decode16(const uint8_t* bytes, __m512 table, __m512 scale) {
  const __m128i b = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(bytes));
  const __m128i m = _mm_set1_epi8(0x0F);
  const __m128i hi = _mm_and_si128(_mm_srli_epi16(b, 4), m);
  const __m128i lo = _mm_and_si128(b, m);
  const __m512i idx = _mm512_cvtepu8_epi32(_mm_unpacklo_epi8(hi, lo));  // hi0 lo0 hi1 lo1 ...
  return _mm512_mul_ps(_mm512_permutexvar_ps(idx, table), scale);
}

// stream=true: non-temporal stores, for outputs far larger than the cache (no
// read-for-ownership of lines that will not be reused before eviction anyway).
template <typename Out>
__attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16")))
void dequant_block_avx512(const uint8_t* packed, const float* code, float a, Out* out, int64_t start, int64_t len,
                          bool stream) {
  const __m512 table = _mm512_loadu_ps(code);
  const __m512 scale = _mm512_set1_ps(a);
  int64_t i = 0;
  for (; i + 16 <= len; i += 16) {
    const __m512 v = decode16(packed + ((start + i) >> 1), table, scale);
    if constexpr (std::is_same<Out, float>::value) {
      if (stream) _mm512_stream_ps(out + start + i, v);
      else _mm512_storeu_ps(out + start + i, v);
    } else {
      __m256i h;
      if constexpr (std::is_same<Out, uint16_t>::value) h = (__m256i)_mm512_cvtneps_pbh(v);
      else h = _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
      if (stream) _mm256_stream_si256(reinterpret_cast<__m256i*>(out + start + i), h);
      else _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + start + i), h);
    }
  }
  for (; i < len; ++i) store_scalar<Out>(out, start + i, code[lowbit::nibble(packed, start + i)] * a);
}

template <typename Out>
void dequant_all(const uint8_t* packed, const AbsmaxView& am, int qt, int64_t blocksize, int64_t n, Out* out) {
  float code[16];
  for (int q = 0; q < 16; ++q) code[q] = code_value(qt, q);
  const int64_t nblocks = (n + blocksize - 1) / blocksize;
  const bool vec = cpu_has_avx512bf16();
  // stream only big outputs, and only from aligned rows: a small weight dequantized for the
  // matmul right after it should stay in cache
  const bool stream = vec && n * int64_t(sizeof(Out)) > (int64_t(24) << 20) &&
                      reinterpret_cast<uintptr_t>(out) % 64 == 0 && (blocksize * sizeof(Out)) % 64 == 0;
  at::parallel_for(0, nblocks, 16, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t start = b * blocksize, len = std::min(blocksize, n - start);
      const float a = am.get(b);
      if (vec) dequant_block_avx512<Out>(packed, code, a, out, start, len, stream && len == blocksize);
      else dequant_range_scalar<Out>(packed, qt, a, out, start, start + len);
    }
    if (stream) _mm_sfence();
  });
}

void dequantize_4bit_into_cpu(const at::Tensor& packed, const at::Tensor& absmax,
                              const c10::optional<at::Tensor>& nested_absmax,
                              const c10::optional<at::Tensor>& nested_code, const c10::optional<at::Tensor>& offset,
                              int64_t blocksize, c10::string_view quant_type, at::IntArrayRef shape,
                              const at::Tensor& out) {
  const int qt = qtype_of(std::string(quant_type));
  TORCH_CHECK(out.is_contiguous(), "dequantize_4bit_into: out must be contiguous");
  auto p = packed.contiguous().view(at::kByte);
  auto am_t = absmax.contiguous();
  const AbsmaxView am = make_absmax(am_t, nested_absmax, nested_code, offset);
  int64_t n = 1;
  for (auto s : shape) n *= s;
  TORCH_CHECK(out.numel() == n, "dequantize_4bit_into: out has ", out.numel(), " elements, shape needs ", n);
  TORCH_CHECK(p.numel() * 2 >= n, "packed holds ", p.numel() * 2, " codes, shape needs ", n);
  const uint8_t* pp = p.data_ptr<uint8_t>();
  const auto dtype = out.scalar_type();
  if (dtype == at::kFloat) dequant_all<float>(pp, am, qt, blocksize, n, out.data_ptr<float>());
  else if (dtype == at::kBFloat16) dequant_all<uint16_t>(pp, am, qt, blocksize, n, reinterpret_cast<uint16_t*>(out.data_ptr()));
  else if (dtype == at::kHalf) dequant_all<Half16>(pp, am, qt, blocksize, n, reinterpret_cast<Half16*>(out.data_ptr()));
  else TORCH_CHECK(false, "dequantize_4bit: dtype must be float32, bfloat16 or float16");
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
template <typename In>
inline float load_f32(const In* w, int64_t i) { return static_cast<float>(w[i]); }  // exact for bf16/fp16

template <typename In>
__attribute__((target_clones("avx512f", "avx2", "default")))
void quantize_block(const In* w, int64_t start, int64_t len, bool tail, const float* bounds, const uint8_t* order,
                    uint8_t pad, uint8_t* packed, float* absmax_out, int64_t b) {
  float am = 0.f;
  for (int64_t i = 0; i < len; ++i) am = std::max(am, std::fabs(load_f32<In>(w, start + i)));
  absmax_out[b] = am;
  const float amc = std::max(am, 1e-38f);
  const float inv = 1.0f / amc;
  uint8_t q[4096];
  for (int64_t i = 0; i < len; ++i) {
    const float x = load_f32<In>(w, start + i);
    float s = tail ? x / amc : x * inv;  // reference: multiply by 1/absmax, divide in the tail block
    s = std::min(1.0f, std::max(-1.0f, s));
    int k = 0;
    for (int j = 0; j < 15; ++j) k += bounds[j] < s;  // bucketize(right=False)
    q[i] = order[k];
  }
  for (int64_t i = 0; i < len; i += 2) {
    const uint8_t lo = (i + 1 < len) ? q[i + 1] : pad;  // odd length: the reference pads with 0.0
    packed[(start + i) >> 1] = static_cast<uint8_t>((q[i] << 4) | lo);
  }
}

// AVX-512 version of quantize_block for full blocks (len % 16 == 0, multiply by 1/absmax):
// the same fp32 operations in the same order, so the bytes are identical.
template <typename In>
__attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16")))
inline __m512 load16_f32(const In* w) {
  if constexpr (std::is_same<In, float>::value) {
    return _mm512_loadu_ps(w);
  } else if constexpr (std::is_same<In, at::BFloat16>::value) {
    const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w));
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(v), 16));
  } else {
    return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(w)));
  }
}

template <typename In>
__attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16")))
void quantize_full_block_avx512(const In* w, int64_t start, int64_t len, const float* bounds, const uint8_t* order,
                                uint8_t* packed, float* absmax_out, int64_t b) {
  __m512 vmax = _mm512_setzero_ps();
  for (int64_t i = 0; i < len; i += 16) vmax = _mm512_max_ps(vmax, _mm512_abs_ps(load16_f32<In>(w + start + i)));
  const float am = _mm512_reduce_max_ps(vmax);
  absmax_out[b] = am;
  const __m512 inv = _mm512_set1_ps(1.0f / std::max(am, 1e-38f));
  const __m512 one = _mm512_set1_ps(1.0f), neg_one = _mm512_set1_ps(-1.0f);
  int32_t ord32[16];
  for (int q = 0; q < 16; ++q) ord32[q] = order[q];
  const __m512i ordv = _mm512_loadu_si512(ord32);
  const __m512i ones = _mm512_set1_epi32(1);
  for (int64_t i = 0; i < len; i += 16) {
    __m512 s = _mm512_mul_ps(load16_f32<In>(w + start + i), inv);
    s = _mm512_min_ps(one, _mm512_max_ps(neg_one, s));
    __m512i k = _mm512_setzero_si512();
    for (int j = 0; j < 15; ++j)  // bucketize(right=False): count bounds strictly below s
      k = _mm512_mask_add_epi32(k, _mm512_cmp_ps_mask(_mm512_set1_ps(bounds[j]), s, _CMP_LT_OQ), k, ones);
    const __m128i c = _mm512_cvtepi32_epi8(_mm512_permutexvar_epi32(k, ordv));  // 16 codes, one per byte
    const __m128i hi = _mm_slli_epi16(_mm_and_si128(c, _mm_set1_epi16(0x000F)), 4);
    const __m128i v = _mm_or_si128(hi, _mm_srli_epi16(c, 8));                    // even << 4 | odd
    _mm_storel_epi64(reinterpret_cast<__m128i*>(packed + ((start + i) >> 1)), _mm_packus_epi16(v, v));
  }
}

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
  // sorted code book, midpoints in fp32 exactly as the reference computes them
  float code[16], sorted[16], bounds[15];
  uint8_t order[16];
  for (int q = 0; q < 16; ++q) { code[q] = code_value(qt, q); order[q] = q; }
  std::stable_sort(order, order + 16, [&](uint8_t a, uint8_t b) { return code[a] < code[b]; });
  for (int q = 0; q < 16; ++q) sorted[q] = code[order[q]];
  for (int j = 0; j < 15; ++j) bounds[j] = (sorted[j] + sorted[j + 1]) / 2.0f;
  int zero_k = 0;  // the code of a padded 0.0: bucketize(0.0)
  for (int j = 0; j < 15; ++j) zero_k += bounds[j] < 0.0f;
  const uint8_t pad = order[zero_k];
  const int64_t full_blocks = n / blocksize;
  uint8_t* pp = packed.data_ptr<uint8_t>();
  float* ap = absmax.data_ptr<float>();
  const bool vec = cpu_has_avx512bf16();
  auto run = [&](auto* wp) {
    using scalar_t = std::remove_const_t<std::remove_pointer_t<decltype(wp)>>;
    at::parallel_for(0, nblocks, 16, [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) {
        const int64_t start = b * blocksize, len = std::min(blocksize, n - start);
        if (vec && b < full_blocks && len % 16 == 0)
          quantize_full_block_avx512<scalar_t>(wp, start, len, bounds, order, pp, ap, b);
        else
          quantize_block<scalar_t>(wp, start, len, b >= full_blocks, bounds, order, pad, pp, ap, b);
      }
    });
  };
  const auto st = w.scalar_type();
  if (st == at::kFloat) run(w.data_ptr<float>());
  else if (st == at::kBFloat16) run(w.data_ptr<at::BFloat16>());
  else if (st == at::kHalf) run(w.data_ptr<at::Half>());
  else TORCH_CHECK(false, "quantize_4bit: weights must be float32, bfloat16 or float16, got ", st);
  return {packed, absmax};
}

// ---- fused small-M dequant-matmul: y[m, n] = sum_k x[m, k] * deq(W)[n, k] ---------------
// 32 codes (16 packed bytes) → 32 bf16 code values (unscaled), in element order.
__attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16")))
inline __m512i decode32_bf16(const uint8_t* bytes, __m512i table_bf16) {
  const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(bytes));
  const __m128i m = _mm_set1_epi8(0x0F);
  const __m128i hi = _mm_and_si128(_mm_srli_epi16(b, 4), m);
  const __m128i lo = _mm_and_si128(b, m);
  const __m256i inter = _mm256_set_m128i(_mm_unpackhi_epi8(hi, lo), _mm_unpacklo_epi8(hi, lo));
  return _mm512_permutexvar_epi16(_mm512_cvtepu8_epi16(inter), table_bf16);
}

// Rows [n0, n1) of y; a plain function (not a lambda) so it carries the AVX-512 target.
// Per block: dot products of x with the bf16 code values in fp32, then one multiply by
// the block's absmax (so the weight is never materialized). M is a compile-time constant
// so the accumulators live in registers; for small M, P interleaved accumulators per row
// hide the dpbf16 latency chain.
template <int M>
__attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16")))
void gemv_rows_avx512(const uint16_t* x, const uint8_t* packed, const AbsmaxView& am, const uint16_t* tab32,
                      int64_t N, int64_t K, int64_t blocksize, uint16_t* y, int64_t n0, int64_t n1) {
  constexpr int P = M <= 4 ? 2 : 1;
  const __m512i table = _mm512_loadu_si512(tab32);
  const int64_t blocks_per_row = K / blocksize;
  for (int64_t n = n0; n < n1; ++n) {
    __m512 tot[M];
#pragma GCC unroll 16
    for (int m = 0; m < M; ++m) tot[m] = _mm512_setzero_ps();
    const uint8_t* row = packed + (n * K >> 1);
    for (int64_t bb = 0; bb < blocks_per_row; ++bb) {
      __m512 acc[P][M];
#pragma GCC unroll 16
      for (int m = 0; m < M; ++m)
        for (int p = 0; p < P; ++p) acc[p][m] = _mm512_setzero_ps();
      const int64_t k0 = bb * blocksize;
      for (int64_t k = k0; k < k0 + blocksize; k += 32 * P) {
#pragma GCC unroll 2
        for (int p = 0; p < P; ++p) {
          const __m512bh wv = (__m512bh)decode32_bf16(row + ((k + 32 * p) >> 1), table);
#pragma GCC unroll 16
          for (int m = 0; m < M; ++m)
            acc[p][m] = _mm512_dpbf16_ps(acc[p][m], wv, (__m512bh)_mm512_loadu_si512(x + m * K + k + 32 * p));
        }
      }
      const __m512 scale = _mm512_set1_ps(am.get(n * blocks_per_row + bb));
#pragma GCC unroll 16
      for (int m = 0; m < M; ++m) {
        __m512 s = acc[0][m];
        if constexpr (P == 2) s = _mm512_add_ps(s, acc[1][m]);
        tot[m] = _mm512_fmadd_ps(s, scale, tot[m]);
      }
    }
#pragma GCC unroll 16
    for (int m = 0; m < M; ++m) y[m * N + n] = lowbit::f32_to_bf16_bits(_mm512_reduce_add_ps(tot[m]));
  }
}

void gemv_avx512(const uint16_t* x, int64_t M, const uint8_t* packed, const AbsmaxView& am, const uint16_t* code_bf16,
                 int64_t N, int64_t K, int64_t blocksize, uint16_t* y) {
  // vector values never cross the (non-AVX-512) lambda below: only pointers do
  uint16_t tab[32] = {0};
  std::memcpy(tab, code_bf16, 16 * sizeof(uint16_t));
  at::parallel_for(0, N, 16, [&](int64_t n0, int64_t n1) {
    switch (M) {
#define LB_CASE(m) case m: gemv_rows_avx512<m>(x, packed, am, tab, N, K, blocksize, y, n0, n1); break;
      LB_CASE(1) LB_CASE(2) LB_CASE(3) LB_CASE(4) LB_CASE(5) LB_CASE(6) LB_CASE(7) LB_CASE(8)
      LB_CASE(9) LB_CASE(10) LB_CASE(11) LB_CASE(12) LB_CASE(13) LB_CASE(14) LB_CASE(15) LB_CASE(16)
#undef LB_CASE
    }
  });
}

at::Tensor gemv_4bit_cpu(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& absmax,
                         const c10::optional<at::Tensor>& nested_absmax, const c10::optional<at::Tensor>& nested_code,
                         const c10::optional<at::Tensor>& offset, int64_t blocksize, c10::string_view quant_type,
                         at::IntArrayRef shape) {
  const int qt = qtype_of(std::string(quant_type));
  TORCH_CHECK(shape.size() == 2, "gemv_4bit: weight shape must be 2-D");
  const int64_t N = shape[0], K = shape[1];
  TORCH_CHECK(x.size(-1) == K, "gemv_4bit: x has ", x.size(-1), " features, weight expects ", K);
  auto x2 = x.reshape({-1, K});
  const int64_t M = x2.size(0);
  const bool fast = cpu_has_avx512bf16() && x.scalar_type() == at::kBFloat16 && M >= 1 && M <= 16 &&
                    K % 64 == 0 && blocksize % 64 == 0 && K % blocksize == 0;
  std::vector<int64_t> out_shape(x.sizes().begin(), x.sizes().end() - 1);
  out_shape.push_back(N);
  if (!fast) {  // general case: dequantize once, then the BLAS matmul
    auto w = dequantize_4bit_cpu(packed, absmax, nested_absmax, nested_code, offset, blocksize, quant_type, shape,
                                 x.scalar_type());
    return at::matmul(x, w.t());
  }
  auto xc = x2.contiguous();
  auto p = packed.contiguous().view(at::kByte);
  auto am_t = absmax.contiguous();
  const AbsmaxView am = make_absmax(am_t, nested_absmax, nested_code, offset);
  uint16_t code[16];
  for (int q = 0; q < 16; ++q) code[q] = lowbit::f32_to_bf16_bits(code_value(qt, q));
  auto y = at::empty({M, N}, x.options());
  const uint16_t* xp = reinterpret_cast<const uint16_t*>(xc.data_ptr());
  uint16_t* yp = reinterpret_cast<uint16_t*>(y.data_ptr());
  const uint8_t* pp = p.data_ptr<uint8_t>();
  gemv_avx512(xp, M, pp, am, code, N, K, blocksize, yp);
  return y.reshape(out_shape);
}

}  // namespace

TORCH_LIBRARY_IMPL(lowbit, CPU, m) {
  m.impl("dequantize_4bit", &dequantize_4bit_cpu);
  m.impl("dequantize_4bit_into", &dequantize_4bit_into_cpu);
  m.impl("quantize_4bit", &quantize_4bit_cpu);
  m.impl("gemv_4bit", &gemv_4bit_cpu);
}
