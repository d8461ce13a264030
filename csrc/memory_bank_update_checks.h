// Argument checks shared by the CPU and CUDA implementations of fastssl::memory_bank_update_.
// MemoryBank validates with friendlier messages first; these guard direct torch.ops calls.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cstdint>
#include <limits>

#include "dtype_checks.h"

namespace fastssl {

inline void check_memory_bank_update_args(const at::Tensor& memory, const at::Tensor& scratch,
                                          const at::Tensor& rejected, const at::Tensor& features,
                                          const at::Tensor& indices, double momentum) {
  constexpr const char* op = "fastssl::memory_bank_update_: ";
  TORCH_CHECK(memory.dim() == 2 && memory.is_contiguous() && memory.size(0) >= 1 && memory.size(1) >= 1, op,
              "memory must be a non-empty contiguous 2-D tensor, got shape ", memory.sizes());
  TORCH_CHECK(features.dim() == 2 && features.is_contiguous() && features.size(0) >= 1, op,
              "features must be a non-empty contiguous 2-D tensor, got shape ", features.sizes());
  TORCH_CHECK(features.size(1) == memory.size(1), op, "features must have ", memory.size(1),
              " columns like memory, got ", features.size(1));
  TORCH_CHECK(features.size(0) < std::numeric_limits<int32_t>::max(), op, "at most 2^31 - 2 rows per update, got ",
              features.size(0));
  TORCH_CHECK(is_float_dtype(memory.scalar_type()) && is_float_dtype(features.scalar_type()), op,
              "memory and features must be float32/float16/bfloat16/float64, got ", memory.scalar_type(), " and ",
              features.scalar_type());
  TORCH_CHECK(indices.scalar_type() == at::kLong && indices.dim() == 1 && indices.is_contiguous() &&
                  indices.size(0) == features.size(0),
              op, "indices must be a contiguous 1-D int64 tensor with one entry per feature row (",
              features.size(0), "), got ", indices.scalar_type(), " of shape ", indices.sizes());
  TORCH_CHECK(scratch.scalar_type() == at::kInt && scratch.is_contiguous() && scratch.numel() == memory.size(0) + 1,
              op, "scratch must be a contiguous int32 tensor of ", memory.size(0) + 1, " entries (rows + 1), got ",
              scratch.scalar_type(), " of shape ", scratch.sizes());
  TORCH_CHECK(rejected.scalar_type() == at::kLong && rejected.numel() == 1, op, "rejected must be one int64, got ",
              rejected.scalar_type(), " of shape ", rejected.sizes());
  TORCH_CHECK(momentum >= 0.0 && momentum <= 1.0, op, "momentum must be in [0, 1], got ", momentum);
  TORCH_CHECK(features.device() == memory.device() && indices.device() == memory.device() &&
                  scratch.device() == memory.device() && rejected.device() == memory.device(),
              op, "all tensors must be on memory's device ", memory.device(), ", got features on ",
              features.device(), ", indices on ", indices.device(), ", scratch on ", scratch.device(),
              ", rejected on ", rejected.device());
}

}  // namespace fastssl
