// W2A8 decode GEMV / small-M GEMM on the Hugging Face bitnet packed layout. Pure CUDA, no torch.
//
//   x       [M, K]      float32 / bfloat16 / float16, row-major, contiguous
//   packed  [N/4, K]    uint8; codes c = T + 1 in {0,1,2}; with P = N/4,
//                       packed[r, k] = c[r,k] | c[P+r,k] << 2 | c[2P+r,k] << 4 | c[3P+r,k] << 6
//   wscale  [1]         float32, the inverse weight scale 1/gamma
//   bias    [N] or null float32 or x's dtype
//   y       [M, N]      x's dtype
//
//   s_x[m] = 127 / max(max_k |x[m,k]|, 1e-5)           (float32, per token, as torch computes
//                                                        it: reciprocal, then times 127)
//   X_q    = clamp(rint(x * s_x), -128, 127)             (round half to even, int8)
//   y      = (X_q @ T^T) / (s_x * wscale) + bias         (exact int32 accumulation, float32 epilogue)
//
// bitdistill.quant.packing.packed_linear_reference computes the same function; the kernel matches it
// bit for bit (same float32 operations in the same order, IEEE division).
#pragma once

#include <cstdint>
#include <cuda_runtime.h>

namespace bitdistill {

enum class DType : int { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2 };

struct W2A8Args {
  const void* x = nullptr;
  const uint8_t* packed = nullptr;
  const float* weight_scale = nullptr;
  const void* bias = nullptr;  // may be null
  void* y = nullptr;
  int M = 0;
  int N = 0;  // out_features = 4 * packed rows
  int K = 0;  // in_features, K % 4 == 0
  DType dtype = DType::kBFloat16;       // of x and y
  DType bias_dtype = DType::kFloat32;   // kFloat32 or dtype
  // Split-K scratch: int32 [workspace_ints] and counters int32 [counter_ints], zero on entry, and
  // left zero on exit by the kernel itself. Sizes from w2a8_workspace_size for the same shape.
  int* workspace = nullptr;
  int* counters = nullptr;
  // Launch configuration; -1 picks it from the shape. config selects (warps, unroll) from kConfigs.
  int config = -1;
  int splits = -1;
};

// Number of (warps per block, loads in flight per thread) configurations compiled in.
constexpr int kNumConfigs = 4;

// Workspace sizes (in int32 elements) the launch for this shape needs; 0 when it does not split K.
void w2a8_workspace_size(const W2A8Args& args, int device_sm_count, long long* workspace_ints,
                         long long* counter_ints);

// Validates the arguments and launches on `stream`. Returns cudaSuccess or the launch error;
// cudaErrorInvalidValue for arguments the kernel does not support (see w2a8_check).
cudaError_t w2a8_launch(const W2A8Args& args, int device_sm_count, cudaStream_t stream);

// Null when the arguments are supported, else a message naming the problem.
const char* w2a8_check(const W2A8Args& args);

}  // namespace bitdistill
