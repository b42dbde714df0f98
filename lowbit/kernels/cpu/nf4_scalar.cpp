// Scalar kernels: the fallback for CPUs without AVX2+FMA+F16C (and LOWBIT_CPU_ISA=scalar),
// and the tail blocks of the vector paths. Built for baseline x86-64 on purpose (no
// target_clones), so forcing "scalar" on any machine runs what an old CPU runs.
#include <algorithm>
#include <cmath>
#include <type_traits>
#include "nf4_kernels.h"

namespace lowbit_cpu {

namespace {

// Every element of a block is one of 16 values, code[q] * a rounded once to the output
// type: convert those 16 (the fp16 rounding is not cheap) and look the rest up.
template <int K>
void dequant_range(const uint8_t* packed, const float* code, float a, void* out, int64_t start, int64_t end) {
  using T = typename std::conditional<K == F32, float, uint16_t>::type;
  T t[16];
  for (int q = 0; q < 16; ++q) {
    const float v = code[q] * a;
    if constexpr (K == F32) t[q] = v;
    else if constexpr (K == BF16) t[q] = lowbit::f32_to_bf16_bits(v);
    else t[q] = lowbit::f32_to_f16_bits(v);
  }
  T* o = static_cast<T*>(out);
  for (int64_t i = start; i < end; ++i) o[i] = t[lowbit::nibble(packed, i)];
}

// bf16 and fp16 widen to fp32 exactly, so every input kind quantizes the same fp32 values.
inline float load_one(const void* w, int kind, int64_t i) {
  if (kind == F32) return static_cast<const float*>(w)[i];
  const uint16_t h = static_cast<const uint16_t*>(w)[i];
  if (kind == BF16) {
    const uint32_t u = uint32_t(h) << 16;
    float f;
    __builtin_memcpy(&f, &u, 4);
    return f;
  }
  // fp16 -> fp32, exact (subnormals included)
  const uint32_t sign = uint32_t(h & 0x8000u) << 16;
  const uint32_t e = (h >> 10) & 0x1f, m = h & 0x3ffu;
  uint32_t u;
  if (e == 0x1f) u = sign | 0x7f800000u | (m << 13);
  else if (e != 0) u = sign | ((e + 112) << 23) | (m << 13);
  else if (m == 0) u = sign;
  else {
    int ee = 113;
    uint32_t mm = m;
    while (!(mm & 0x400u)) { mm <<= 1; --ee; }
    u = sign | (uint32_t(ee) << 23) | ((mm & 0x3ffu) << 13);
  }
  float f;
  __builtin_memcpy(&f, &u, 4);
  return f;
}

}  // namespace

void dequant_range_scalar(const DequantJob& j, float a, int64_t start, int64_t end) {
  if (j.kind == F32) dequant_range<F32>(j.packed, j.code, a, j.out, start, end);
  else if (j.kind == BF16) dequant_range<BF16>(j.packed, j.code, a, j.out, start, end);
  else dequant_range<F16>(j.packed, j.code, a, j.out, start, end);
}

void dequant_blocks_scalar(const DequantJob& j, int64_t b0, int64_t b1) {
  for (int64_t b = b0; b < b1; ++b) {
    const int64_t start = b * j.blocksize;
    dequant_range_scalar(j, j.am.get(b), start, std::min(start + j.blocksize, j.n));
  }
}

void quant_block_scalar(const QuantJob& j, int64_t b) {
  const int64_t start = b * j.blocksize, len = std::min(j.blocksize, j.n - start);
  const bool tail = b >= j.full_blocks;
  float am = 0.f;
  for (int64_t i = 0; i < len; ++i) am = std::max(am, std::fabs(load_one(j.w, j.kind, start + i)));
  j.absmax[b] = am;
  const float amc = std::max(am, 1e-38f);
  const float inv = 1.0f / amc;
  uint8_t q[4096];
  for (int64_t i = 0; i < len; ++i) {
    const float x = load_one(j.w, j.kind, start + i);
    float s = tail ? x / amc : x * inv;  // reference: multiply by 1/absmax, divide in the tail block
    s = std::min(1.0f, std::max(-1.0f, s));
    int k = 0;
    for (int t = 0; t < 15; ++t) k += j.bounds[t] < s;  // bucketize(right=False)
    q[i] = j.order[k];
  }
  for (int64_t i = 0; i < len; i += 2) {
    const uint8_t lo = (i + 1 < len) ? q[i + 1] : j.pad;  // odd length: the reference pads with 0.0
    j.packed[(start + i) >> 1] = static_cast<uint8_t>((q[i] << 4) | lo);
  }
}

void quant_blocks_scalar(const QuantJob& j, int64_t b0, int64_t b1) {
  for (int64_t b = b0; b < b1; ++b) quant_block_scalar(j, b);
}

}  // namespace lowbit_cpu
