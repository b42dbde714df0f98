// The launchers nf4_kernels.cu defines and nf4_cuda_ops.cpp (the torch binding) calls.
// One declaration for both sides: extern "C" names carry no types, so a signature that
// differed between the two files would link and then read garbage arguments.
#pragma once
#include <stdint.h>
#include <cuda_runtime_api.h>
#include "nf4_quant.cuh"

extern "C" {

// Output/input dtypes: 0 = float32, 1 = bfloat16, 2 = float16. Each returns a cudaError_t
// (cudaSuccess = 0) from the launch. absmax_f32 or (absmax_q, nested, nested_code, offset):
// offset is a device scalar. blocksize: a power of two >= 32.
int lowbit_cuda_dequantize_4bit(const uint8_t* packed, const float* absmax_f32, const uint8_t* absmax_q,
                                const float* nested, const float* nested_code, const float* offset, int64_t blocksize,
                                int quant_type, int64_t n, void* out, int dtype, cudaStream_t stream);

// y[m, :] = x[m, :] @ deq(W).T for M <= 16 rows; W is N x K.
int lowbit_cuda_gemv_4bit(const void* x, int M, const uint8_t* packed, const float* absmax_f32,
                          const uint8_t* absmax_q, const float* nested, const float* nested_code, const float* offset,
                          int64_t blocksize, int quant_type, int64_t N, int64_t K, void* y, int dtype,
                          cudaStream_t stream);

// n weights (dtype) -> ceil(n/2) packed bytes + ceil(n/blocksize) fp32 absmax.
int lowbit_cuda_quantize_4bit(const void* w, int dtype, int64_t n, int64_t blocksize, lowbit::QuantTables tables,
                              uint8_t* packed, float* absmax, cudaStream_t stream);

}  // extern "C"
