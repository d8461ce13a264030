// CPU implementation of fastssl::queue_push_ (same semantics as csrc/cuda/queue_push.cu).
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <type_traits>

#include "../queue_push_checks.h"

namespace fastssl {
namespace {

template <typename In, typename Out>
void push_rows(Out* queue, const In* keys, int64_t ptr, int64_t n, int64_t size, int64_t dim, bool normalize) {
  // fp32 accumulation, fp64 for fp64 keys; narrowing goes through fp32 like torch's casts.
  using A = std::conditional_t<std::is_same_v<In, double>, double, float>;
  // Only the last `size` rows survive; each lands in its own slot, so rows are independent.
  const int64_t start = n > size ? n - size : 0;
  at::parallel_for(start, n, std::max<int64_t>(1, 16384 / dim), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const In* src = keys + r * dim;
      Out* dst = queue + ((ptr + r) % size) * dim;
      A denom = 1;
      if (normalize) {
        A sq = 0;
        for (int64_t d = 0; d < dim; ++d) {
          const A v = static_cast<A>(src[d]);
          sq += v * v;
        }
        const A norm = std::sqrt(sq);
        const A eps = static_cast<A>(1e-12);  // F.normalize's eps
        denom = norm < eps ? eps : norm;      // false for NaN: a NaN row stays NaN
      }
      for (int64_t d = 0; d < dim; ++d) {
        const A v = static_cast<A>(src[d]) / denom;
        if constexpr (std::is_same_v<Out, at::Half> || std::is_same_v<Out, at::BFloat16>) {
          dst[d] = static_cast<Out>(static_cast<float>(v));
        } else {
          dst[d] = static_cast<Out>(v);
        }
      }
    }
  });
}

void queue_push_cpu(at::Tensor& queue, at::Tensor& ptr, at::Tensor& arrivals, const at::Tensor& keys,
                    bool normalize) {
  check_queue_push_args(queue, ptr, arrivals, keys);
  const int64_t size = queue.size(0);
  const int64_t n = keys.size(0);
  const int64_t dim = queue.size(1);
  int64_t* p = ptr.data_ptr<int64_t>();
  // A pointer outside [0, size) (a hand-edited checkpoint) must not write out of bounds.
  const int64_t p0 = ((*p % size) + size) % size;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, keys.scalar_type(), "queue_push_keys", [&] {
    using In = scalar_t;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, queue.scalar_type(), "queue_push_queue", [&] {
      push_rows<In, scalar_t>(queue.data_ptr<scalar_t>(), keys.data_ptr<In>(), p0, n, size, dim, normalize);
    });
  });
  *p = (p0 + n) % size;
}

}  // namespace
}  // namespace fastssl

TORCH_LIBRARY_IMPL(fastssl, CPU, m) { m.impl("queue_push_", &fastssl::queue_push_cpu); }
