// CUDA binding of fastssl::memory_bank_update_: checks, picks the current stream and calls the
// plain-C launcher in memory_bank_update.cu. Nothing here reads device memory (no sync).
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>
#include <torch/library.h>

#include "../memory_bank_update_checks.h"
#include "binding_dtype.h"
#include "memory_bank_update.h"

namespace fastssl {
namespace {

void memory_bank_update_cuda(at::Tensor& memory, at::Tensor& scratch, at::Tensor& rejected,
                             const at::Tensor& features, const at::Tensor& indices, double momentum,
                             bool normalize) {
  check_memory_bank_update_args(memory, scratch, rejected, features, indices, momentum);
  const c10::cuda::CUDAGuard guard(memory.device());
  constexpr const char* op = "fastssl::memory_bank_update_";
  const int err = fastssl_memory_bank_update_cuda(
      memory.data_ptr(), dtype_code(memory.scalar_type(), op), scratch.data_ptr<int32_t>(),
      rejected.data_ptr<int64_t>(), features.data_ptr(), dtype_code(features.scalar_type(), op),
      indices.data_ptr<int64_t>(), features.size(0), memory.size(0), memory.size(1), momentum, normalize ? 1 : 0,
      c10::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(err == 0, op, ": CUDA launch failed: ", cudaGetErrorString(static_cast<cudaError_t>(err)));
}

}  // namespace
}  // namespace fastssl

TORCH_LIBRARY_IMPL(fastssl, CUDA, m) { m.impl("memory_bank_update_", &fastssl::memory_bank_update_cuda); }
