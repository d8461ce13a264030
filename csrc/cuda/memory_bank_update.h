// C interface of the CUDA memory-bank update: plain C types only, so the .cu compiles with
// bare nvcc and the torch binding (memory_bank_update_binding.cpp) needs no CUDA headers.
#pragma once

#include <stdint.h>

#include "dtype.h"

#ifdef __cplusplus
extern "C" {
#endif

// Momentum update of the bank memory [size, dim] by index: for each distinct i in
// indices [n] (int64), with r the LAST row of features [n, dim] whose index is i,
//   memory[i] <- normalize(momentum * memory[i] + (1 - momentum) * features[r])
// (normalize: x / max(||x||_2, 1e-12), skipped when normalize == 0), accumulated in fp32
// (fp64 when memory or features are fp64) and cast to memory's dtype through fp32.
// A batch holding any index outside [0, size) changes no row and adds 1 to *rejected.
// `scratch` is int32 [size + 1], zero between updates (one claim per row, then the batch's
// rejection flag); `rejected` is one int64. All live in device memory and the host never
// reads them: three launches on `stream` (a cudaStream_t), no sync. Needs n < 2^31.
// Returns a cudaError_t (0 on success).
int fastssl_memory_bank_update_cuda(void* memory, int memory_dtype, int32_t* scratch, int64_t* rejected,
                                    const void* features, int features_dtype, const int64_t* indices,
                                    int64_t n, int64_t size, int64_t dim, double momentum, int normalize,
                                    void* stream);

#ifdef __cplusplus
}
#endif
