// CUDA kernel of KeyQueue.push: one launch writes the surviving rows, casts and
// optionally L2-normalizes them, and advances the device-side pointer, so a push
// never reads the pointer on the host (no device-to-host sync).
#include <cuda_runtime.h>
#include <stdint.h>

#include "float_io.h"
#include "queue_push.h"

namespace {

using fastssl_cuda::acc_t;
using fastssl_cuda::load_as;
using fastssl_cuda::store;

constexpr int kWarpSize = 32;
constexpr int kWarpsPerBlock = 8;  // one warp per row: rows are short (dim ~ 128..4096)
constexpr int kMaxBlocks = 4096;   // grid-stride beyond this

template <typename In, typename Out>
__global__ void queue_push_kernel(Out* __restrict__ queue, int64_t* ptr, unsigned int* arrivals,
                                  const In* __restrict__ keys, int64_t start, int64_t n, int64_t size,
                                  int64_t dim, bool normalize) {
  using A = acc_t<In>;  // fp64 only for fp64 keys, as the CPU path
  __shared__ int64_t s_ptr;
  __shared__ bool s_last;
  if (threadIdx.x == 0) {
    // A pointer outside [0, size) (a hand-edited checkpoint) must not write out of bounds.
    const int64_t p = *ptr % size;
    s_ptr = p < 0 ? p + size : p;
  }
  __syncthreads();
  const int64_t p0 = s_ptr;
  const int lane = threadIdx.x % kWarpSize;
  const int warp = threadIdx.x / kWarpSize;

  for (int64_t r = start + static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + warp; r < n;
       r += static_cast<int64_t>(gridDim.x) * kWarpsPerBlock) {
    const In* src = keys + r * dim;
    Out* dst = queue + ((p0 + r) % size) * dim;
    A denom = 1;
    if (normalize) {
      A sq = 0;
      for (int64_t d = lane; d < dim; d += kWarpSize) {
        const A v = load_as<A>(src + d);
        sq += v * v;
      }
      for (int offset = kWarpSize / 2; offset > 0; offset /= 2) sq += __shfl_xor_sync(0xffffffffu, sq, offset);
      const A norm = sqrt(sq);
      const A eps = static_cast<A>(1e-12);  // F.normalize's eps
      // `norm < eps` is false for NaN, so a NaN row stays NaN (fmax would drop it).
      denom = norm < eps ? eps : norm;
    }
    for (int64_t d = lane; d < dim; d += kWarpSize) store(dst + d, load_as<A>(src + d) / denom);
  }

  // The last block to arrive advances the pointer. Every other block read *ptr before
  // its arrival (the fence orders that read before the atomic), so no block can see
  // the new value; the last one also resets the counter for the next push.
  __syncthreads();
  if (threadIdx.x == 0) {
    __threadfence();
    s_last = atomicAdd(arrivals, 1u) == gridDim.x - 1;
  }
  __syncthreads();
  if (s_last && threadIdx.x == 0) {
    *ptr = (p0 + n) % size;
    atomicExch(arrivals, 0u);
  }
}

template <typename In, typename Out>
int launch(void* queue, int64_t* ptr, int32_t* arrivals, const void* keys, int64_t n, int64_t size,
           int64_t dim, int normalize, cudaStream_t stream) {
  // Only the last `size` rows survive a push of n > size rows.
  const int64_t start = n > size ? n - size : 0;
  const int64_t rows = n - start;
  int64_t blocks = (rows + kWarpsPerBlock - 1) / kWarpsPerBlock;
  blocks = blocks < 1 ? 1 : (blocks > kMaxBlocks ? kMaxBlocks : blocks);
  queue_push_kernel<In, Out><<<static_cast<unsigned int>(blocks), kWarpsPerBlock * kWarpSize, 0, stream>>>(
      static_cast<Out*>(queue), ptr, reinterpret_cast<unsigned int*>(arrivals), static_cast<const In*>(keys),
      start, n, size, dim, normalize != 0);
  return static_cast<int>(cudaGetLastError());
}

}  // namespace

extern "C" int fastssl_queue_push_cuda(void* queue, int queue_dtype, int64_t* ptr, int32_t* arrivals,
                                       const void* keys, int keys_dtype, int64_t n, int64_t size, int64_t dim,
                                       int normalize, void* stream) {
  if (n < 1 || size < 1 || dim < 1) return static_cast<int>(cudaErrorInvalidValue);
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  return fastssl_cuda::with_float_type(keys_dtype, [&](auto key) {
    return fastssl_cuda::with_float_type(queue_dtype, [&](auto slot) {
      return launch<decltype(key), decltype(slot)>(queue, ptr, arrivals, keys, n, size, dim, normalize, s);
    });
  });
}
