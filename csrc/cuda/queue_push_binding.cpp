// CUDA binding of fastssl::queue_push_: checks, picks the current stream and calls the
// plain-C launcher in queue_push.cu. Nothing here reads device memory (no sync).
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>
#include <torch/library.h>

#include "../queue_push_checks.h"
#include "binding_dtype.h"
#include "queue_push.h"

namespace fastssl {
namespace {

void queue_push_cuda(at::Tensor& queue, at::Tensor& ptr, at::Tensor& arrivals, const at::Tensor& keys,
                     bool normalize) {
  check_queue_push_args(queue, ptr, arrivals, keys);
  const c10::cuda::CUDAGuard guard(queue.device());
  constexpr const char* op = "fastssl::queue_push_";
  const int err = fastssl_queue_push_cuda(
      queue.data_ptr(), dtype_code(queue.scalar_type(), op), ptr.data_ptr<int64_t>(), arrivals.data_ptr<int32_t>(),
      keys.data_ptr(), dtype_code(keys.scalar_type(), op), keys.size(0), queue.size(0), queue.size(1),
      normalize ? 1 : 0, c10::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(err == 0, "fastssl::queue_push_: CUDA launch failed: ",
              cudaGetErrorString(static_cast<cudaError_t>(err)));
}

}  // namespace
}  // namespace fastssl

TORCH_LIBRARY_IMPL(fastssl, CUDA, m) { m.impl("queue_push_", &fastssl::queue_push_cuda); }
