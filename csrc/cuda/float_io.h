// Device-side loads, stores and accumulator types shared by the .cu kernels (included by
// .cu files only), and the host-side switch from a FastsslDtype code to its C++ type.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <type_traits>

#include "dtype.h"

namespace fastssl_cuda {

// fp32 accumulation, fp64 when any operand is fp64 (no precision thrown away).
template <typename... T>
using acc_t = std::conditional_t<(std::is_same_v<T, double> || ...), double, float>;

template <typename A> __device__ __forceinline__ A load_as(const float* p) { return static_cast<A>(*p); }
template <typename A> __device__ __forceinline__ A load_as(const double* p) { return static_cast<A>(*p); }
template <typename A> __device__ __forceinline__ A load_as(const __half* p) { return static_cast<A>(__half2float(*p)); }
template <typename A> __device__ __forceinline__ A load_as(const __nv_bfloat16* p) {
  return static_cast<A>(__bfloat162float(*p));
}

// Narrowing goes through fp32 like torch's casts (fp64 -> fp32 -> fp16/bf16).
template <typename A> __device__ __forceinline__ void store(float* p, A v) { *p = static_cast<float>(v); }
template <typename A> __device__ __forceinline__ void store(double* p, A v) { *p = static_cast<double>(v); }
template <typename A> __device__ __forceinline__ void store(__half* p, A v) { *p = __float2half_rn(static_cast<float>(v)); }
template <typename A> __device__ __forceinline__ void store(__nv_bfloat16* p, A v) {
  *p = __float2bfloat16_rn(static_cast<float>(v));
}

// Calls f(T{}) with the C++ type of a FastsslDtype code; cudaErrorInvalidValue for others.
template <typename F>
int with_float_type(int code, F&& f) {
  switch (code) {
    case FASTSSL_FLOAT32: return f(float{});
    case FASTSSL_FLOAT16: return f(__half{});
    case FASTSSL_BFLOAT16: return f(__nv_bfloat16{});
    case FASTSSL_FLOAT64: return f(double{});
    default: return static_cast<int>(cudaErrorInvalidValue);
  }
}

}  // namespace fastssl_cuda
