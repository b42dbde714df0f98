// AVX2 + FMA + F16C kernels (AMD EPYC before Zen 4, Intel Haswell and later, AVX-512 CPUs
// without BF16). Dequantize and quantize are bit-identical to the scalar path; the GEMV
// differs from it only in fp32 summation order.
#include <immintrin.h>
#include <algorithm>
#include <cstring>
#include "nf4_kernels.h"

#define LB_AVX2 __attribute__((target("avx2,fma,f16c")))

namespace lowbit_cpu {

namespace {

// ---- 16-entry lookups ------------------------------------------------------------------
// 8 codes (4 packed bytes, even element in the high nibble) -> t[code] in element order.
// The packed dword is broadcast and shifted per lane: the nibble's low 3 bits index the
// 8-entry halves (vpermps ignores the rest) and its bit 3, shifted to the sign, picks the half.
LB_AVX2 inline __m256 lookup8(const uint8_t* p, __m256 tlo, __m256 thi) {
  int32_t d;
  std::memcpy(&d, p, 4);
  const __m256i v = _mm256_set1_epi32(d);
  const __m256i idx = _mm256_srlv_epi32(v, _mm256_setr_epi32(4, 0, 12, 8, 20, 16, 28, 24));
  const __m256 hi_half = _mm256_castsi256_ps(_mm256_sllv_epi32(v, _mm256_setr_epi32(24, 28, 16, 20, 8, 12, 0, 4)));
  return _mm256_blendv_ps(_mm256_permutevar8x32_ps(tlo, idx), _mm256_permutevar8x32_ps(thi, idx), hi_half);
}

// 32 codes (16 packed bytes) -> 32 16-bit values t[code] via byte-plane pshufb (in-lane only:
// cheap on every AVX2 core, unlike lane-crossing permutes on Zen 1/2). Each packed byte is
// duplicated into a 16-bit word, lane 0 taking bytes 0-3 and 8-11 and lane 1 bytes 4-7 and
// 12-15, so the final in-lane unpacks of (low, high) bytes come out in element order.
LB_AVX2 inline void lookup32_u16(const uint8_t* p, __m256i tlo, __m256i thi, __m256i& out0, __m256i& out1) {
  const __m256i dup_ctrl = _mm256_setr_epi8(0, 0, 1, 1, 2, 2, 3, 3, 8, 8, 9, 9, 10, 10, 11, 11,
                                            4, 4, 5, 5, 6, 6, 7, 7, 12, 12, 13, 13, 14, 14, 15, 15);
  const __m256i w = _mm256_shuffle_epi8(
      _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))), dup_ctrl);
  // word = b | b << 8 -> low byte: high nibble (even element), high byte: low nibble (odd)
  const __m256i idx = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(w, 4), _mm256_set1_epi16(0x000F)),
                                      _mm256_and_si256(w, _mm256_set1_epi16(0x0F00)));
  const __m256i lo = _mm256_shuffle_epi8(tlo, idx), hi = _mm256_shuffle_epi8(thi, idx);
  out0 = _mm256_unpacklo_epi8(lo, hi);  // elements 0-15
  out1 = _mm256_unpackhi_epi8(lo, hi);  // elements 16-31
}

// fp32 -> bf16 bits in the low half of each lane, exactly lowbit::f32_to_bf16_bits
// (round to nearest even, NaN kept quiet), i.e. torch's conversion.
LB_AVX2 inline __m256i bf16_bits(__m256 v) {
  const __m256i u = _mm256_castps_si256(v);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
  const __m256i r = _mm256_srli_epi32(_mm256_add_epi32(_mm256_add_epi32(u, _mm256_set1_epi32(0x7fff)), lsb), 16);
  const __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q));
  const __m256i qnan = _mm256_or_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(0x40));
  return _mm256_blendv_epi8(r, qnan, nan);
}

// The 16 rounded outputs of one block, code[q] * a, as byte planes (low bytes, high bytes)
// each broadcast to both lanes. Every element of a block is one of these 16 values, so a
// table lookup gives exactly the scalar path's per-element multiply and rounding.
template <int K>
LB_AVX2 inline void block_table_u16(const float* code, float a, __m256i& tlo, __m256i& thi) {
  const __m256 s = _mm256_set1_ps(a);
  const __m256 v0 = _mm256_mul_ps(_mm256_loadu_ps(code), s), v1 = _mm256_mul_ps(_mm256_loadu_ps(code + 8), s);
  __m256i t;  // 16 x u16 in code order
  if constexpr (K == BF16) {
    t = _mm256_permute4x64_epi64(_mm256_packus_epi32(bf16_bits(v0), bf16_bits(v1)), _MM_SHUFFLE(3, 1, 2, 0));
  } else {
    t = _mm256_set_m128i(_mm256_cvtps_ph(v1, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC),
                         _mm256_cvtps_ph(v0, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  }
  const __m256i split = _mm256_setr_epi8(0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15,
                                         0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15);
  const __m256i planes = _mm256_permute4x64_epi64(_mm256_shuffle_epi8(t, split), _MM_SHUFFLE(3, 1, 2, 0));
  tlo = _mm256_permute2x128_si256(planes, planes, 0x00);
  thi = _mm256_permute2x128_si256(planes, planes, 0x11);
}

// ---- dequantize --------------------------------------------------------------------------
LB_AVX2 void dequant_blocks_f32(const DequantJob& j, int64_t b0, int64_t b1) {
  const __m256 clo = _mm256_loadu_ps(j.code), chi = _mm256_loadu_ps(j.code + 8);
  float* out = static_cast<float*>(j.out);
  for (int64_t b = b0; b < b1; ++b) {
    const int64_t start = b * j.blocksize, len = std::min(j.blocksize, j.n - start);
    const float a = j.am.get(b);
    const __m256 s = _mm256_set1_ps(a);
    const __m256 tlo = _mm256_mul_ps(clo, s), thi = _mm256_mul_ps(chi, s);
    const bool stream = j.stream && len == j.blocksize;
    const uint8_t* p = j.packed + (start >> 1);
    float* o = out + start;
    int64_t i = 0;
    for (; i + 8 <= len; i += 8, p += 4) {
      const __m256 v = lookup8(p, tlo, thi);
      if (stream) _mm256_stream_ps(o + i, v);
      else _mm256_storeu_ps(o + i, v);
    }
    if (i < len) dequant_range_scalar(j, a, start + i, start + len);
  }
  if (j.stream) _mm_sfence();
}

template <int K>
LB_AVX2 void dequant_blocks_u16(const DequantJob& j, int64_t b0, int64_t b1) {
  uint16_t* out = static_cast<uint16_t*>(j.out);
  for (int64_t b = b0; b < b1; ++b) {
    const int64_t start = b * j.blocksize, len = std::min(j.blocksize, j.n - start);
    const float a = j.am.get(b);
    __m256i tlo, thi;
    block_table_u16<K>(j.code, a, tlo, thi);
    const bool stream = j.stream && len == j.blocksize;
    const uint8_t* p = j.packed + (start >> 1);
    __m256i* o = reinterpret_cast<__m256i*>(out + start);
    int64_t i = 0;
    for (; i + 32 <= len; i += 32, o += 2, p += 16) {
      __m256i v0, v1;
      lookup32_u16(p, tlo, thi, v0, v1);
      if (stream) { _mm256_stream_si256(o, v0); _mm256_stream_si256(o + 1, v1); }
      else { _mm256_storeu_si256(o, v0); _mm256_storeu_si256(o + 1, v1); }
    }
    if (i < len) dequant_range_scalar(j, a, start + i, start + len);
  }
  if (j.stream) _mm_sfence();
}

// ---- quantize ----------------------------------------------------------------------------
template <int K>
LB_AVX2 inline __m256 load8(const void* w, int64_t i) {
  if constexpr (K == F32) {
    return _mm256_loadu_ps(static_cast<const float*>(w) + i);
  } else {
    const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(static_cast<const uint16_t*>(w) + i));
    if constexpr (K == BF16) return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
    else return _mm256_cvtph_ps(h);  // exact
  }
}

// A full block (len = blocksize, a multiple of 32; multiply by 1/absmax): the scalar
// path's fp32 operations in the same order, so the same bytes.
template <int K>
LB_AVX2 void quant_full_block(const QuantJob& j, int64_t b, const __m256* bnd, __m256i order_tab, bool permute) {
  const int64_t start = b * j.blocksize, len = j.blocksize;
  const __m256 absmask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
  __m256 vmax = _mm256_setzero_ps();
  for (int64_t i = 0; i < len; i += 8) vmax = _mm256_max_ps(vmax, _mm256_and_ps(load8<K>(j.w, start + i), absmask));
  __m128 m = _mm_max_ps(_mm256_castps256_ps128(vmax), _mm256_extractf128_ps(vmax, 1));
  m = _mm_max_ps(m, _mm_movehl_ps(m, m));
  m = _mm_max_ss(m, _mm_shuffle_ps(m, m, 1));
  const float am = _mm_cvtss_f32(m);
  j.absmax[b] = am;
  const __m256 inv = _mm256_set1_ps(1.0f / std::max(am, 1e-38f));
  const __m256 one = _mm256_set1_ps(1.0f), neg_one = _mm256_set1_ps(-1.0f);
  for (int64_t i = 0; i < len; i += 32) {
    __m256i k[4];
    for (int v = 0; v < 4; ++v) {
      __m256 s = _mm256_mul_ps(load8<K>(j.w, start + i + 8 * v), inv);
      s = _mm256_min_ps(one, _mm256_max_ps(neg_one, s));
      __m256i c = _mm256_setzero_si256();
      for (int t = 0; t < 15; ++t)  // bucketize(right=False): count bounds strictly below s
        c = _mm256_sub_epi32(c, _mm256_castps_si256(_mm256_cmp_ps(s, bnd[t], _CMP_GT_OQ)));
      k[v] = c;
    }
    // bytes, lane 0: elements 0-3 8-11 16-19 24-27, lane 1: 4-7 12-15 20-23 28-31
    __m256i c = _mm256_packus_epi16(_mm256_packs_epi32(k[0], k[1]), _mm256_packs_epi32(k[2], k[3]));
    if (permute) c = _mm256_shuffle_epi8(order_tab, c);  // sorted position -> code (FP4)
    // (even, odd) pairs are adjacent: low byte of each word becomes even << 4 | odd
    const __m256i wv = _mm256_or_si256(_mm256_and_si256(_mm256_slli_epi16(c, 4), _mm256_set1_epi16(0x00F0)),
                                       _mm256_srli_epi16(c, 8));
    const __m256i r = _mm256_packus_epi16(wv, wv);  // lane 0: bytes 0 1 4 5 8 9 12 13, lane 1: 2 3 6 7 ...
    _mm_storeu_si128(reinterpret_cast<__m128i*>(j.packed + ((start + i) >> 1)),
                     _mm_unpacklo_epi16(_mm256_castsi256_si128(r), _mm256_extracti128_si256(r, 1)));
  }
}

template <int K>
LB_AVX2 void quant_blocks(const QuantJob& j, int64_t b0, int64_t b1) {
  __m256 bnd[15];
  for (int t = 0; t < 15; ++t) bnd[t] = _mm256_set1_ps(j.bounds[t]);
  bool permute = false;
  for (int q = 0; q < 16; ++q) permute |= j.order[q] != q;
  const __m256i order_tab = _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(j.order)));
  for (int64_t b = b0; b < b1; ++b) {
    if (b < j.full_blocks) quant_full_block<K>(j, b, bnd, order_tab, permute);
    else quant_block_scalar(j, b);
  }
}

// ---- fused small-M GEMV ------------------------------------------------------------------
// MB rows of x at once; weights decoded once per row group to exactly the reference's fp32
// values (code * absmax via a per-block scaled table), then FMA into MB accumulators. With
// few rows, P independent accumulators per row hide the FMA latency.
template <int MB>
LB_AVX2 void gemv_group(const GemvJob& j, int64_t m0, int64_t n0, int64_t n1) {
  constexpr int P = MB == 1 ? 4 : (MB <= 3 ? 2 : 1);
  const __m256 clo = _mm256_loadu_ps(j.code), chi = _mm256_loadu_ps(j.code + 8);
  const int64_t K = j.K, N = j.N;
  const int shift = j.bs_shift;
  const uint8_t* packed = j.packed;
  const AbsmaxRegs am(j.am);
  const float* xr[MB];
  for (int m = 0; m < MB; ++m) xr[m] = static_cast<const float*>(j.x) + (m0 + m) * K;
  for (int64_t n = n0; n < n1; ++n) {
    __m256 acc[P][MB];
    for (int p = 0; p < P; ++p)
      for (int m = 0; m < MB; ++m) acc[p][m] = _mm256_setzero_ps();
    const int64_t base = n * K;
    int64_t k = 0;
    while (k < K) {  // one segment per quantization block the row crosses
      const int64_t blk = (base + k) >> shift;
      const int64_t kend = std::min(K, ((blk + 1) << shift) - base);
      const __m256 s = _mm256_set1_ps(am.get(blk));
      const __m256 tlo = _mm256_mul_ps(clo, s), thi = _mm256_mul_ps(chi, s);
      const uint8_t* pk = packed + ((base + k) >> 1);  // 4 bytes per 8 weights
      // the hardware prefetcher alone leaves this loop waiting on DRAM about as long as it
      // computes (it restarts at every 4 KB page); ~2000 weights ahead covers the latency
      _mm_prefetch(reinterpret_cast<const char*>(pk) + 1024, _MM_HINT_T0);
      for (; k + 8 * P <= kend; k += 8 * P, pk += 4 * P) {
#pragma GCC unroll 4
        for (int q = 0; q < P; ++q) {
          const __m256 w = lookup8(pk + 4 * q, tlo, thi);
#pragma GCC unroll 8
          for (int m = 0; m < MB; ++m) acc[q][m] = _mm256_fmadd_ps(w, _mm256_loadu_ps(xr[m] + k + 8 * q), acc[q][m]);
        }
      }
      for (; k < kend; k += 8, pk += 4) {
        const __m256 w = lookup8(pk, tlo, thi);
#pragma GCC unroll 8
        for (int m = 0; m < MB; ++m) acc[0][m] = _mm256_fmadd_ps(w, _mm256_loadu_ps(xr[m] + k), acc[0][m]);
      }
    }
    for (int m = 0; m < MB; ++m) {
      __m256 t = acc[0][m];
      for (int q = 1; q < P; ++q) t = _mm256_add_ps(t, acc[q][m]);
      __m128 h = _mm_add_ps(_mm256_castps256_ps128(t), _mm256_extractf128_ps(t, 1));
      h = _mm_add_ps(h, _mm_movehl_ps(h, h));
      h = _mm_add_ss(h, _mm_shuffle_ps(h, h, 1));
      const float v = _mm_cvtss_f32(h);
      static_cast<float*>(j.y)[(m0 + m) * N + n] = v;
    }
  }
}

void gemv_rows(const GemvJob& j, int64_t n0, int64_t n1) {
  // groups of <= 8 rows: 8 accumulators + tables + temporaries fill the 16 ymm registers
  for (int64_t m0 = 0; m0 < j.M; m0 += 8) {
    switch (std::min<int64_t>(8, j.M - m0)) {
#define LB_CASE(mb) case mb: gemv_group<mb>(j, m0, n0, n1); break;
      LB_CASE(1) LB_CASE(2) LB_CASE(3) LB_CASE(4) LB_CASE(5) LB_CASE(6) LB_CASE(7) LB_CASE(8)
#undef LB_CASE
    }
  }
}

}  // namespace

void dequant_blocks_avx2(const DequantJob& j, int64_t b0, int64_t b1) {
  if (j.kind == F32) dequant_blocks_f32(j, b0, b1);
  else if (j.kind == BF16) dequant_blocks_u16<BF16>(j, b0, b1);
  else dequant_blocks_u16<F16>(j, b0, b1);
}

void quant_blocks_avx2(const QuantJob& j, int64_t b0, int64_t b1) {
  if (j.kind == F32) quant_blocks<F32>(j, b0, b1);
  else if (j.kind == BF16) quant_blocks<BF16>(j, b0, b1);
  else quant_blocks<F16>(j, b0, b1);
}

void gemv_rows_avx2(const GemvJob& j, int64_t n0, int64_t n1) { gemv_rows(j, n0, n1); }

}  // namespace lowbit_cpu
