// Host build of nf4_math.cuh / nf4_quant.cuh for the tests: the exact per-element code the
// CUDA kernels run, compiled for the CPU and called through ctypes.
#include <math.h>
#include <stdint.h>
#include "nf4_math.cuh"
#include "nf4_quant.cuh"

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

// The quantize kernel's steps, one block after another (the kernel: one warp per block,
// absmax by a warp max, which is order-independent, NaN included).
void lowbit_host_quantize(const float* w, int64_t n, int64_t blocksize, int quant_type, uint8_t* packed,
                          float* absmax) {
  const lowbit::QuantTables t = lowbit::quant_tables(quant_type);
  for (int64_t start = 0, b = 0; start < n; start += blocksize, ++b) {
    const int64_t len = n - start < blocksize ? n - start : blocksize;
    const bool tail = len < blocksize;
    float am = 0.f;
    for (int64_t i = 0; i < len; ++i) am = lowbit::nan_max(am, fabsf(w[start + i]));
    absmax[b] = lowbit::stored_absmax(am, tail);
    for (int64_t j = 0; j < len; j += 2) {
      const uint8_t hi = lowbit::quantize_scaled(lowbit::scale_for_quant(w[start + j], am, tail), t);
      const uint8_t lo = j + 1 < len ? lowbit::quantize_scaled(lowbit::scale_for_quant(w[start + j + 1], am, tail), t)
                                     : t.pad;
      packed[(start + j) >> 1] = static_cast<uint8_t>((hi << 4) | lo);
    }
  }
}

uint32_t lowbit_host_f32_to_f16(float v) { return lowbit::f32_to_f16_bits(v); }
uint32_t lowbit_host_f32_to_bf16(float v) { return lowbit::f32_to_bf16_bits(v); }
}
