// The FastsslDtype code of a tensor's dtype, for the torch bindings of the CUDA launchers.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include "dtype.h"

namespace fastssl {

inline int dtype_code(at::ScalarType t, const char* op) {
  switch (t) {
    case at::kFloat: return FASTSSL_FLOAT32;
    case at::kHalf: return FASTSSL_FLOAT16;
    case at::kBFloat16: return FASTSSL_BFLOAT16;
    case at::kDouble: return FASTSSL_FLOAT64;
    default: break;
  }
  TORCH_CHECK(false, op, ": unsupported dtype ", t);
  return -1;
}

}  // namespace fastssl
