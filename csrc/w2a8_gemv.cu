// W2A8 decode GEMV / small-M GEMM (see w2a8_gemv.h for the function computed).
//
// One block computes a 16-token x 32-output tile: 8 packed rows r (each byte holds the outputs r,
// P+r, 2P+r, 3P+r) for up to 16 tokens, over one K split. Per block:
//   1. every thread starts loading its first weights (16 bytes per thread and step, kept in registers);
//   2. absmax of each token over the whole K (x is read from L2), s_x = 127 / max(absmax, 1e-5);
//   3. per K chunk: quantize x[tokens, chunk] to int8 in shared memory (round half to even), then
//      each warp takes every W-th 64-column step of the chunk: 2 x 4 mma.m16n8k32 s8 x u8 on the raw
//      2-bit codes c in {0,1,2} (B = (byte >> 2j) & 3 per output block j), plus one mma against
//      all-ones giving sum_k X_q, so that X_q . T = X_q . c - sum_k X_q exactly;
//   4. warps reduce through shared memory; with split K, blocks add their int32 tile into a
//      workspace and the last one to arrive applies the epilogue and zeroes the workspace again;
//   5. epilogue y = float(acc) / (s_x * wscale) + bias, rounded to the output dtype.
// The 64 columns a thread reads as one 16-byte vector are fed to the mma in a permuted k order that
// A (x codes, also one 16-byte vector per token row) follows too; the dot product is unchanged.
#include "w2a8_gemv.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>

namespace bitdistill {
namespace {

constexpr int kTileM = 16;          // tokens per block tile (mma M)
constexpr int kRowsPerBlock = 8;    // packed rows per block (mma N), 32 outputs
constexpr int kStep = 64;           // K columns per warp step (one 16-byte vector per thread)
constexpr int kRedCols = 33;        // 32 outputs + the row sum of X_q
constexpr int kXSmemBudget = 40 * 1024;

struct Config {
  int warps;
  int unroll;
};
constexpr Config kConfigs[kNumConfigs] = {{8, 4}, {4, 4}, {4, 8}, {8, 2}};

struct Plan {
  int config, warps, unroll;
  int m_tiles, row_blocks, splits;
  int steps_per_split, chunk_steps;
  int xs_stride;  // bytes per token row of the shared x chunk
  size_t smem_bytes;
};

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }

template <typename T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ float from_float<float>(float v) { return v; }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }
template <>
__device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }

// Four consecutive elements (K % 4 == 0 keeps every such group aligned).
template <typename T>
struct alignas(4 * sizeof(T)) Vec4 {
  T v[4];
};

__device__ __forceinline__ void mma_s8u8(int (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k32.row.col.s32.s8.u8.s32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};\n"
      : "+r"(d[0]), "+r"(d[1]), "+r"(d[2]), "+r"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

template <bool kAligned16>
__device__ __forceinline__ uint4 load_weights(const uint8_t* row, int col, int K, bool valid) {
  uint4 w = make_uint4(0u, 0u, 0u, 0u);
  if (!valid) return w;
  if (kAligned16) {
    if (col < K) w = __ldg(reinterpret_cast<const uint4*>(row + col));
  } else {
    uint32_t t[4];
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      t[i] = (col + 4 * i < K) ? __ldg(reinterpret_cast<const uint32_t*>(row + col + 4 * i)) : 0u;
    }
    w = make_uint4(t[0], t[1], t[2], t[3]);
  }
  return w;
}

template <typename T, typename TB, int W, int U, bool kAligned16>
__global__ void __launch_bounds__(W * 32) w2a8_kernel(const T* __restrict__ x, const uint8_t* __restrict__ packed,
                                                      const float* __restrict__ wscale, const TB* __restrict__ bias,
                                                      T* __restrict__ y, int M, int K, int P, int steps_per_split,
                                                      int chunk_steps, int xs_stride, int* __restrict__ workspace,
                                                      int* __restrict__ counters) {
  extern __shared__ __align__(16) unsigned char smem[];
  __shared__ float s_scale[kTileM];
  __shared__ unsigned int s_amax[kTileM];
  __shared__ bool s_last;

  const int tid = threadIdx.x;
  const int warp = tid >> 5;
  const int lane = tid & 31;
  const int g = lane >> 2;   // mma group: packed row within the block, token row of A
  const int tig = lane & 3;  // thread in group: 16-byte slice of the 64-column step
  const int N = 4 * P;
  const int m0 = blockIdx.y * kTileM;
  const int rows = min(kTileM, M - m0);
  const int row_base = blockIdx.x * kRowsPerBlock;
  const int prow = row_base + g;
  const bool row_valid = prow < P;
  const uint8_t* wrow = packed + static_cast<size_t>(row_valid ? prow : 0) * K;
  const int steps_total = (K + kStep - 1) / kStep;
  const int split_begin = blockIdx.z * steps_per_split;
  const int split_end = min(steps_total, split_begin + steps_per_split);
  const int iters = steps_per_split / W;  // per warp, a multiple of U

  // 1. First weights in flight before anything else.
  uint4 wbuf[U];
#pragma unroll
  for (int u = 0; u < U; ++u) {
    const int s = split_begin + warp + W * u;
    wbuf[u] = load_weights<kAligned16>(wrow, s * kStep + tig * 16, K, row_valid && s < split_end);
  }

  // 2. Per-token absmax over the whole K.
  if (tid < kTileM) s_amax[tid] = 0u;
  __syncthreads();
  const int k4 = K / 4;
  for (int m = 0; m < rows; ++m) {
    const Vec4<T>* xr = reinterpret_cast<const Vec4<T>*>(x + static_cast<size_t>(m0 + m) * K);
    float mx = 0.f;
    for (int i = tid; i < k4; i += W * 32) {
      const Vec4<T> v = xr[i];
#pragma unroll
      for (int e = 0; e < 4; ++e) mx = fmaxf(mx, fabsf(to_float(v.v[e])));
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, o));
    if (lane == 0) atomicMax(&s_amax[m], __float_as_uint(mx));  // non-negative floats order as uints
  }
  __syncthreads();
  // torch evaluates `127 / t` as `t.reciprocal() * 127`: two roundings, reproduced here.
  if (tid < rows) s_scale[tid] = __fmul_rn(__frcp_rn(fmaxf(__uint_as_float(s_amax[tid]), 1e-5f)), 127.f);

  int acc[5][4];
#pragma unroll
  for (int j = 0; j < 5; ++j) {
#pragma unroll
    for (int e = 0; e < 4; ++e) acc[j][e] = 0;
  }

  int8_t* xs = reinterpret_cast<int8_t*>(smem);
  const int chunk_cols = chunk_steps * kStep;
  int it = 0;
  for (int chunk_begin = split_begin; chunk_begin < split_begin + steps_per_split; chunk_begin += chunk_steps) {
    // 3a. Quantize x[:, chunk] into shared memory (zeros past K).
    __syncthreads();
    const int col0 = chunk_begin * kStep;
    const int groups = rows * (chunk_cols / 4);
    for (int q = tid; q < groups; q += W * 32) {
      const int m = q / (chunk_cols / 4);
      const int c = (q - m * (chunk_cols / 4)) * 4;
      uint32_t word = 0u;
      if (col0 + c < K) {
        const Vec4<T> v = *reinterpret_cast<const Vec4<T>*>(x + static_cast<size_t>(m0 + m) * K + col0 + c);
        const float sc = s_scale[m];
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int code = min(127, max(-128, __float2int_rn(__fmul_rn(to_float(v.v[e]), sc))));
          word |= static_cast<uint32_t>(code & 0xff) << (8 * e);
        }
      }
      *reinterpret_cast<uint32_t*>(xs + m * xs_stride + c) = word;
    }
    __syncthreads();

    // 3b. Tensor-core steps over the chunk, next weights loaded while the current ones are used.
    const int it_end = it + chunk_steps / W;
    for (; it < it_end; it += U) {
      uint4 cur[U];
#pragma unroll
      for (int u = 0; u < U; ++u) cur[u] = wbuf[u];
      if (it + U < iters) {
#pragma unroll
        for (int u = 0; u < U; ++u) {
          const int s = split_begin + warp + W * (it + U + u);
          wbuf[u] = load_weights<kAligned16>(wrow, s * kStep + tig * 16, K, row_valid && s < split_end);
        }
      }
#pragma unroll
      for (int u = 0; u < U; ++u) {
        const int s = split_begin + warp + W * (it + u);
        if (s >= split_end) continue;
        const int lc = (s - chunk_begin) * kStep + tig * 16;
        const uint4 xa = g < rows ? *reinterpret_cast<const uint4*>(xs + g * xs_stride + lc) : make_uint4(0, 0, 0, 0);
        const uint4 xb =
            g + 8 < rows ? *reinterpret_cast<const uint4*>(xs + (g + 8) * xs_stride + lc) : make_uint4(0, 0, 0, 0);
        const uint32_t wv[4] = {cur[u].x, cur[u].y, cur[u].z, cur[u].w};
        const uint32_t av[4] = {xa.x, xa.y, xa.z, xa.w};
        const uint32_t bv[4] = {xb.x, xb.y, xb.z, xb.w};
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          const uint32_t a[4] = {av[2 * h], bv[2 * h], av[2 * h + 1], bv[2 * h + 1]};
#pragma unroll
          for (int j = 0; j < 4; ++j) {
            mma_s8u8(acc[j], a, (wv[2 * h] >> (2 * j)) & 0x03030303u, (wv[2 * h + 1] >> (2 * j)) & 0x03030303u);
          }
          mma_s8u8(acc[4], a, 0x01010101u, 0x01010101u);
        }
      }
    }
  }

  // 4. Reduce the warps' partial tiles: red[warp][token][0..31 outputs, 32 = row sum].
  __syncthreads();
  int* red = reinterpret_cast<int*>(smem);
#pragma unroll
  for (int j = 0; j < 4; ++j) {
#pragma unroll
    for (int e = 0; e < 2; ++e) {
      red[(warp * kTileM + g) * kRedCols + j * 8 + tig * 2 + e] = acc[j][e];
      red[(warp * kTileM + g + 8) * kRedCols + j * 8 + tig * 2 + e] = acc[j][2 + e];
    }
  }
  if (tig == 0) {
    red[(warp * kTileM + g) * kRedCols + 32] = acc[4][0];
    red[(warp * kTileM + g + 8) * kRedCols + 32] = acc[4][2];
  }
  __syncthreads();
  for (int i = tid; i < kTileM * kRedCols; i += W * 32) {
    int v = 0;
#pragma unroll
    for (int w = 0; w < W; ++w) v += red[w * kTileM * kRedCols + i];
    red[i] = v;  // warp 0's slot: each i is read and written by one thread only
  }

  if (gridDim.z > 1) {
    const int tile = blockIdx.y * gridDim.x + blockIdx.x;
    int* ws = workspace + static_cast<size_t>(tile) * kTileM * kRedCols;
    for (int i = tid; i < rows * kRedCols; i += W * 32) atomicAdd(&ws[i], red[i]);
    __threadfence();
    __syncthreads();
    if (tid == 0) s_last = atomicAdd(&counters[tile], 1) == static_cast<int>(gridDim.z) - 1;
    __syncthreads();
    if (!s_last) return;
    __threadfence();
    for (int i = tid; i < rows * kRedCols; i += W * 32) red[i] = atomicExch(&ws[i], 0);
    if (tid == 0) counters[tile] = 0;
  }
  __syncthreads();

  // 5. Epilogue.
  const float ws_val = *wscale;
  for (int i = tid; i < rows * 32; i += W * 32) {
    const int m = i >> 5;
    const int o = i & 31;
    const int r = row_base + (o & 7);
    if (r >= P) continue;
    const int n = (o >> 3) * P + r;
    const int a = red[m * kRedCols + o] - red[m * kRedCols + 32];
    float v = __fdiv_rn(static_cast<float>(a), __fmul_rn(s_scale[m], ws_val));
    if (bias != nullptr) v = __fadd_rn(v, to_float(bias[n]));
    y[static_cast<size_t>(m0 + m) * N + n] = from_float<T>(v);
  }
}

int cdiv(long long a, long long b) { return static_cast<int>((a + b - 1) / b); }

Plan make_plan(const W2A8Args& args, int sm_count) {
  Plan p{};
  p.config = args.config >= 0 ? args.config : 0;
  p.warps = kConfigs[p.config].warps;
  p.unroll = kConfigs[p.config].unroll;
  const int group = p.warps * p.unroll;
  const int steps = cdiv(args.K, kStep);
  p.m_tiles = cdiv(args.M, kTileM);
  p.row_blocks = cdiv(args.N / 4, kRowsPerBlock);
  const int base_blocks = p.m_tiles * p.row_blocks;
  const int max_splits = cdiv(steps, group);
  int splits = args.splits;
  if (splits <= 0) splits = cdiv(2LL * sm_count, base_blocks);
  splits = std::max(1, std::min(splits, max_splits));
  p.steps_per_split = cdiv(cdiv(steps, splits), group) * group;
  p.splits = cdiv(steps, p.steps_per_split);
  const int rows_tile = std::min(args.M, kTileM);
  const int pad = rows_tile > 1 ? kStep : 0;  // staggers token rows across shared-memory banks
  const int max_chunk = std::max(group, (kXSmemBudget / rows_tile - pad) / kStep / group * group);
  p.chunk_steps = std::min(p.steps_per_split, max_chunk);
  p.xs_stride = p.chunk_steps * kStep + pad;
  const size_t xs_bytes = static_cast<size_t>(rows_tile) * p.xs_stride;
  const size_t red_bytes = static_cast<size_t>(p.warps) * kTileM * kRedCols * sizeof(int);
  p.smem_bytes = std::max(xs_bytes, red_bytes);
  return p;
}

template <typename T, typename TB, int W, int U, bool kAligned16>
cudaError_t launch_typed(const W2A8Args& a, const Plan& p, cudaStream_t stream) {
  auto kernel = w2a8_kernel<T, TB, W, U, kAligned16>;
  if (p.smem_bytes > 48 * 1024) {
    const cudaError_t e =
        cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(p.smem_bytes));
    if (e != cudaSuccess) return e;
  }
  const dim3 grid(p.row_blocks, p.m_tiles, p.splits);
  kernel<<<grid, W * 32, p.smem_bytes, stream>>>(
      static_cast<const T*>(a.x), a.packed, a.weight_scale, static_cast<const TB*>(a.bias), static_cast<T*>(a.y), a.M,
      a.K, a.N / 4, p.steps_per_split, p.chunk_steps, p.xs_stride, a.workspace, a.counters);
  return cudaGetLastError();
}

template <typename T, typename TB, int W, int U>
cudaError_t launch_aligned(const W2A8Args& a, const Plan& p, cudaStream_t stream) {
  const bool aligned = a.K % 16 == 0 && reinterpret_cast<uintptr_t>(a.packed) % 16 == 0;
  return aligned ? launch_typed<T, TB, W, U, true>(a, p, stream) : launch_typed<T, TB, W, U, false>(a, p, stream);
}

template <typename T, typename TB>
cudaError_t launch_config(const W2A8Args& a, const Plan& p, cudaStream_t stream) {
  switch (p.config) {
    case 0: return launch_aligned<T, TB, kConfigs[0].warps, kConfigs[0].unroll>(a, p, stream);
    case 1: return launch_aligned<T, TB, kConfigs[1].warps, kConfigs[1].unroll>(a, p, stream);
    case 2: return launch_aligned<T, TB, kConfigs[2].warps, kConfigs[2].unroll>(a, p, stream);
    default: return launch_aligned<T, TB, kConfigs[3].warps, kConfigs[3].unroll>(a, p, stream);
  }
}

template <typename T>
cudaError_t launch_bias(const W2A8Args& a, const Plan& p, cudaStream_t stream) {
  if (a.bias == nullptr || a.bias_dtype == DType::kFloat32) return launch_config<T, float>(a, p, stream);
  return launch_config<T, T>(a, p, stream);
}

}  // namespace

const char* w2a8_check(const W2A8Args& a) {
  if (a.M < 1 || a.N < 4 || a.K < 4) return "w2a8: M, K must be >= 1 and >= 4, N >= 4";
  if (a.N % 4 != 0) return "w2a8: out_features must be a multiple of 4 (packed layout [out/4, in])";
  if (a.K % 4 != 0) return "w2a8: in_features must be a multiple of 4; use the reference backend for this layer";
  if (a.K >= (1 << 23)) return "w2a8: in_features must be < 8388608 (int32 accumulation of 8-bit x 2-bit codes)";
  if (a.x == nullptr || a.packed == nullptr || a.weight_scale == nullptr || a.y == nullptr) return "w2a8: null pointer";
  if (a.bias != nullptr && a.bias_dtype != DType::kFloat32 && a.bias_dtype != a.dtype)
    return "w2a8: bias must be float32 or x's dtype";
  if (a.config >= kNumConfigs) return "w2a8: config out of range";
  return nullptr;
}

void w2a8_workspace_size(const W2A8Args& args, int sm_count, long long* workspace_ints, long long* counter_ints) {
  const Plan p = make_plan(args, sm_count);
  const long long tiles = p.splits > 1 ? static_cast<long long>(p.m_tiles) * p.row_blocks : 0;
  *workspace_ints = tiles * kTileM * kRedCols;
  *counter_ints = tiles;
}

cudaError_t w2a8_launch(const W2A8Args& a, int sm_count, cudaStream_t stream) {
  if (w2a8_check(a) != nullptr) return cudaErrorInvalidValue;
  const Plan p = make_plan(a, sm_count);
  if (p.splits > 1 && (a.workspace == nullptr || a.counters == nullptr)) return cudaErrorInvalidValue;
  switch (a.dtype) {
    case DType::kFloat32: return launch_bias<float>(a, p, stream);
    case DType::kBFloat16: return launch_bias<__nv_bfloat16>(a, p, stream);
    default: return launch_bias<__half>(a, p, stream);
  }
}

}  // namespace bitdistill
