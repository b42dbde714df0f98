// GGUF quantizers, AVX2 (8 lanes): Haswell and later, AMD EPYC before Zen 4.
// The code is ggml_quant_body.h, compiled here in its own namespace for this ISA only.
#include <immintrin.h>
#include <stdint.h>
#include "ggml_quant.h"

#pragma GCC push_options
#pragma GCC target("avx2")
namespace lowbit_ggml {
namespace avx2 {

constexpr int W = 8;
typedef float vsq __attribute__((vector_size(4 * W)));
static inline vsq vsqrt(vsq v) { return (vsq)_mm256_sqrt_ps((__m256)v); }  // IEEE sqrt: correctly rounded, as sqrtf

typedef int vmi __attribute__((vector_size(4 * W)));
static inline unsigned vmovmask(vmi m) { return _mm256_movemask_ps((__m256)m); }  // lane l's sign -> bit l

#include "ggml_quant_body.h"

}  // namespace avx2

bool quantize_units_avx2(const Job& j, int64_t u0, int64_t u1) { return avx2::quantize_units(j, u0, u1); }
bool row_sigma2_avx2(const Job& j, int64_t r0, int64_t r1, float* out) { return avx2::row_sigma2(j, r0, r1, out); }

}  // namespace lowbit_ggml
#pragma GCC pop_options
