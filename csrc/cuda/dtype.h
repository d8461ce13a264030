// Element types the CUDA launchers take, as plain C codes: the .cu files compile with bare
// nvcc and the torch bindings need no CUDA headers to name them.
#pragma once

#ifdef __cplusplus
extern "C" {
#endif

enum FastsslDtype { FASTSSL_FLOAT32 = 0, FASTSSL_FLOAT16 = 1, FASTSSL_BFLOAT16 = 2, FASTSSL_FLOAT64 = 3 };

#ifdef __cplusplus
}
#endif
