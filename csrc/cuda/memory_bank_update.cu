// CUDA kernels of MemoryBank.update, three launches on one stream and no host sync:
//   claim:  scratch[i] = 1 + the last row r with indices[r] == i (atomicMax: the result does
//           not depend on the order threads run in), or raise the batch's rejection flag;
//   apply:  the one winning row of each index updates memory[i] and releases its claim, so
//           no two warps ever write the same row (no float atomics, no race);
//   finish: count a rejected batch and lower the flag for the next update.
#include <cuda_runtime.h>
#include <stdint.h>

#include "float_io.h"
#include "memory_bank_update.h"

namespace {

using fastssl_cuda::acc_t;
using fastssl_cuda::load_as;
using fastssl_cuda::store;

constexpr int kWarpSize = 32;
constexpr int kWarpsPerBlock = 8;  // apply: one warp per row (dim ~ 128..4096)
constexpr int kClaimThreads = 256;  // claim: one thread per row
constexpr int kMaxBlocks = 4096;   // grid-stride beyond this

__global__ void claim_kernel(int32_t* claims, int32_t* rejected_flag, const int64_t* __restrict__ indices,
                             int64_t n, int64_t size) {
  for (int64_t r = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; r < n;
       r += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t i = indices[r];
    if (i < 0 || i >= size) {
      atomicExch(rejected_flag, 1);
    } else {
      atomicMax(claims + i, static_cast<int32_t>(r + 1));
    }
  }
}

template <typename In, typename Out>
__global__ void apply_kernel(Out* __restrict__ memory, int32_t* claims, const int32_t* rejected_flag,
                             const In* __restrict__ features, const int64_t* __restrict__ indices, int64_t n,
                             int64_t size, int64_t dim, double momentum, bool normalize) {
  using A = acc_t<In, Out>;
  const bool rejected = *rejected_flag != 0;
  const A keep = static_cast<A>(momentum);
  const A take = static_cast<A>(1.0 - momentum);
  const int lane = threadIdx.x % kWarpSize;
  const int warp = threadIdx.x / kWarpSize;

  for (int64_t r = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + warp; r < n;
       r += static_cast<int64_t>(gridDim.x) * kWarpsPerBlock) {
    const int64_t i = indices[r];
    if (i < 0 || i >= size) continue;  // only in a rejected batch; claim set no slot for it
    // One lane reads the claim and hands it to the others: lanes of a warp need not run in
    // step, and the winner's lane 0 releases the claim below.
    int32_t claim = lane == 0 ? claims[i] : 0;
    claim = __shfl_sync(0xffffffffu, claim, 0);
    if (claim != r + 1) continue;  // a later row with the same index wins
    if (!rejected) {
      const In* f = features + r * dim;
      Out* v = memory + i * dim;
      A denom = 1;
      if (normalize) {
        A sq = 0;
        for (int64_t d = lane; d < dim; d += kWarpSize) {
          const A x = keep * load_as<A>(v + d) + take * load_as<A>(f + d);
          sq += x * x;
        }
        for (int offset = kWarpSize / 2; offset > 0; offset /= 2) sq += __shfl_xor_sync(0xffffffffu, sq, offset);
        const A norm = sqrt(sq);
        const A eps = static_cast<A>(1e-12);  // F.normalize's eps
        // `norm < eps` is false for NaN, so a NaN row stays NaN (fmax would drop it).
        denom = norm < eps ? eps : norm;
      }
      // Each lane rewrites only the elements it read: no hazard within the row.
      for (int64_t d = lane; d < dim; d += kWarpSize) {
        store(v + d, (keep * load_as<A>(v + d) + take * load_as<A>(f + d)) / denom);
      }
    }
    // Losers read either this claim or 0, never their own r + 1: releasing early is safe.
    if (lane == 0) claims[i] = 0;
  }
}

__global__ void finish_kernel(int32_t* rejected_flag, int64_t* rejected) {
  if (*rejected_flag != 0) {
    *rejected += 1;
    *rejected_flag = 0;
  }
}

unsigned int blocks_for(int64_t items, int64_t per_block) {
  const int64_t blocks = (items + per_block - 1) / per_block;
  return static_cast<unsigned int>(blocks < 1 ? 1 : (blocks > kMaxBlocks ? kMaxBlocks : blocks));
}

template <typename In, typename Out>
int launch(void* memory, int32_t* scratch, int64_t* rejected, const void* features, const int64_t* indices,
           int64_t n, int64_t size, int64_t dim, double momentum, int normalize, cudaStream_t stream) {
  int32_t* rejected_flag = scratch + size;
  claim_kernel<<<blocks_for(n, kClaimThreads), kClaimThreads, 0, stream>>>(scratch, rejected_flag, indices, n,
                                                                            size);
  apply_kernel<In, Out><<<blocks_for(n, kWarpsPerBlock), kWarpsPerBlock * kWarpSize, 0, stream>>>(
      static_cast<Out*>(memory), scratch, rejected_flag, static_cast<const In*>(features), indices, n, size, dim,
      momentum, normalize != 0);
  finish_kernel<<<1, 1, 0, stream>>>(rejected_flag, rejected);
  return static_cast<int>(cudaGetLastError());
}

}  // namespace

extern "C" int fastssl_memory_bank_update_cuda(void* memory, int memory_dtype, int32_t* scratch, int64_t* rejected,
                                               const void* features, int features_dtype, const int64_t* indices,
                                               int64_t n, int64_t size, int64_t dim, double momentum, int normalize,
                                               void* stream) {
  // Claims hold r + 1 in an int32.
  if (n < 1 || n >= INT32_MAX || size < 1 || dim < 1) return static_cast<int>(cudaErrorInvalidValue);
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  return fastssl_cuda::with_float_type(features_dtype, [&](auto feature) {
    return fastssl_cuda::with_float_type(memory_dtype, [&](auto row) {
      return launch<decltype(feature), decltype(row)>(memory, scratch, rejected, features, indices, n, size, dim,
                                                      momentum, normalize, s);
    });
  });
}
