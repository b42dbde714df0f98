// Per-element NF4/FP4 quantize math shared by the CUDA quantize kernel and its host test
// (host_check.cpp): the reference's arithmetic (lowbit/format/blockwise.py) step for step.
#pragma once
#include <stdint.h>
#include "nf4_math.cuh"

namespace lowbit {

// Decision boundaries between the sorted code values, and sorted index -> 4-bit code.
// Passed to the kernel by value (kernel parameters live in constant memory).
struct QuantTables {
  float bounds[15];
  uint8_t order[16];
  uint8_t pad;  // the code of a 0.0, which the reference pads an odd element count with
};

// Like the reference: fp32 midpoints (a + b) / 2 of the code book in ascending order, ties
// (FP4's two zeros) kept in code order.
LB_HD QuantTables quant_tables(int quant_type) {
  QuantTables t;
  float sorted[16];
  for (int q = 0; q < 16; ++q) {
    const float v = code_value(quant_type, q);
    int j = q;
    for (; j > 0 && sorted[j - 1] > v; --j) {
      sorted[j] = sorted[j - 1];
      t.order[j] = t.order[j - 1];
    }
    sorted[j] = v;
    t.order[j] = static_cast<uint8_t>(q);
  }
  for (int k = 0; k < 15; ++k) t.bounds[k] = (sorted[k] + sorted[k + 1]) / 2.0f;
  int zero_k = 0;
  for (int k = 0; k < 15; ++k) zero_k += t.bounds[k] < 0.0f;
  t.pad = t.order[zero_k];
  return t;
}

// max with NaN kept, as torch's max is (fmaxf would drop it).
LB_HD float nan_max(float a, float b) { return (b > a || b != b) ? b : a; }

// torch.clamp(min=lo) and clamp(-1, 1): NaN passes through.
LB_HD float clamp_min(float v, float lo) { return v < lo ? lo : v; }
LB_HD float clamp_unit(float v) { return v < -1.0f ? -1.0f : (v > 1.0f ? 1.0f : v); }

// The absmax the reference stores: the plain max for full blocks, clamped for the tail block.
LB_HD float stored_absmax(float am, bool tail) { return tail ? clamp_min(am, 1e-38f) : am; }

// x scaled into [-1, 1]: multiply by the reciprocal in full blocks, divide in the tail block.
LB_HD float scale_for_quant(float x, float am, bool tail) {
  const float amc = clamp_min(am, 1e-38f);
  return clamp_unit(tail ? x / amc : x * (1.0f / amc));
}

// bucketize(s, bounds, right=False): the rank of s among the bounds (ties to the lower
// code), then the code at that rank. Counted down from 15 so that NaN, which compares false
// with everything, lands on the last rank, as torch's bucketize puts it.
LB_HD uint8_t quantize_scaled(float s, const QuantTables& t) {
  int k = 15;
  for (int i = 0; i < 15; ++i) k -= s <= t.bounds[i];
  return t.order[k];
}

}  // namespace lowbit
