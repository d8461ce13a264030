// CPU implementation of fastssl::memory_bank_update_ (same semantics and the same scratch
// protocol as csrc/cuda/memory_bank_update.cu: the last occurrence of an index wins).
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <type_traits>

#include "../memory_bank_update_checks.h"

namespace fastssl {
namespace {

template <typename In, typename Out>
void update_rows(Out* memory, const int32_t* claims, const In* features, const int64_t* indices, int64_t n,
                 int64_t dim, double momentum, bool normalize) {
  // fp32 accumulation, fp64 when memory or features are fp64; narrowing goes through fp32.
  using A = std::conditional_t<std::is_same_v<In, double> || std::is_same_v<Out, double>, double, float>;
  const A keep = static_cast<A>(momentum);
  const A take = static_cast<A>(1.0 - momentum);
  // Each index has one winning row, so the rows a chunk writes are its own.
  at::parallel_for(0, n, std::max<int64_t>(1, 16384 / dim), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const int64_t i = indices[r];
      if (claims[i] != r + 1) continue;
      const In* f = features + r * dim;
      Out* v = memory + i * dim;
      A denom = 1;
      if (normalize) {
        A sq = 0;
        for (int64_t d = 0; d < dim; ++d) {
          const A x = keep * static_cast<A>(v[d]) + take * static_cast<A>(f[d]);
          sq += x * x;
        }
        const A norm = std::sqrt(sq);
        const A eps = static_cast<A>(1e-12);  // F.normalize's eps
        denom = norm < eps ? eps : norm;      // false for NaN: a NaN row stays NaN
      }
      for (int64_t d = 0; d < dim; ++d) {
        const A x = (keep * static_cast<A>(v[d]) + take * static_cast<A>(f[d])) / denom;
        if constexpr (std::is_same_v<Out, double>) {
          v[d] = x;
        } else {
          v[d] = static_cast<Out>(static_cast<float>(x));
        }
      }
    }
  });
}

void memory_bank_update_cpu(at::Tensor& memory, at::Tensor& scratch, at::Tensor& rejected,
                            const at::Tensor& features, const at::Tensor& indices, double momentum,
                            bool normalize) {
  check_memory_bank_update_args(memory, scratch, rejected, features, indices, momentum);
  const int64_t size = memory.size(0);
  const int64_t n = features.size(0);
  const int64_t* idx = indices.data_ptr<int64_t>();
  for (int64_t r = 0; r < n; ++r) {
    if (idx[r] < 0 || idx[r] >= size) {  // the whole batch is refused: no row changes
      *rejected.data_ptr<int64_t>() += 1;
      return;
    }
  }
  int32_t* claims = scratch.data_ptr<int32_t>();
  for (int64_t r = 0; r < n; ++r) claims[idx[r]] = static_cast<int32_t>(r + 1);  // in order: the last wins
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, features.scalar_type(), "bank_update_features", [&] {
    using In = scalar_t;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, memory.scalar_type(), "bank_update_memory", [&] {
      update_rows<In, scalar_t>(memory.data_ptr<scalar_t>(), claims, features.data_ptr<In>(), idx, n,
                                memory.size(1), momentum, normalize);
    });
  });
  for (int64_t r = 0; r < n; ++r) claims[idx[r]] = 0;
}

}  // namespace
}  // namespace fastssl

TORCH_LIBRARY_IMPL(fastssl, CPU, m) { m.impl("memory_bank_update_", &fastssl::memory_bank_update_cpu); }
