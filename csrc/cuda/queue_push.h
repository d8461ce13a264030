// C interface of the CUDA key-queue kernel: plain C types only, so the .cu compiles
// with bare nvcc and the torch binding (queue_push_binding.cpp) needs no CUDA headers.
#pragma once

#include <stdint.h>

#include "dtype.h"

#ifdef __cplusplus
extern "C" {
#endif

// Pushes keys [n, dim] (row-major, contiguous) into the ring queue [size, dim]:
// row r goes to slot (*ptr + r) % size for the rows that survive (r >= n - size),
// optionally L2-normalized, cast to the queue's dtype; then *ptr = (*ptr + n) % size.
// `ptr` (one int64) and `arrivals` (one int32, zero between pushes) live in device
// memory; the host never reads them. `stream` is a cudaStream_t.
// Returns a cudaError_t (0 on success).
int fastssl_queue_push_cuda(void* queue, int queue_dtype, int64_t* ptr, int32_t* arrivals,
                            const void* keys, int keys_dtype, int64_t n, int64_t size, int64_t dim,
                            int normalize, void* stream);

#ifdef __cplusplus
}
#endif
