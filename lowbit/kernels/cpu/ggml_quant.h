// Interface between the torch glue (ggml_quant.cpp) and the per-ISA GGUF quantizers
// (ggml_quant_{scalar,avx2,avx512}.cpp, one body: ggml_quant_body.h). Byte-identical to
// llama.cpp's quantize_row_*_ref and the importance-matrix (*_impl) variants: every block
// runs the C code's float operations in the C order (sequential sums, the same trial-by-trial
// scale search, nearest_int by the magic number, no FMA: build with -ffp-contract=off).
// Blocks are independent, so the vector paths run one block (or one sub-block group) per
// SIMD lane; element-wise steps (rounding, packing, the final re-quantization) vectorize
// within a block.
#pragma once
#include <stdint.h>

namespace lowbit_ggml {

enum Type : int { Q4_0 = 0, Q5_0 = 1, Q8_0 = 2, Q4_K = 3, Q5_K = 4, Q6_K = 5 };
enum Kind : int { F32 = 0, BF16 = 1, F16 = 2 };

constexpr int QK_K = 256;
constexpr int QK = 32;  // legacy block
// elements and bytes per unit of work: a super-block (K-quants) or a 32-block (legacy)
inline int unit_elems(int t) { return t >= Q4_K ? QK_K : QK; }
inline int unit_bytes(int t) {
  switch (t) {
    case Q4_0: return 18;
    case Q5_0: return 22;
    case Q8_0: return 34;
    case Q4_K: return 144;
    case Q5_K: return 176;
    default: return 210;  // Q6_K
  }
}

struct Job {
  const void* x;  // rows x n, contiguous, `kind`
  int kind;
  int type;
  int64_t rows, n;
  // importance matrix (null: the _ref quantizers): qw_groups rows of n values, row r uses
  // qw[(r / (rows / qw_groups)) * n ...] (one row for all, or one per expert)
  const float* qw = nullptr;
  int64_t qw_groups = 1;
  const float* row_sigma2 = nullptr;  // Q4_0/Q5_0 with qw: sum(x*x)/n of each row, in order
  uint8_t* out;  // rows x row_bytes
};

// Units [u0, u1) of the flattened tensor (super-blocks or 32-blocks, unit_elems each).
// Return true when an input value was inf or nan (the output is then meaningless).
bool quantize_units_scalar(const Job& j, int64_t u0, int64_t u1);
bool quantize_units_avx2(const Job& j, int64_t u0, int64_t u1);
bool quantize_units_avx512(const Job& j, int64_t u0, int64_t u1);
// out[r] = (x[r,0]^2 + x[r,1]^2 + ...) / n, summed in order, for rows [r0, r1).
bool row_sigma2_scalar(const Job& j, int64_t r0, int64_t r1, float* out);
bool row_sigma2_avx2(const Job& j, int64_t r0, int64_t r1, float* out);
bool row_sigma2_avx512(const Job& j, int64_t r0, int64_t r1, float* out);

}  // namespace lowbit_ggml
