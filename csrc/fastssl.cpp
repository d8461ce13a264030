// Schemas of the fastssl ops implemented in C++/CUDA, and the Python module fastssl._C.
// Implementations register per device in csrc/cpu/*.cpp and csrc/cuda/*.cpp. Triton ops
// join the same namespace from Python (torch.library.custom_op("fastssl::...")), which
// adds fragments; this is the namespace's one TORCH_LIBRARY block.
#include <Python.h>
#include <torch/library.h>

#include <string>

// The CUDA images nvcc embedded ("sm_80,sm_90,compute_100"), passed by the build; empty in a
// CPU-only build. Compiled in so the library itself says which devices it can run on.
#ifndef FASTSSL_CUDA_IMAGES
#define FASTSSL_CUDA_IMAGES
#endif
#define FASTSSL_STRINGIFY(...) #__VA_ARGS__
#define FASTSSL_STRING(...) FASTSSL_STRINGIFY(__VA_ARGS__)

namespace {
std::string cuda_images() { return FASTSSL_STRING(FASTSSL_CUDA_IMAGES); }
}  // namespace

TORCH_LIBRARY(fastssl, m) {
  // Ring-buffer push of the MoCo key queue (KeyQueue.push): row r of keys [n, dim] goes to
  // queue[(ptr + r) % size], optionally L2-normalized, cast to queue's dtype; ptr advances
  // by n mod size. arrivals is a zeroed int32 scratch counter the CUDA kernel uses to let
  // its last block advance ptr.
  m.def("queue_push_(Tensor(a!) queue, Tensor(b!) ptr, Tensor(c!) arrivals, Tensor keys, bool normalize) -> ()");
  // Momentum update of the instance-discrimination memory bank (MemoryBank.update): for each
  // distinct index i, with r the LAST row of features [n, dim] whose index is i,
  // memory[i] = normalize(momentum * memory[i] + (1 - momentum) * features[r]) (optional
  // F.normalize), cast to memory's dtype. A batch with any index outside [0, size) changes no
  // row and adds 1 to rejected (the device never raises, so the host never syncs). scratch is a
  // zeroed int32 [size + 1] the implementations claim rows in; features must not alias memory.
  m.def("memory_bank_update_(Tensor(a!) memory, Tensor(b!) scratch, Tensor(c!) rejected, Tensor features, "
        "Tensor indices, float momentum, bool normalize) -> ()");
  // Comma-separated CUDA images of this build, cuobjdump's names; "" when built CPU-only.
  m.def("cuda_images() -> str", &cuda_images);
}

// Importing fastssl._C runs the static registrations above; the module has no Python API.
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", "fastssl C++/CUDA ops (torch.ops.fastssl)", -1,
                                      nullptr};
  return PyModule_Create(&module);
}
