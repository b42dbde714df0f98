// Interface between the op glue (nf4_cpu.cpp, the only file that sees torch headers) and the
// per-ISA kernels: nf4_scalar.cpp (baseline x86-64, the fallback and the tails of the vector
// paths), nf4_avx2.cpp (AVX2 + FMA + F16C) and nf4_avx512.cpp (AVX-512 F/BW/VL + BF16).
// Kernels work on raw pointers over a range of blocks or output rows; the glue picks the ISA
// once (LOWBIT_CPU_ISA or the best the CPU has) and splits the work over threads.
//
// Each ISA file compiles with the baseline flags and marks only its own functions with
// __attribute__((target)): nothing built for AVX2/AVX-512 can be merged into code that runs
// before the CPU check. Build with -ffp-contract=off: dequantize and quantize must round
// exactly like the reference, so no a*b+c may silently become an FMA.
#pragma once
#include <stdint.h>
#include "../cuda/nf4_math.cuh"
#include "cpu_isa.h"

namespace lowbit_cpu {

// Element type of the weights / activations / outputs a kernel reads or writes.
enum Kind : int { F32 = 0, BF16 = 1, F16 = 2 };

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

// A by-value copy for the GEMV's inner loops: its fields then stay in registers (read
// through the job reference they are reloaded, and cost ~15% at M=1).
struct AbsmaxRegs {
  const float* f32;
  const uint8_t* q;
  const float* nested;
  const float* nested_code;
  float offset;
  int shift;
  explicit AbsmaxRegs(const AbsmaxView& v)
      : f32(v.f32), q(v.q), nested(v.nested), nested_code(v.nested_code), offset(v.offset), shift(v.nested_shift) {}
  inline float get(int64_t b) const { return lowbit::block_absmax(f32, q, nested, nested_code, offset, b, shift); }
};

// out[i] = code[nibble i] * absmax[block of i], rounded once to `kind`.
struct DequantJob {
  const uint8_t* packed;
  AbsmaxView am;
  float code[16];  // indexed by 4-bit code
  int64_t blocksize, n;
  int kind;
  void* out;
  bool stream;  // non-temporal stores for full blocks (out 64-byte aligned, blocksize*size % 64 == 0)
};

// 4-bit codes + fp32 absmax per block, bitsandbytes' arithmetic (lowbit/format/blockwise.py).
struct QuantJob {
  const void* w;
  int kind;
  int64_t blocksize, n, full_blocks;
  float bounds[15];   // midpoints of the sorted code book, as the reference computes them
  uint8_t order[16];  // sorted position -> code
  uint8_t pad;        // code of a padded 0.0 (odd n)
  uint8_t* packed;
  float* absmax;
};

// y[m, n] = sum_k x[m, k] * deq(W)[n, k] for M <= 16 rows, W never materialized.
struct GemvJob {
  const void* x;  // M x K, contiguous, `kind` (F32, or BF16 for the vdpbf16ps kernel)
  int kind;
  int64_t M, N, K, blocksize;
  int bs_shift;  // log2(blocksize)
  const uint8_t* packed;
  AbsmaxView am;
  float code[16];
  uint16_t code_bf16[32];  // bf16 code values (the dpbf16 kernel), the 16 repeated
  void* y;  // M x N, `kind`
};

// Blocks [b0, b1).
void dequant_blocks_scalar(const DequantJob& j, int64_t b0, int64_t b1);
void dequant_blocks_avx2(const DequantJob& j, int64_t b0, int64_t b1);
void dequant_blocks_avx512(const DequantJob& j, int64_t b0, int64_t b1);
// Elements [start, end) of one block with absmax a (the tails of the vector paths).
void dequant_range_scalar(const DequantJob& j, float a, int64_t start, int64_t end);

void quant_blocks_scalar(const QuantJob& j, int64_t b0, int64_t b1);
void quant_blocks_avx2(const QuantJob& j, int64_t b0, int64_t b1);
void quant_blocks_avx512(const QuantJob& j, int64_t b0, int64_t b1);
void quant_block_scalar(const QuantJob& j, int64_t b);

// Output columns [n0, n1) of y, all M rows. x and y are fp32, except for the AVX-512 bf16
// kernel (kind BF16: bf16 x and y, gemv_dpbf16_fits); the glue widens other bf16 x once.
// The vector GEMVs walk each row in 8 (AVX2) / 16 (AVX-512) weight steps that never
// straddle a block (blocksize >= 32), so K must be a multiple of that.
void gemv_rows_avx2(const GemvJob& j, int64_t n0, int64_t n1);
void gemv_rows_avx512(const GemvJob& j, int64_t n0, int64_t n1);
// The AVX-512 kernels read x in the lane order they decode the weights in: out = j.x
// permuted (M x K elements of j.kind), once per call before gemv_rows_avx512.
void gemv_prepare_x_avx512(const GemvJob& j, void* out);
inline bool gemv_dpbf16_fits(const GemvJob& j) {
  return j.K % 64 == 0 && j.blocksize % 64 == 0 && j.K % j.blocksize == 0;
}

}  // namespace lowbit_cpu
