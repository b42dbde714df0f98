// Per-element NF4/FP4 math shared by the CUDA kernels and the host (CPU) build.
// Everything here is __host__ __device__ so tests compile this exact source for the CPU
// and check it bit for bit against lowbit.format (the reference).
#pragma once
#include <stdint.h>

#if defined(__CUDACC__)
#define LB_HD __host__ __device__ __forceinline__
#else
#define LB_HD static inline
#endif

namespace lowbit {

enum QuantType { NF4 = 0, FP4 = 1 };

// 4-bit code books, indexed by code (bitsandbytes' values; FP4 already scaled by 1/12).
LB_HD float code_value(int quant_type, int q) {
  const float nf4[16] = {-1.0f, -0.6961928009986877f, -0.5250730514526367f, -0.39491748809814453f,
                         -0.28444138169288635f, -0.18477343022823334f, -0.09105003625154495f, 0.0f,
                         0.07958029955625534f, 0.16093020141124725f, 0.24611230194568634f, 0.33791524171829224f,
                         0.44070982933044434f, 0.5626170039176941f, 0.7229568362236023f, 1.0f};
  const float fp4[16] = {0.0f, 0.005208333333333333f, 0.6666666666666666f, 1.0f, 0.3333333333333333f, 0.5f,
                         0.16666666666666666f, 0.25f, 0.0f, -0.005208333333333333f, -0.6666666666666666f, -1.0f,
                         -0.3333333333333333f, -0.5f, -0.16666666666666666f, -0.25f};
  return quant_type == NF4 ? nf4[q & 15] : fp4[q & 15];
}

// Element i of the flattened weight: byte i/2, even element in the high nibble.
LB_HD int nibble(const uint8_t* packed, int64_t i) {
  const uint8_t b = packed[i >> 1];
  return (i & 1) ? (b & 0x0F) : (b >> 4);
}

// Per-block absmax: fp32 as stored, or double-quantized (uint8 code of absmax - offset,
// decoded with the 8-bit dynamic map and one fp32 nested absmax per nested block).
// nested_shift = log2(nested blocksize): a shift, not a 64-bit divide, on the hot path.
LB_HD float block_absmax(const float* absmax_f32, const uint8_t* absmax_q, const float* nested_absmax,
                         const float* nested_code, float offset, int64_t block, int nested_shift) {
  if (absmax_q == nullptr) return absmax_f32[block];
#if defined(__CUDA_ARCH__)
  // nvcc contracts a*b + c into one FMA (one rounding) by default; the reference rounds the
  // product, then the sum. __fmul_rn/__fadd_rn are never contracted.
  return __fadd_rn(__fmul_rn(nested_code[absmax_q[block]], nested_absmax[block >> nested_shift]), offset);
#else
  return nested_code[absmax_q[block]] * nested_absmax[block >> nested_shift] + offset;
#endif
}

// fp32 -> bf16 bits, round to nearest even (what torch's .to(bfloat16) does); NaN stays NaN.
LB_HD uint16_t f32_to_bf16_bits(float f) {
  union { float f; uint32_t u; } v;
  v.f = f;
  if ((v.u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((v.u >> 16) | 0x40);
  return (uint16_t)((v.u + 0x7fffu + ((v.u >> 16) & 1u)) >> 16);
}

// fp32 -> fp16 bits, round to nearest even, with subnormals, overflow to inf.
LB_HD uint16_t f32_to_f16_bits(float f) {
  union { float f; uint32_t u; } v;
  v.f = f;
  const uint32_t sign = (v.u >> 16) & 0x8000u;
  const uint32_t absu = v.u & 0x7fffffffu;
  if (absu > 0x7f800000u) return (uint16_t)(sign | 0x7e00u);          // NaN
  if (absu >= 0x477ff000u) return (uint16_t)(sign | 0x7c00u);         // rounds to >= 65520: inf
  if (absu < 0x38800000u) {                                            // fp16 subnormal or zero
    if (absu < 0x33000000u) return (uint16_t)sign;                     // < 2^-25: rounds to 0
    const uint32_t mant = (absu & 0x7fffffu) | 0x800000u;
    const int shift = 126 - (int)(absu >> 23);                         // value = mant * 2^(exp-150); fp16 ulp 2^-24
    const uint32_t q = mant >> shift;
    const uint32_t rem = mant & ((1u << shift) - 1u);
    const uint32_t half = 1u << (shift - 1);
    const uint32_t r = q + ((rem > half) || (rem == half && (q & 1u)) ? 1u : 0u);
    return (uint16_t)(sign | r);
  }
  uint32_t h = ((absu >> 13) - (112u << 10));                          // rebias exponent 127 -> 15
  const uint32_t rem = absu & 0x1fffu;
  if (rem > 0x1000u || (rem == 0x1000u && (h & 1u))) h += 1;
  return (uint16_t)(sign | h);
}

// One decoded element in fp32 (before the single rounding to the output dtype).
LB_HD float dequant_element(const uint8_t* packed, int quant_type, float absmax, int64_t i) {
  return code_value(quant_type, nibble(packed, i)) * absmax;
}

}  // namespace lowbit
