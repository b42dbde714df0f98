// CUDA backend kernels for the lowbit:: ops. Plain CUDA (no torch headers) so CI compiles
// it with nvcc for sm_80/86/89/90 on machines without a GPU; the torch binding lives in
// nf4_cuda_ops.cpp. All per-element math is in nf4_math.cuh / nf4_quant.cuh, shared with
// the host tests. torch builds extensions with __CUDA_NO_HALF_CONVERSIONS__ and
// __CUDA_NO_BFLOAT16_CONVERSIONS__, so every bf16/fp16 conversion here is explicit.
#include <cuda_runtime.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include "nf4_launch.cuh"

namespace {

constexpr int kThreads = 256;
constexpr int kBytesPerThread = 4;  // 8 output elements per thread

struct AbsmaxArgs {
  const float* f32;
  const uint8_t* q;
  const float* nested;
  const float* nested_code;
  const float* offset;  // device scalar, read once per thread (no host sync)
  int nested_shift;
};

// fp32 -> output by the same rounding functions the host tests check (nf4_math.cuh).
template <typename Out>
__device__ __forceinline__ void store(Out* out, int64_t i, float v);
template <> __device__ __forceinline__ void store<float>(float* out, int64_t i, float v) { out[i] = v; }
template <> __device__ __forceinline__ void store<__nv_bfloat16>(__nv_bfloat16* out, int64_t i, float v) {
  out[i] = __nv_bfloat16_raw{lowbit::f32_to_bf16_bits(v)};
}
template <> __device__ __forceinline__ void store<__half>(__half* out, int64_t i, float v) {
  out[i] = __half_raw{lowbit::f32_to_f16_bits(v)};
}

__device__ __forceinline__ float to_f32(float v) { return v; }
__device__ __forceinline__ float to_f32(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ float to_f32(__half v) { return __half2float(v); }

// Each thread decodes kBytesPerThread packed bytes (2 elements each). Blocksize >= 32 and
// a power of two, so a thread's 8 elements never straddle two quantization blocks.
template <typename Out>
__global__ void dequant_kernel(const uint8_t* __restrict__ packed, AbsmaxArgs am, int quant_type, int log2_blocksize,
                               int64_t n, Out* __restrict__ out) {
  const int64_t first = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) * kBytesPerThread * 2;
  if (first >= n) return;
  const float offset = am.offset ? *am.offset : 0.f;
  const float a = lowbit::block_absmax(am.f32, am.q, am.nested, am.nested_code, offset, first >> log2_blocksize,
                                       am.nested_shift);
#pragma unroll
  for (int j = 0; j < kBytesPerThread * 2; ++j) {
    const int64_t i = first + j;
    if (i < n) store<Out>(out, i, lowbit::dequant_element(packed, quant_type, a, i));
  }
}

// y[m, n] = sum_k x[m, k] * deq(W)[n, k]: one warp per output row n, M <= 16 rows of x.
template <typename T>
__global__ void gemv_kernel(const T* __restrict__ x, int M, const uint8_t* __restrict__ packed, AbsmaxArgs am,
                            int quant_type, int log2_blocksize, int64_t N, int64_t K, T* __restrict__ y) {
  const int64_t n = static_cast<int64_t>(blockIdx.x) * (blockDim.x / 32) + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (n >= N) return;
  const float offset = am.offset ? *am.offset : 0.f;
  float acc[16];
#pragma unroll
  for (int m = 0; m < 16; ++m) acc[m] = 0.f;
  for (int64_t k = lane; k < K; k += 32) {
    const int64_t i = n * K + k;
    const float a = lowbit::block_absmax(am.f32, am.q, am.nested, am.nested_code, offset, i >> log2_blocksize,
                                         am.nested_shift);
    const float w = lowbit::dequant_element(packed, quant_type, a, i);
#pragma unroll
    for (int m = 0; m < 16; ++m)
      if (m < M) acc[m] += w * to_f32(x[m * K + k]);
  }
#pragma unroll
  for (int m = 0; m < 16; ++m) {
    if (m >= M) break;
    float v = acc[m];
    for (int off = 16; off > 0; off >>= 1) v += __shfl_down_sync(0xffffffffu, v, off);
    if (lane == 0) store<T>(y, m * N + n, v);
  }
}

// One warp per quantization block: absmax by warp max, then each lane packs whole bytes
// (elements 2j, 2j + 1 of the block; blocks start on even elements since blocksize is even).
template <typename T>
__global__ void quant_kernel(const T* __restrict__ w, int64_t n, int64_t blocksize, int64_t nblocks,
                             lowbit::QuantTables t, uint8_t* __restrict__ packed, float* __restrict__ absmax) {
  const int64_t b = static_cast<int64_t>(blockIdx.x) * (blockDim.x / 32) + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (b >= nblocks) return;  // the whole warp shares b: no lane misses the shuffles below
  const int64_t start = b * blocksize;
  const int64_t len = n - start < blocksize ? n - start : blocksize;
  const bool tail = len < blocksize;
  float am = 0.f;
  for (int64_t i = lane; i < len; i += 32) am = lowbit::nan_max(am, fabsf(to_f32(w[start + i])));
  for (int off = 16; off > 0; off >>= 1) am = lowbit::nan_max(am, __shfl_xor_sync(0xffffffffu, am, off));
  if (lane == 0) absmax[b] = lowbit::stored_absmax(am, tail);
  for (int64_t j = 2 * lane; j < len; j += 64) {
    const uint8_t hi = lowbit::quantize_scaled(lowbit::scale_for_quant(to_f32(w[start + j]), am, tail), t);
    const uint8_t lo = j + 1 < len ? lowbit::quantize_scaled(lowbit::scale_for_quant(to_f32(w[start + j + 1]), am, tail), t)
                                   : t.pad;
    packed[(start + j) >> 1] = static_cast<uint8_t>((hi << 4) | lo);
  }
}

int log2i(int64_t v) {
  int r = 0;
  while ((int64_t(1) << r) < v) ++r;
  return r;
}

}  // namespace

extern "C" {

// dtype: 0 = float32, 1 = bfloat16, 2 = float16
int lowbit_cuda_dequantize_4bit(const uint8_t* packed, const float* absmax_f32, const uint8_t* absmax_q,
                                const float* nested, const float* nested_code, const float* offset, int64_t blocksize,
                                int quant_type, int64_t n, void* out, int dtype, cudaStream_t stream) {
  const AbsmaxArgs am{absmax_f32, absmax_q, nested, nested_code, offset, 8};
  const int64_t per_block = int64_t(kThreads) * kBytesPerThread * 2;
  const unsigned grid = static_cast<unsigned>((n + per_block - 1) / per_block);
  if (grid == 0) return 0;
  const int lb = log2i(blocksize);
  if (dtype == 0) dequant_kernel<float><<<grid, kThreads, 0, stream>>>(packed, am, quant_type, lb, n, (float*)out);
  else if (dtype == 1) dequant_kernel<__nv_bfloat16><<<grid, kThreads, 0, stream>>>(packed, am, quant_type, lb, n, (__nv_bfloat16*)out);
  else dequant_kernel<__half><<<grid, kThreads, 0, stream>>>(packed, am, quant_type, lb, n, (__half*)out);
  return static_cast<int>(cudaGetLastError());
}

int lowbit_cuda_gemv_4bit(const void* x, int M, const uint8_t* packed, const float* absmax_f32, const uint8_t* absmax_q,
                          const float* nested, const float* nested_code, const float* offset, int64_t blocksize,
                          int quant_type, int64_t N, int64_t K, void* y, int dtype, cudaStream_t stream) {
  const AbsmaxArgs am{absmax_f32, absmax_q, nested, nested_code, offset, 8};
  const int rows_per_block = kThreads / 32;
  const unsigned grid = static_cast<unsigned>((N + rows_per_block - 1) / rows_per_block);
  if (grid == 0 || M == 0) return 0;
  const int lb = log2i(blocksize);
  if (dtype == 0) gemv_kernel<float><<<grid, kThreads, 0, stream>>>((const float*)x, M, packed, am, quant_type, lb, N, K, (float*)y);
  else if (dtype == 1) gemv_kernel<__nv_bfloat16><<<grid, kThreads, 0, stream>>>((const __nv_bfloat16*)x, M, packed, am, quant_type, lb, N, K, (__nv_bfloat16*)y);
  else gemv_kernel<__half><<<grid, kThreads, 0, stream>>>((const __half*)x, M, packed, am, quant_type, lb, N, K, (__half*)y);
  return static_cast<int>(cudaGetLastError());
}

int lowbit_cuda_quantize_4bit(const void* w, int dtype, int64_t n, int64_t blocksize, lowbit::QuantTables tables,
                              uint8_t* packed, float* absmax, cudaStream_t stream) {
  const int64_t nblocks = (n + blocksize - 1) / blocksize;
  const int warps = kThreads / 32;
  const unsigned grid = static_cast<unsigned>((nblocks + warps - 1) / warps);
  if (grid == 0) return 0;
  if (dtype == 0) quant_kernel<float><<<grid, kThreads, 0, stream>>>((const float*)w, n, blocksize, nblocks, tables, packed, absmax);
  else if (dtype == 1) quant_kernel<__nv_bfloat16><<<grid, kThreads, 0, stream>>>((const __nv_bfloat16*)w, n, blocksize, nblocks, tables, packed, absmax);
  else quant_kernel<__half><<<grid, kThreads, 0, stream>>>((const __half*)w, n, blocksize, nblocks, tables, packed, absmax);
  return static_cast<int>(cudaGetLastError());
}

}  // extern "C"
