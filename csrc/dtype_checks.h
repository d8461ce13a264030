// Dtype predicates shared by the ops' argument checks (csrc/*_checks.h).
#pragma once

#include <ATen/core/Tensor.h>

namespace fastssl {

inline bool is_float_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kHalf || t == at::kBFloat16 || t == at::kDouble;
}

}  // namespace fastssl
