// W2A8 decode GEMV / small-M GEMM on the Hugging Face bitnet packed layout. Pure CUDA, no torch.
//
//   x       [M, K]      float32 / bfloat16 / float16, row-major, contiguous, K % 4 == 0
//   packed  [N/4, K]    uint8; codes c = T + 1 in {0,1,2}; with P = N/4,
//                       packed[r, k] = c[r,k] | c[P+r,k] << 2 | c[2P+r,k] << 4 | c[3P+r,k] << 6
//   wscale  [1]         float32, the inverse weight scale 1/gamma
//   bias    [N] or null float32 or x's dtype
//   y       [M, N]      x's dtype
//
//   s_x[m] = 127 / max(max_k |x[m,k]|, 1e-5)           (float32, per token, evaluated as torch does:
//                                                        reciprocal, then times 127)
//   X_q    = clamp(rint(x * s_x), -128, 127)             (round half to even, int8)
//   y      = (X_q @ T^T) / (s_x * wscale) + bias         (exact int32 accumulation, float32 epilogue)
//
// bitdistill.quant.packing.packed_linear_reference computes the same function; the kernels match it
// bit for bit (same float32 operations in the same order, IEEE division).
//
// Two kernels: act_quant (one block per token: X_q into a zero-padded [M, Kp] scratch, Kp = K rounded up
// to 64, and s_x) and the packed GEMV, launched with programmatic dependent launch on sm_90 so its
// weight loads start while act_quant still runs. Opt-in (fuse): for M <= 8 bfloat16/float16 tokens one
// kernel where each block computes the absmax of its tokens and quantizes in registers.
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
  // Scratch (sizes from w2a8_scratch_bytes): x codes int8 [M, Kp], s_x float [M], and the split-K
  // workspace int32 (zeroed by act_quant, so it may hold anything on entry).
  int8_t* x_codes = nullptr;
  float* x_scale = nullptr;
  int* workspace = nullptr;
  // Launch configuration; -1 picks it from the shape. config selects (warps, unroll) from the table.
  int config = -1;
  int splits = -1;
  // Allow the single-kernel path (M <= 8, bfloat16/float16, no K split; needs no scratch). Off by
  // default: measured slower than the two-kernel path on all but the smallest shapes.
  bool fuse = false;
};

// Number of (warps per block, 16-byte loads in flight per thread) configurations compiled in.
constexpr int kNumConfigs = 5;

// K rounded up to a multiple of 64: the row stride of the x-codes scratch.
inline int w2a8_padded_k(int K) { return (K + 63) / 64 * 64; }

struct W2A8Scratch {
  long long codes_bytes;      // int8 [M, Kp]
  long long scale_floats;     // float [M]
  long long workspace_ints;   // int32 split-K partial tiles + arrival counters; 0 without split K
};
W2A8Scratch w2a8_scratch_sizes(const W2A8Args& args, int device_sm_count);

// Null when the arguments are supported, else a message naming the problem.
const char* w2a8_check(const W2A8Args& args);

// Activation quantization alone: codes int8 [M, Kp] (zero past K) and scale float [M].
cudaError_t act_quant_launch(const void* x, DType dtype, int M, int K, int8_t* codes, float* scale,
                             cudaStream_t stream);

// Validates, then launches act_quant and the GEMV on `stream`. `pdl` enables programmatic dependent
// launch (compute capability >= 9.0 only). Returns cudaSuccess or the launch error;
// cudaErrorInvalidValue for arguments w2a8_check refuses or missing scratch.
cudaError_t w2a8_launch(const W2A8Args& args, int device_sm_count, bool pdl, cudaStream_t stream);

}  // namespace bitdistill
