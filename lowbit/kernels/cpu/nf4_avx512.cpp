// AVX-512 (F/BW/VL + BF16) kernels: Sapphire Rapids and later, Zen 4 and later.
// Dequantize and quantize are bit-identical to the scalar path; the GEMV differs from the
// reference in summation order (fp32 x) or in bf16 code values (bf16 x, vdpbf16ps).
#include <immintrin.h>
#include <algorithm>
#include <cstring>
#include <type_traits>
#include "nf4_kernels.h"

#define LB_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16")))

namespace lowbit_cpu {

namespace {

// 16 codes (8 packed bytes) -> their 4-bit indices as 32-bit lanes, in element order.
LB_AVX512 inline __m512i codes16(const uint8_t* bytes) {
  const __m128i b = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(bytes));
  const __m128i m = _mm_set1_epi8(0x0F);
  const __m128i hi = _mm_and_si128(_mm_srli_epi16(b, 4), m);
  const __m128i lo = _mm_and_si128(b, m);
  return _mm512_cvtepu8_epi32(_mm_unpacklo_epi8(hi, lo));  // hi0 lo0 hi1 lo1 ...
}

// 32 codes (16 packed bytes) -> their 4-bit indices as 16-bit lanes, in element order.
LB_AVX512 inline __m512i codes32(const uint8_t* bytes) {
  const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(bytes));
  const __m128i m = _mm_set1_epi8(0x0F);
  const __m128i hi = _mm_and_si128(_mm_srli_epi16(b, 4), m);
  const __m128i lo = _mm_and_si128(b, m);
  return _mm512_cvtepu8_epi16(_mm256_set_m128i(_mm_unpackhi_epi8(hi, lo), _mm_unpacklo_epi8(hi, lo)));
}

// ---- dequantize --------------------------------------------------------------------------
// The 16 rounded outputs of one block, code[q] * a as bf16/fp16 bits, in the low 16 16-bit
// lanes. Every element of a block is one of them, so a vpermw lookup gives exactly the
// scalar path's per-element multiply and rounding. bf16 by integer round-to-nearest-even
// (lowbit::f32_to_bf16_bits): vcvtneps2bf16 flushes subnormal inputs to zero, torch does not.
template <int K>
LB_AVX512 inline __m512i block_table_u16(__m512 code, float a) {
  const __m512 v = _mm512_mul_ps(code, _mm512_set1_ps(a));
  __m256i t;
  if constexpr (K == BF16) {
    const __m512i u = _mm512_castps_si512(v);
    const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    __m512i r = _mm512_srli_epi32(_mm512_add_epi32(_mm512_add_epi32(u, _mm512_set1_epi32(0x7fff)), lsb), 16);
    r = _mm512_mask_mov_epi32(r, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q),
                              _mm512_or_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(0x40)));
    t = _mm512_cvtepi32_epi16(r);
  } else {
    t = _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  }
  return _mm512_zextsi256_si512(t);
}

// stream: non-temporal stores, for outputs far larger than the cache (no read-for-ownership
// of lines that will not be reused before eviction anyway).
LB_AVX512 void dequant_blocks_f32(const DequantJob& j, int64_t b0, int64_t b1) {
  const __m512 table = _mm512_loadu_ps(j.code);
  for (int64_t b = b0; b < b1; ++b) {
    const int64_t start = b * j.blocksize, len = std::min(j.blocksize, j.n - start);
    const float a = j.am.get(b);
    const __m512 scale = _mm512_set1_ps(a);
    const bool stream = j.stream && len == j.blocksize;
    float* o = static_cast<float*>(j.out) + start;
    int64_t i = 0;
    for (; i + 16 <= len; i += 16) {
      const __m512 v = _mm512_mul_ps(_mm512_permutexvar_ps(codes16(j.packed + ((start + i) >> 1)), table), scale);
      if (stream) _mm512_stream_ps(o + i, v);
      else _mm512_storeu_ps(o + i, v);
    }
    if (i < len) dequant_range_scalar(j, a, start + i, start + len);
  }
  if (j.stream) _mm_sfence();
}

template <int K>
LB_AVX512 void dequant_blocks_u16(const DequantJob& j, int64_t b0, int64_t b1) {
  const __m512 code = _mm512_loadu_ps(j.code);
  for (int64_t b = b0; b < b1; ++b) {
    const int64_t start = b * j.blocksize, len = std::min(j.blocksize, j.n - start);
    const float a = j.am.get(b);
    const __m512i table = block_table_u16<K>(code, a);
    const bool stream = j.stream && len == j.blocksize;
    uint16_t* o = static_cast<uint16_t*>(j.out) + start;
    int64_t i = 0;
    for (; i + 32 <= len; i += 32) {
      const __m512i v = _mm512_permutexvar_epi16(codes32(j.packed + ((start + i) >> 1)), table);
      if (stream) _mm512_stream_si512(reinterpret_cast<__m512i*>(o + i), v);
      else _mm512_storeu_si512(o + i, v);
    }
    if (i < len) dequant_range_scalar(j, a, start + i, start + len);
  }
  if (j.stream) _mm_sfence();
}

// ---- quantize ----------------------------------------------------------------------------
template <int K>
LB_AVX512 inline __m512 load16(const void* w, int64_t i) {
  if constexpr (K == F32) {
    return _mm512_loadu_ps(static_cast<const float*>(w) + i);
  } else {
    const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(static_cast<const uint16_t*>(w) + i));
    if constexpr (K == BF16) return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(v), 16));
    else return _mm512_cvtph_ps(v);
  }
}

// A full block (len % 16 == 0, multiply by 1/absmax): the scalar path's fp32 operations in
// the same order, so the bytes are identical.
template <int K>
LB_AVX512 void quant_full_block(const QuantJob& j, int64_t b) {
  const int64_t start = b * j.blocksize, len = j.blocksize;
  __m512 vmax = _mm512_setzero_ps();
  for (int64_t i = 0; i < len; i += 16) vmax = _mm512_max_ps(vmax, _mm512_abs_ps(load16<K>(j.w, start + i)));
  const float am = _mm512_reduce_max_ps(vmax);
  j.absmax[b] = am;
  const __m512 inv = _mm512_set1_ps(1.0f / std::max(am, 1e-38f));
  const __m512 one = _mm512_set1_ps(1.0f), neg_one = _mm512_set1_ps(-1.0f);
  int32_t ord32[16];
  for (int q = 0; q < 16; ++q) ord32[q] = j.order[q];
  const __m512i ordv = _mm512_loadu_si512(ord32);
  const __m512i ones = _mm512_set1_epi32(1);
  for (int64_t i = 0; i < len; i += 16) {
    __m512 s = _mm512_mul_ps(load16<K>(j.w, start + i), inv);
    s = _mm512_min_ps(one, _mm512_max_ps(neg_one, s));
    __m512i k = _mm512_setzero_si512();
    for (int t = 0; t < 15; ++t)  // bucketize(right=False): count bounds strictly below s
      k = _mm512_mask_add_epi32(k, _mm512_cmp_ps_mask(_mm512_set1_ps(j.bounds[t]), s, _CMP_LT_OQ), k, ones);
    const __m128i c = _mm512_cvtepi32_epi8(_mm512_permutexvar_epi32(k, ordv));  // 16 codes, one per byte
    const __m128i hi = _mm_slli_epi16(_mm_and_si128(c, _mm_set1_epi16(0x000F)), 4);
    const __m128i v = _mm_or_si128(hi, _mm_srli_epi16(c, 8));                    // even << 4 | odd
    _mm_storel_epi64(reinterpret_cast<__m128i*>(j.packed + ((start + i) >> 1)), _mm_packus_epi16(v, v));
  }
}

template <int K>
LB_AVX512 void quant_blocks(const QuantJob& j, int64_t b0, int64_t b1) {
  for (int64_t b = b0; b < b1; ++b) {
    if (b < j.full_blocks) quant_full_block<K>(j, b);
    else quant_block_scalar(j, b);
  }
}

// ---- fused small-M GEMV -------------------------------------------------------------------
// A dot product does not care in which order the weights come, so the kernels decode them
// in the order that is cheapest to unpack (no shuffles: a broadcast load, one variable
// shift per vector, one table permute) and x is permuted once per call to match
// (gemv_prepare_x_avx512):
//   fp32, per 16 weights: lane 2i = element i, lane 2i+1 = element 8 + i;
//   bf16, per 32 weights: lane 8L + w = element 4w + {1, 0, 3, 2}[L].
LB_AVX512 inline __m512i codes16_lanes(const uint8_t* p) {
  int64_t v;
  std::memcpy(&v, p, 8);
  // every 32-bit lane holds one half of the 8 bytes and shifts its nibble to the bottom;
  // vpermps reads only the low 4 bits
  return _mm512_srlv_epi32(_mm512_set1_epi64(v),
                           _mm512_setr_epi32(4, 4, 0, 0, 12, 12, 8, 8, 20, 20, 16, 16, 28, 28, 24, 24));
}

LB_AVX512 inline __m512i codes32_lanes(const uint8_t* p) {
  // the 16 bytes in every 128-bit lane; 16-bit lane w of 128-bit lane L keeps its own
  // little-endian word shifted right by 4L (vpermw reads the low 5 bits: the table repeats
  // its 16 entries so bit 4, the next nibble, is ignored)
  const __m512i b = _mm512_broadcast_i32x4(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  return _mm512_srlv_epi16(b, _mm512_set_epi64(0x000c000c000c000cLL, 0x000c000c000c000cLL, 0x0008000800080008LL,
                                               0x0008000800080008LL, 0x0004000400040004LL, 0x0004000400040004LL, 0, 0));
}

// bf16 x: vdpbf16ps -------------------------------------------------------------------------
// 32 codes (16 packed bytes) -> 32 bf16 code values (unscaled), in the permuted lane order.
LB_AVX512 inline __m512i decode32_bf16(const uint8_t* bytes, __m512i table_bf16) {
  return _mm512_permutexvar_epi16(codes32_lanes(bytes), table_bf16);
}

// Per block: dot products of x with the bf16 code values in fp32, then one multiply by the
// block's absmax (so the weight is never materialized). M is a compile-time constant so the
// accumulators live in registers; for small M, P interleaved accumulators per row hide the
// dpbf16 latency chain. Needs K % blocksize == 0 and blocksize % 64 == 0.
template <int M>
LB_AVX512 void gemv_bf16_dp(const GemvJob& j, int64_t n0, int64_t n1) {
  constexpr int P = M <= 4 ? 2 : 1;
  const __m512i table = _mm512_loadu_si512(j.code_bf16);
  const int64_t K = j.K, blocksize = j.blocksize, blocks_per_row = K / blocksize;
  const uint16_t* x = static_cast<const uint16_t*>(j.x);
  uint16_t* y = static_cast<uint16_t*>(j.y);
  const uint8_t* packed = j.packed;
  const int64_t N = j.N;
  const AbsmaxRegs am(j.am);
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
      const uint8_t* pk = row + (k0 >> 1);  // 16 bytes per 32 weights
      _mm_prefetch(reinterpret_cast<const char*>(pk) + 1024, _MM_HINT_T0);  // why: nf4_avx2.cpp, gemv_group
      for (int64_t k = k0; k < k0 + blocksize; k += 32 * P, pk += 16 * P) {
#pragma GCC unroll 2
        for (int p = 0; p < P; ++p) {
          const __m512bh wv = (__m512bh)decode32_bf16(pk + 16 * p, table);
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

// fp32 x: fp32 weights ----------------------------------------------------------------------
// Weights decoded to exactly the reference's fp32 values (code * absmax, a per-block scaled
// table), FMA into M accumulators (M <= 16 fit the 32 zmm registers). Rows may cross block
// boundaries anywhere on a 16-weight step.
template <int M>
LB_AVX512 void gemv_f32(const GemvJob& j, int64_t n0, int64_t n1) {
  constexpr int P = M == 1 ? 4 : (M <= 3 ? 2 : 1);
  const __m512 code = _mm512_loadu_ps(j.code);
  const int64_t K = j.K, N = j.N;
  const int shift = j.bs_shift;
  const uint8_t* packed = j.packed;
  const float* x = static_cast<const float*>(j.x);
  const AbsmaxRegs am(j.am);
  for (int64_t n = n0; n < n1; ++n) {
    __m512 acc[P][M];
#pragma GCC unroll 16
    for (int m = 0; m < M; ++m)
      for (int p = 0; p < P; ++p) acc[p][m] = _mm512_setzero_ps();
    const int64_t base = n * K;
    const uint8_t* row = packed + (base >> 1);
    int64_t k = 0;
    while (k < K) {  // one segment per quantization block the row crosses
      const int64_t blk = (base + k) >> shift;
      const int64_t kend = std::min(K, ((blk + 1) << shift) - base);
      const __m512 table = _mm512_mul_ps(code, _mm512_set1_ps(am.get(blk)));
      const uint8_t* pk = row + (k >> 1);  // 8 bytes per 16 weights
      _mm_prefetch(reinterpret_cast<const char*>(pk) + 1024, _MM_HINT_T0);  // why: nf4_avx2.cpp, gemv_group
      for (; k + 16 * P <= kend; k += 16 * P, pk += 8 * P) {
#pragma GCC unroll 4
        for (int p = 0; p < P; ++p) {
          const __m512 w = _mm512_permutexvar_ps(codes16_lanes(pk + 8 * p), table);
#pragma GCC unroll 16
          for (int m = 0; m < M; ++m) acc[p][m] = _mm512_fmadd_ps(w, _mm512_loadu_ps(x + m * K + k + 16 * p), acc[p][m]);
        }
      }
      for (; k < kend; k += 16, pk += 8) {
        const __m512 w = _mm512_permutexvar_ps(codes16_lanes(pk), table);
#pragma GCC unroll 16
        for (int m = 0; m < M; ++m) acc[0][m] = _mm512_fmadd_ps(w, _mm512_loadu_ps(x + m * K + k), acc[0][m]);
      }
    }
#pragma GCC unroll 16
    for (int m = 0; m < M; ++m) {
      __m512 t = acc[0][m];
      for (int p = 1; p < P; ++p) t = _mm512_add_ps(t, acc[p][m]);
      const float v = _mm512_reduce_add_ps(t);
      static_cast<float*>(j.y)[m * N + n] = v;
    }
  }
}

}  // namespace

void dequant_blocks_avx512(const DequantJob& j, int64_t b0, int64_t b1) {
  if (j.kind == F32) dequant_blocks_f32(j, b0, b1);
  else if (j.kind == BF16) dequant_blocks_u16<BF16>(j, b0, b1);
  else dequant_blocks_u16<F16>(j, b0, b1);
}

void quant_blocks_avx512(const QuantJob& j, int64_t b0, int64_t b1) {
  if (j.kind == F32) quant_blocks<F32>(j, b0, b1);
  else if (j.kind == BF16) quant_blocks<BF16>(j, b0, b1);
  else quant_blocks<F16>(j, b0, b1);
}

void gemv_prepare_x_avx512(const GemvJob& j, void* out) {
  const int64_t K = j.K;
  if (j.kind == BF16) {
    static const int f[4] = {1, 0, 3, 2};
    const uint16_t* x = static_cast<const uint16_t*>(j.x);
    uint16_t* o = static_cast<uint16_t*>(out);
    for (int64_t g = 0; g < j.M * K; g += 32)
      for (int L = 0; L < 4; ++L)
        for (int w = 0; w < 8; ++w) o[g + 8 * L + w] = x[g + 4 * w + f[L]];
  } else {
    const float* x = static_cast<const float*>(j.x);
    float* o = static_cast<float*>(out);
    for (int64_t g = 0; g < j.M * K; g += 16)
      for (int i = 0; i < 8; ++i) {
        o[g + 2 * i] = x[g + i];
        o[g + 2 * i + 1] = x[g + 8 + i];
      }
  }
}

void gemv_rows_avx512(const GemvJob& j, int64_t n0, int64_t n1) {
#define LB_CASES(F) F(1) F(2) F(3) F(4) F(5) F(6) F(7) F(8) F(9) F(10) F(11) F(12) F(13) F(14) F(15) F(16)
  if (j.kind == BF16) {
    switch (j.M) {
#define LB_CASE(m) case m: gemv_bf16_dp<m>(j, n0, n1); break;
      LB_CASES(LB_CASE)
#undef LB_CASE
    }
  } else {
    switch (j.M) {
#define LB_CASE(m) case m: gemv_f32<m>(j, n0, n1); break;
      LB_CASES(LB_CASE)
#undef LB_CASE
    }
  }
#undef LB_CASES
}

}  // namespace lowbit_cpu
