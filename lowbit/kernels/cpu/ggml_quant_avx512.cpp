// GGUF quantizers, AVX-512 F/BW/VL/DQ (16 lanes): Sapphire Rapids, Zen 4 and later.
// The code is ggml_quant_body.h, compiled here in its own namespace for this ISA only.
#include <immintrin.h>
#include <stdint.h>
#include "ggml_quant.h"

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq")
namespace lowbit_ggml {
namespace avx512 {

constexpr int W = 16;
typedef float vsq __attribute__((vector_size(4 * W)));
static inline vsq vsqrt(vsq v) { return (vsq)_mm512_sqrt_ps((__m512)v); }  // IEEE sqrt: correctly rounded, as sqrtf

typedef int vmi __attribute__((vector_size(4 * W)));
static inline unsigned vmovmask(vmi m) { return _mm512_movepi32_mask((__m512i)m); }  // lane l's sign -> bit l

#include "ggml_quant_body.h"

}  // namespace avx512

bool quantize_units_avx512(const Job& j, int64_t u0, int64_t u1) { return avx512::quantize_units(j, u0, u1); }
bool row_sigma2_avx512(const Job& j, int64_t r0, int64_t r1, float* out) { return avx512::row_sigma2(j, r0, r1, out); }

}  // namespace lowbit_ggml
#pragma GCC pop_options
