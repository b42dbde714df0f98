// GGUF quantizers, the x86-64 baseline (SSE2, 4 lanes): the fallback on any x86-64 CPU.
// The code is ggml_quant_body.h, compiled here in its own namespace for this ISA only.
#include <immintrin.h>
#include <stdint.h>
#include "ggml_quant.h"


namespace lowbit_ggml {
namespace scalar {

constexpr int W = 4;
typedef float vsq __attribute__((vector_size(4 * W)));
static inline vsq vsqrt(vsq v) { return (vsq)_mm_sqrt_ps((__m128)v); }  // IEEE sqrt: correctly rounded, as sqrtf

typedef int vmi __attribute__((vector_size(4 * W)));
static inline unsigned vmovmask(vmi m) { return _mm_movemask_ps((__m128)m); }  // lane l's sign -> bit l

#include "ggml_quant_body.h"

}  // namespace scalar

bool quantize_units_scalar(const Job& j, int64_t u0, int64_t u1) { return scalar::quantize_units(j, u0, u1); }
bool row_sigma2_scalar(const Job& j, int64_t r0, int64_t r1, float* out) { return scalar::row_sigma2(j, r0, r1, out); }

}  // namespace lowbit_ggml

