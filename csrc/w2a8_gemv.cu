// W2A8 decode GEMV / small-M GEMM (see w2a8_gemv.h for the function computed).
//
// act_quant_kernel: one block per token computes s_x and the int8 codes X_q (round half to even) into
// a zero-padded [M, Kp] scratch, and zeroes the split-K workspace.
//
// w2a8_kernel: one block computes a 16-token x 32-output tile: 8 packed rows r (each byte holds the
// outputs r, P+r, 2P+r, 3P+r) for up to 16 tokens, over one K split.
//   1. every thread loads its first weights (16 bytes = 64 columns of one packed row per step) before
//      waiting on act_quant (programmatic dependent launch), then its x codes (16 bytes per token row);
//   2. warps take every W-th 64-column step; per step 2 x 4 mma.m16n8k32 s8 x u8 on the raw 2-bit
//      codes c in {0,1,2} (B = (word >> 2j) & 0x03030303 for output block j) plus one mma against
//      all-ones giving sum_k X_q, so that X_q . T = X_q . c - sum_k X_q exactly; the next U steps'
//      weights and codes are in flight while the current U are multiplied;
//   3. warps reduce through shared memory; with split K, blocks add their int32 tile into the
//      workspace and the last one to arrive (counter per tile) applies the epilogue;
//   4. epilogue y = float(acc) / (s_x * wscale) + bias in float32, rounded to the output dtype.
// The 64 columns a thread reads as one 16-byte vector are fed to the mma in a permuted k order that
// A (x codes, also one 16-byte vector per token row) follows too; the dot product is unchanged.
//
// w2a8_fused_kernel (opt-in, W2A8Args::fuse): the same GEMV for M <= 8 16-bit tokens without
// act_quant; each block computes its tokens' absmax and lanes quantize 16 activations per step.
#include "w2a8_gemv.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
#error "the bitdistill W2A8 kernel needs compute capability >= 8.0 (integer mma.m16n8k32); set TORCH_CUDA_ARCH_LIST"
#endif

namespace bitdistill {
namespace {

constexpr int kTileM = 16;          // tokens per block tile (mma M)
constexpr int kRowsPerBlock = 8;    // packed rows per block (mma N), 32 outputs
constexpr int kStep = 64;           // K columns per warp step (one 16-byte vector per thread)
constexpr int kRedCols = 33;        // 32 outputs + the row sum of X_q
constexpr int kQuantThreads = 512;

struct Config {
  int warps;
  int unroll;
};
constexpr Config kConfigs[kNumConfigs] = {{8, 4}, {4, 4}, {8, 2}, {16, 2}, {4, 8}};

struct Plan {
  int config, warps, unroll;
  int m_tiles, row_blocks, splits;
  int steps_per_split;
  long long workspace_ints;
  bool fused;  // single kernel (M <= 8, 16-bit activations, no K split)
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

__device__ __forceinline__ void grid_dependency_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;\n" ::: "memory");
#endif
}

__device__ __forceinline__ void allow_dependents() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;\n" ::: "memory");
#endif
}

// One block per token row: absmax, s_x, codes (zero-padded to kp columns); also zeroes `zero_ints`
// ints of `zero` (the GEMV's split-K workspace), grid-strided.
template <typename T>
__global__ void __launch_bounds__(kQuantThreads) act_quant_kernel(const T* __restrict__ x, int K, int kp,
                                                                  int8_t* __restrict__ codes,
                                                                  float* __restrict__ scale, int* __restrict__ zero,
                                                                  long long zero_ints) {
  allow_dependents();
  __shared__ float s_red[kQuantThreads / 32];
  const int tid = threadIdx.x;
  const int m = blockIdx.x;
  for (long long i = static_cast<long long>(m) * kQuantThreads + tid; i < zero_ints;
       i += static_cast<long long>(gridDim.x) * kQuantThreads) {
    zero[i] = 0;
  }
  const Vec4<T>* xr = reinterpret_cast<const Vec4<T>*>(x + static_cast<size_t>(m) * K);
  const int k4 = K / 4;
  float mx = 0.f;
  for (int i = tid; i < k4; i += kQuantThreads) {
    const Vec4<T> v = xr[i];
#pragma unroll
    for (int e = 0; e < 4; ++e) mx = fmaxf(mx, fabsf(to_float(v.v[e])));
  }
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, o));
  if ((tid & 31) == 0) s_red[tid >> 5] = mx;
  __syncthreads();
  mx = 0.f;
#pragma unroll
  for (int w = 0; w < kQuantThreads / 32; ++w) mx = fmaxf(mx, s_red[w]);
  // torch evaluates `127 / t` as `t.reciprocal() * 127`: two roundings, reproduced here.
  const float sc = __fmul_rn(__frcp_rn(fmaxf(mx, 1e-5f)), 127.f);
  if (tid == 0) scale[m] = sc;
  uint32_t* out = reinterpret_cast<uint32_t*>(codes + static_cast<size_t>(m) * kp);
  for (int i = tid; i < kp / 4; i += kQuantThreads) {
    uint32_t word = 0u;
    if (i < k4) {
      const Vec4<T> v = xr[i];
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int code = min(127, max(-128, __float2int_rn(__fmul_rn(to_float(v.v[e]), sc))));
        word |= static_cast<uint32_t>(code & 0xff) << (8 * e);
      }
    }
    out[i] = word;
  }
}

// One block: 16 tokens x 32 outputs (8 packed rows) over one K split; warps take every W-th 64-column
// step. Weights and x codes for the next U steps are loaded while the current U are multiplied.
template <typename T, int W, int U, bool kAligned16, bool kTwoGroups>
__global__ void __launch_bounds__(W * 32) w2a8_kernel(const int8_t* __restrict__ xq, const float* __restrict__ xs,
                                                      const uint8_t* __restrict__ packed,
                                                      const float* __restrict__ wscale, const void* __restrict__ bias,
                                                      int bias_is_float, T* __restrict__ y, int M, int K, int kp,
                                                      int P, int steps_per_split, int* __restrict__ workspace) {
  __shared__ int red[W * kTileM * kRedCols];
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
  const bool has_a = g < rows;
  const bool has_b = kTwoGroups && g + 8 < rows;  // kTwoGroups: M > 8, token rows 8..15 exist
  const int8_t* xa_row = xq + static_cast<size_t>(m0 + (has_a ? g : 0)) * kp + tig * 16;
  const int8_t* xb_row = xq + static_cast<size_t>(m0 + (has_b ? g + 8 : 0)) * kp + tig * 16;
  const int steps_total = kp / kStep;
  const int split_begin = blockIdx.z * steps_per_split;
  const int split_end = min(steps_total, split_begin + steps_per_split);
  const int iters = steps_per_split / W;  // per warp, a multiple of U

  // Weights do not depend on the quantization kernel: start loading them before waiting for it.
  uint4 wbuf[U], abuf[U], bbuf[kTwoGroups ? U : 1];
#pragma unroll
  for (int u = 0; u < U; ++u) {
    const int s = split_begin + warp + W * u;
    wbuf[u] = load_weights<kAligned16>(wrow, s * kStep + tig * 16, K, row_valid && s < split_end);
  }
  grid_dependency_wait();
  const uint4 zero4 = make_uint4(0u, 0u, 0u, 0u);
#pragma unroll
  for (int u = 0; u < U; ++u) {
    const int s = split_begin + warp + W * u;
    abuf[u] = has_a && s < split_end ? *reinterpret_cast<const uint4*>(xa_row + s * kStep) : zero4;
    if (kTwoGroups) bbuf[u] = has_b && s < split_end ? *reinterpret_cast<const uint4*>(xb_row + s * kStep) : zero4;
  }

  int acc[5][4];
#pragma unroll
  for (int j = 0; j < 5; ++j) {
#pragma unroll
    for (int e = 0; e < 4; ++e) acc[j][e] = 0;
  }

  for (int it = 0; it < iters; it += U) {
    uint4 wc[U], ac[U], bc[kTwoGroups ? U : 1];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      wc[u] = wbuf[u];
      ac[u] = abuf[u];
      if (kTwoGroups) bc[u] = bbuf[u];
    }
    if (it + U < iters) {
#pragma unroll
      for (int u = 0; u < U; ++u) {
        const int s = split_begin + warp + W * (it + U + u);
        const bool ok = s < split_end;
        wbuf[u] = load_weights<kAligned16>(wrow, s * kStep + tig * 16, K, row_valid && ok);
        abuf[u] = has_a && ok ? *reinterpret_cast<const uint4*>(xa_row + s * kStep) : zero4;
        if (kTwoGroups) bbuf[u] = has_b && ok ? *reinterpret_cast<const uint4*>(xb_row + s * kStep) : zero4;
      }
    }
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const uint32_t wv[4] = {wc[u].x, wc[u].y, wc[u].z, wc[u].w};
      const uint32_t av[4] = {ac[u].x, ac[u].y, ac[u].z, ac[u].w};
      const uint4 b4 = kTwoGroups ? bc[kTwoGroups ? u : 0] : zero4;
      const uint32_t bv[4] = {b4.x, b4.y, b4.z, b4.w};
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

  // Reduce the warps' partial tiles: red[warp][token][0..31 outputs, 32 = row sum of X_q].
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
    red[i] = v;  // warp 0's slot: each i is read and written by this thread only
  }

  if (gridDim.z > 1) {
    // Workspace: per tile min(M, 16) x 33 ints, then one arrival counter per tile.
    const int tile_ints = min(M, kTileM) * kRedCols;
    const int tiles = gridDim.x * gridDim.y;
    const int tile = blockIdx.y * gridDim.x + blockIdx.x;
    int* ws = workspace + static_cast<size_t>(tile) * tile_ints;
    int* counter = workspace + static_cast<size_t>(tiles) * tile_ints + tile;
    for (int i = tid; i < rows * kRedCols; i += W * 32) atomicAdd(&ws[i], red[i]);
    __threadfence();
    __syncthreads();
    if (tid == 0) s_last = atomicAdd(counter, 1) == static_cast<int>(gridDim.z) - 1;
    __syncthreads();
    if (!s_last) return;
    __threadfence();
    for (int i = tid; i < rows * kRedCols; i += W * 32) red[i] = atomicAdd(&ws[i], 0);
  }
  __syncthreads();

  // Epilogue, in the reference's float32 order.
  const float ws_val = *wscale;
  for (int i = tid; i < rows * 32; i += W * 32) {
    const int m = i >> 5;
    const int o = i & 31;
    const int r = row_base + (o & 7);
    if (r >= P) continue;
    const int n = (o >> 3) * P + r;
    const int a = red[m * kRedCols + o] - red[m * kRedCols + 32];
    float v = __fdiv_rn(static_cast<float>(a), __fmul_rn(xs[m0 + m], ws_val));
    if (bias != nullptr) {
      const float b = bias_is_float ? static_cast<const float*>(bias)[n] : to_float(static_cast<const T*>(bias)[n]);
      v = __fadd_rn(v, b);
    }
    y[static_cast<size_t>(m0 + m) * N + n] = from_float<T>(v);
  }
}

// Quantize 16 consecutive activations (4 x Vec4) with scale sc into 4 words of int8 codes.
template <typename T>
__device__ __forceinline__ uint4 quantize16(const Vec4<T> (&v)[4], float sc) {
  uint32_t w[4];
#pragma unroll
  for (int q = 0; q < 4; ++q) {
    w[q] = 0u;
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int code = min(127, max(-128, __float2int_rn(__fmul_rn(to_float(v[q].v[e]), sc))));
      w[q] |= static_cast<uint32_t>(code & 0xff) << (8 * e);
    }
  }
  return make_uint4(w[0], w[1], w[2], w[3]);
}

template <typename T>
__device__ __forceinline__ void load_x16(const T* row, int col, int K, bool valid, Vec4<T> (&v)[4]) {
#pragma unroll
  for (int q = 0; q < 4; ++q) {
    if (valid && col + 4 * q < K) {
      v[q] = *reinterpret_cast<const Vec4<T>*>(row + col + 4 * q);
    } else {
#pragma unroll
      for (int e = 0; e < 4; ++e) v[q].v[e] = from_float<T>(0.f);
    }
  }
}

// Single-kernel variant for M <= 8 (decode), no K split: each block computes the absmax of its
// tokens itself, and lanes quantize their own 16 activations per step right before the mma.
template <typename T, int W, int U, bool kAligned16>
__global__ void __launch_bounds__(W * 32) w2a8_fused_kernel(const T* __restrict__ x,
                                                            const uint8_t* __restrict__ packed,
                                                            const float* __restrict__ wscale,
                                                            const void* __restrict__ bias, int bias_is_float,
                                                            T* __restrict__ y, int M, int K, int P) {
  __shared__ int red[W * kTileM * kRedCols];
  __shared__ float s_scale[8];
  __shared__ unsigned int s_amax[8];

  const int tid = threadIdx.x;
  const int warp = tid >> 5;
  const int lane = tid & 31;
  const int g = lane >> 2;
  const int tig = lane & 3;
  const int N = 4 * P;
  const int rows = M;  // <= 8
  const int row_base = blockIdx.x * kRowsPerBlock;
  const int prow = row_base + g;
  const bool row_valid = prow < P;
  const uint8_t* wrow = packed + static_cast<size_t>(row_valid ? prow : 0) * K;
  const bool has_a = g < rows;
  const T* xrow = x + static_cast<size_t>(has_a ? g : 0) * K;
  const int steps = (K + kStep - 1) / kStep;
  const int iters = (steps + W * U - 1) / (W * U) * U;

  uint4 wbuf[U];
  Vec4<T> xbuf[U][4];
#pragma unroll
  for (int u = 0; u < U; ++u) {
    const int s = warp + W * u;
    wbuf[u] = load_weights<kAligned16>(wrow, s * kStep + tig * 16, K, row_valid && s < steps);
    load_x16(xrow, s * kStep + tig * 16, K, has_a && s < steps, xbuf[u]);
  }

  if (tid < 8) s_amax[tid] = 0u;
  __syncthreads();
  const int k4 = K / 4;
  for (int m = 0; m < rows; ++m) {
    const Vec4<T>* xr = reinterpret_cast<const Vec4<T>*>(x + static_cast<size_t>(m) * K);
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
  __syncthreads();
  const float sc = has_a ? s_scale[g] : 0.f;

  int acc[5][4];
#pragma unroll
  for (int j = 0; j < 5; ++j) {
#pragma unroll
    for (int e = 0; e < 4; ++e) acc[j][e] = 0;
  }
  const uint4 zero4 = make_uint4(0u, 0u, 0u, 0u);
  for (int it = 0; it < iters; it += U) {
    uint4 wc[U], ac[U];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      wc[u] = wbuf[u];
      ac[u] = has_a ? quantize16(xbuf[u], sc) : zero4;
    }
    if (it + U < iters) {
#pragma unroll
      for (int u = 0; u < U; ++u) {
        const int s = warp + W * (it + U + u);
        wbuf[u] = load_weights<kAligned16>(wrow, s * kStep + tig * 16, K, row_valid && s < steps);
        load_x16(xrow, s * kStep + tig * 16, K, has_a && s < steps, xbuf[u]);
      }
    }
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const uint32_t wv[4] = {wc[u].x, wc[u].y, wc[u].z, wc[u].w};
      const uint32_t av[4] = {ac[u].x, ac[u].y, ac[u].z, ac[u].w};
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const uint32_t a[4] = {av[2 * h], 0u, av[2 * h + 1], 0u};
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          mma_s8u8(acc[j], a, (wv[2 * h] >> (2 * j)) & 0x03030303u, (wv[2 * h + 1] >> (2 * j)) & 0x03030303u);
        }
        mma_s8u8(acc[4], a, 0x01010101u, 0x01010101u);
      }
    }
  }

#pragma unroll
  for (int j = 0; j < 4; ++j) {
#pragma unroll
    for (int e = 0; e < 2; ++e) red[(warp * kTileM + g) * kRedCols + j * 8 + tig * 2 + e] = acc[j][e];
  }
  if (tig == 0) red[(warp * kTileM + g) * kRedCols + 32] = acc[4][0];
  __syncthreads();
  for (int i = tid; i < rows * kRedCols; i += W * 32) {
    int v = 0;
#pragma unroll
    for (int w = 0; w < W; ++w) v += red[w * kTileM * kRedCols + i];
    red[i] = v;
  }
  __syncthreads();

  const float ws_val = *wscale;
  for (int i = tid; i < rows * 32; i += W * 32) {
    const int m = i >> 5;
    const int o = i & 31;
    const int r = row_base + (o & 7);
    if (r >= P) continue;
    const int n = (o >> 3) * P + r;
    const int a = red[m * kRedCols + o] - red[m * kRedCols + 32];
    float v = __fdiv_rn(static_cast<float>(a), __fmul_rn(s_scale[m], ws_val));
    if (bias != nullptr) {
      const float b = bias_is_float ? static_cast<const float*>(bias)[n] : to_float(static_cast<const T*>(bias)[n]);
      v = __fadd_rn(v, b);
    }
    y[static_cast<size_t>(m) * N + n] = from_float<T>(v);
  }
}

int cdiv(long long a, long long b) { return static_cast<int>((a + b - 1) / b); }

Plan make_plan(const W2A8Args& args, int sm_count) {
  Plan p{};
  p.m_tiles = cdiv(args.M, kTileM);
  p.row_blocks = cdiv(args.N / 4, kRowsPerBlock);
  const int base_blocks = p.m_tiles * p.row_blocks;
  // Measured on an H100 (benchmarks/results/cuda_gemv_tuning.md): many tiles -> small blocks;
  // few tiles and long K -> 16 warps splitting K; otherwise 8 warps.
  int config = args.config;
  if (config < 0) config = base_blocks >= 2 * sm_count ? 1 : (args.K >= 8192 ? 3 : 0);
  p.config = config;
  p.warps = kConfigs[p.config].warps;
  p.unroll = kConfigs[p.config].unroll;
  const int group = p.warps * p.unroll;
  const int steps = w2a8_padded_k(args.K) / kStep;
  // Split K only on request: measured slower than one split on every benchmarked shape.
  int splits = args.splits > 0 ? args.splits : 1;
  splits = std::max(1, std::min(splits, cdiv(steps, group)));
  p.steps_per_split = cdiv(cdiv(steps, splits), group) * group;
  p.splits = cdiv(steps, p.steps_per_split);
  const long long tiles = static_cast<long long>(base_blocks);
  p.workspace_ints = p.splits > 1 ? tiles * std::min(args.M, kTileM) * kRedCols + tiles : 0;
  p.fused = args.fuse && args.M <= 8 && p.splits == 1 && args.dtype != DType::kFloat32;
  return p;
}

template <typename T>
cudaError_t launch_quant(const W2A8Args& a, int* zero, long long zero_ints, cudaStream_t stream) {
  act_quant_kernel<T><<<a.M, kQuantThreads, 0, stream>>>(static_cast<const T*>(a.x), a.K, w2a8_padded_k(a.K),
                                                         a.x_codes, a.x_scale, zero, zero_ints);
  return cudaGetLastError();
}

template <typename T, int W, int U, bool kAligned16, bool kTwoGroups>
cudaError_t launch_gemv(const W2A8Args& a, const Plan& p, bool pdl, cudaStream_t stream) {
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = dim3(p.row_blocks, p.m_tiles, p.splits);
  cfg.blockDim = dim3(W * 32, 1, 1);
  cfg.dynamicSmemBytes = 0;
  cfg.stream = stream;
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attr[0].val.programmaticStreamSerializationAllowed = 1;
  cfg.attrs = attr;
  cfg.numAttrs = pdl ? 1 : 0;
  const int bias_is_float = a.bias_dtype == DType::kFloat32 ? 1 : 0;
  return cudaLaunchKernelEx(&cfg, w2a8_kernel<T, W, U, kAligned16, kTwoGroups>,
                            const_cast<const int8_t*>(a.x_codes), const_cast<const float*>(a.x_scale), a.packed,
                            a.weight_scale, a.bias, bias_is_float, static_cast<T*>(a.y), a.M, a.K,
                            w2a8_padded_k(a.K), a.N / 4, p.steps_per_split, a.workspace);
}

template <typename T, int W, int U>
cudaError_t launch_variant(const W2A8Args& a, const Plan& p, bool pdl, cudaStream_t stream) {
  const bool aligned = a.K % 16 == 0 && reinterpret_cast<uintptr_t>(a.packed) % 16 == 0;
  const bool two = a.M > 8;
  if (aligned) {
    return two ? launch_gemv<T, W, U, true, true>(a, p, pdl, stream) : launch_gemv<T, W, U, true, false>(a, p, pdl, stream);
  }
  return two ? launch_gemv<T, W, U, false, true>(a, p, pdl, stream) : launch_gemv<T, W, U, false, false>(a, p, pdl, stream);
}

template <typename T, int W, int U>
cudaError_t launch_fused(const W2A8Args& a, const Plan& p, cudaStream_t stream) {
  const bool aligned = a.K % 16 == 0 && reinterpret_cast<uintptr_t>(a.packed) % 16 == 0;
  const int bias_is_float = a.bias_dtype == DType::kFloat32 ? 1 : 0;
  const dim3 grid(p.row_blocks, 1, 1);
  if (aligned) {
    w2a8_fused_kernel<T, W, U, true><<<grid, W * 32, 0, stream>>>(static_cast<const T*>(a.x), a.packed, a.weight_scale,
                                                                  a.bias, bias_is_float, static_cast<T*>(a.y), a.M,
                                                                  a.K, a.N / 4);
  } else {
    w2a8_fused_kernel<T, W, U, false><<<grid, W * 32, 0, stream>>>(static_cast<const T*>(a.x), a.packed,
                                                                   a.weight_scale, a.bias, bias_is_float,
                                                                   static_cast<T*>(a.y), a.M, a.K, a.N / 4);
  }
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_all(const W2A8Args& a, const Plan& p, bool pdl, cudaStream_t stream) {
  if (p.fused) {
    switch (p.config) {
      case 0: return launch_fused<T, kConfigs[0].warps, kConfigs[0].unroll>(a, p, stream);
      case 1: return launch_fused<T, kConfigs[1].warps, kConfigs[1].unroll>(a, p, stream);
      case 2: return launch_fused<T, kConfigs[2].warps, kConfigs[2].unroll>(a, p, stream);
      case 3: return launch_fused<T, kConfigs[3].warps, kConfigs[3].unroll>(a, p, stream);
      default: return launch_fused<T, kConfigs[4].warps, kConfigs[4].unroll>(a, p, stream);
    }
  }
  const cudaError_t e = launch_quant<T>(a, a.workspace, p.workspace_ints, stream);
  if (e != cudaSuccess) return e;
  switch (p.config) {
    case 0: return launch_variant<T, kConfigs[0].warps, kConfigs[0].unroll>(a, p, pdl, stream);
    case 1: return launch_variant<T, kConfigs[1].warps, kConfigs[1].unroll>(a, p, pdl, stream);
    case 2: return launch_variant<T, kConfigs[2].warps, kConfigs[2].unroll>(a, p, pdl, stream);
    case 3: return launch_variant<T, kConfigs[3].warps, kConfigs[3].unroll>(a, p, pdl, stream);
    default: return launch_variant<T, kConfigs[4].warps, kConfigs[4].unroll>(a, p, pdl, stream);
  }
}

}  // namespace

const char* w2a8_check(const W2A8Args& a) {
  if (a.M < 1 || a.N < 4 || a.K < 4) return "w2a8: need M >= 1, N >= 4 and K >= 4";
  if (a.N % 4 != 0) return "w2a8: out_features must be a multiple of 4 (packed layout [out/4, in])";
  if (a.K % 4 != 0) return "w2a8: in_features must be a multiple of 4; use the reference backend for this layer";
  if (a.K >= (1 << 23)) return "w2a8: in_features must be < 8388608 (int32 accumulation of 8-bit x 2-bit codes)";
  if (cdiv(a.M, kTileM) > 65535) return "w2a8: too many tokens for one launch (M must be <= 1048560)";
  if (a.x == nullptr || a.packed == nullptr || a.weight_scale == nullptr || a.y == nullptr) return "w2a8: null pointer";
  if (a.bias != nullptr && a.bias_dtype != DType::kFloat32 && a.bias_dtype != a.dtype)
    return "w2a8: bias must be float32 or x's dtype";
  if (a.config >= kNumConfigs) return "w2a8: config out of range";
  return nullptr;
}

W2A8Scratch w2a8_scratch_sizes(const W2A8Args& args, int sm_count) {
  const Plan p = make_plan(args, sm_count);
  if (p.fused) return {0, 0, 0};
  return {static_cast<long long>(args.M) * w2a8_padded_k(args.K), args.M, p.workspace_ints};
}

cudaError_t act_quant_launch(const void* x, DType dtype, int M, int K, int8_t* codes, float* scale,
                             cudaStream_t stream) {
  if (M < 1 || K < 4 || K % 4 != 0 || x == nullptr || codes == nullptr || scale == nullptr) return cudaErrorInvalidValue;
  W2A8Args a;
  a.x = x;
  a.M = M;
  a.K = K;
  a.x_codes = codes;
  a.x_scale = scale;
  switch (dtype) {
    case DType::kFloat32: return launch_quant<float>(a, nullptr, 0, stream);
    case DType::kBFloat16: return launch_quant<__nv_bfloat16>(a, nullptr, 0, stream);
    default: return launch_quant<__half>(a, nullptr, 0, stream);
  }
}

cudaError_t w2a8_launch(const W2A8Args& a, int sm_count, bool pdl, cudaStream_t stream) {
  if (w2a8_check(a) != nullptr) return cudaErrorInvalidValue;
  const Plan p = make_plan(a, sm_count);
  if (!p.fused && (a.x_codes == nullptr || a.x_scale == nullptr)) return cudaErrorInvalidValue;
  if (p.workspace_ints > 0 && a.workspace == nullptr) return cudaErrorInvalidValue;
  switch (a.dtype) {
    case DType::kFloat32: return launch_all<float>(a, p, pdl, stream);
    case DType::kBFloat16: return launch_all<__nv_bfloat16>(a, p, pdl, stream);
    default: return launch_all<__half>(a, p, pdl, stream);
  }
}

}  // namespace bitdistill
