// Host build of nf4_math.cuh for the tests: the exact per-element code the CUDA kernels
// run, compiled for the CPU and called through ctypes.
#include <stdint.h>
#include "nf4_math.cuh"

extern "C" {

// out_bits: fp32 bits (dtype 0), bf16 bits (1) or fp16 bits (2), one uint32 per element.
void lowbit_host_dequantize(const uint8_t* packed, const float* absmax_f32, const uint8_t* absmax_q,
                            const float* nested, const float* nested_code, float offset, int64_t blocksize,
                            int quant_type, int64_t n, int dtype, uint32_t* out_bits) {
  for (int64_t i = 0; i < n; ++i) {
    const float a = lowbit::block_absmax(absmax_f32, absmax_q, nested, nested_code, offset, i / blocksize, 8);
    const float v = lowbit::dequant_element(packed, quant_type, a, i);
    if (dtype == 1) out_bits[i] = lowbit::f32_to_bf16_bits(v);
    else if (dtype == 2) out_bits[i] = lowbit::f32_to_f16_bits(v);
    else { union { float f; uint32_t u; } c; c.f = v; out_bits[i] = c.u; }
  }
}

uint32_t lowbit_host_f32_to_f16(float v) { return lowbit::f32_to_f16_bits(v); }
uint32_t lowbit_host_f32_to_bf16(float v) { return lowbit::f32_to_bf16_bits(v); }
}
