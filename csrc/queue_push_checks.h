// Argument checks shared by the CPU and CUDA implementations of fastssl::queue_push_.
// KeyQueue validates with friendlier messages first; these guard direct torch.ops calls.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include "dtype_checks.h"

namespace fastssl {

inline void check_queue_push_args(const at::Tensor& queue, const at::Tensor& ptr, const at::Tensor& arrivals,
                                  const at::Tensor& keys) {
  TORCH_CHECK(queue.dim() == 2 && queue.is_contiguous() && queue.size(0) >= 1 && queue.size(1) >= 1,
              "fastssl::queue_push_: queue must be a non-empty contiguous 2-D tensor, got shape ", queue.sizes());
  TORCH_CHECK(keys.dim() == 2 && keys.is_contiguous() && keys.size(0) >= 1,
              "fastssl::queue_push_: keys must be a non-empty contiguous 2-D tensor, got shape ", keys.sizes());
  TORCH_CHECK(keys.size(1) == queue.size(1), "fastssl::queue_push_: keys must have ", queue.size(1),
              " columns like the queue, got ", keys.size(1));
  TORCH_CHECK(is_float_dtype(queue.scalar_type()) && is_float_dtype(keys.scalar_type()),
              "fastssl::queue_push_: queue and keys must be float32/float16/bfloat16/float64, got ",
              queue.scalar_type(), " and ", keys.scalar_type());
  TORCH_CHECK(ptr.scalar_type() == at::kLong && ptr.numel() == 1,
              "fastssl::queue_push_: ptr must be one int64, got ", ptr.scalar_type(), " of shape ", ptr.sizes());
  TORCH_CHECK(arrivals.scalar_type() == at::kInt && arrivals.numel() == 1,
              "fastssl::queue_push_: arrivals must be one int32, got ", arrivals.scalar_type(), " of shape ",
              arrivals.sizes());
  TORCH_CHECK(keys.device() == queue.device() && ptr.device() == queue.device() &&
                  arrivals.device() == queue.device(),
              "fastssl::queue_push_: all tensors must be on the queue's device ", queue.device(), ", got keys on ",
              keys.device(), ", ptr on ", ptr.device(), ", arrivals on ", arrivals.device());
}

}  // namespace fastssl
