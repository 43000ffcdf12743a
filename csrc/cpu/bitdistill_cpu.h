/* Shared declarations of bitdistill's native CPU library (bitdistill._cpu, loaded with ctypes by
 * bitdistill/cpu_ext.py): the packed ternary GEMV/GEMM and int8 head kernels (gemm.c) and the decoder stack
 * (decoder.c). The structs below are mirrored by ctypes classes in cpu_ext.py; bitdistill_layout() exports
 * their sizes and offsets so a test can check that both sides agree.
 *
 * Layouts:
 *   packed ternary weight: uint8 [P, K], P = N / 4; byte (r, k) holds codes c = T + 1 of rows r, P+r, 2P+r,
 *     3P+r of the ternary weight T [N, K] in bits 0-1, 2-3, 4-5, 6-7 (the Hugging Face bitnet layout).
 *   int8 head: int8 [V, Kp] row-major (Kp = K rounded up to BD_HEAD_BLOCK, zero padded), float scale [V].
 */
#ifndef BITDISTILL_CPU_H
#define BITDISTILL_CPU_H

#include <math.h>
#include <stdint.h>
#include <string.h>

/* Instruction-set levels of the kernels, picked at run time (bitdistill_set_isa lowers it for tests). */
enum { BD_ISA_SCALAR = 0, BD_ISA_AVX2 = 1, BD_ISA_AVX512_VNNI = 2 };

/* The int8 head quantizes its input in blocks of this many features, each with its own scale. */
#define BD_HEAD_BLOCK 64

/* One packed BitLinear: uint8 [P, K] codes, the per-tensor weight scale, float32 bias [4 P] or NULL, and
 * float32 row_scale [4 P] (one weight scale per output row, used instead of scale) or NULL. */
typedef struct {
    const uint8_t *packed;
    int64_t P;
    float scale;
    const float *bias;
    const float *row_scale;
} bd_linear;

typedef struct {
    const void *weight; /* [n] in the model dtype; NULL: no norm */
    float eps;
} bd_norm;

/* An output head with int8 weights: w int8 [V, Kp], one float scale per row. */
typedef struct {
    const int8_t *w;
    const float *scale;
    int64_t V, K, Kp;
} bd_head;

typedef struct {
    bd_norm input_norm, post_norm, q_norm, k_norm, attn_sub_norm, ffn_sub_norm;
    bd_linear qkv[3]; /* q, k, v; or one fused [q; k; v] projection */
    int32_t n_qkv;
    bd_linear o;
    bd_linear mlp_in[2]; /* gate, up; or one fused [gate; up] projection */
    int32_t n_mlp_in;
    bd_linear down;
    void *k_cache, *v_cache; /* [max_batch, n_kv, max_len, head_dim] in the model dtype */
} bd_layer;

typedef struct {
    int64_t n_layers, hidden, n_heads, n_kv, head_dim, intermediate, rot, max_len, max_batch, max_chunk;
    float scaling;
    int32_t bf16;
    int32_t act; /* 0: SiLU, 1: ReLU squared */
    const void *cos, *sin; /* [max_len, rot] in the model dtype */
    bd_norm final_norm;
    const bd_layer *layers;
    bd_head head; /* head.w NULL: no native head (the caller applies its own) */
} bd_model;

/* bfloat16 <-> float32 exactly as torch converts them (widening is exact; narrowing rounds to nearest
 * even, NaN -> 0x7FC0). */
static inline float bd_bf16_to_f32(uint16_t b) {
    uint32_t u = (uint32_t)b << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

static inline uint16_t bd_f32_to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    const uint16_t r = (uint16_t)((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
    return f != f ? (uint16_t)0x7FC0 : r; /* a select, not a branch: the loops around it vectorize */
}

/* Element i of a float32 (bf16 == 0) or bfloat16 array, as float32; store; round a float32 to the dtype. */
static inline float bd_load(const void *p, int64_t i, int bf16) {
    return bf16 ? bd_bf16_to_f32(((const uint16_t *)p)[i]) : ((const float *)p)[i];
}

static inline void bd_store(void *p, int64_t i, float v, int bf16) {
    if (bf16) ((uint16_t *)p)[i] = bd_f32_to_bf16(v);
    else ((float *)p)[i] = v;
}

static inline float bd_round(float v, int bf16) { return bf16 ? bd_bf16_to_f32(bd_f32_to_bf16(v)) : v; }

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
/* Compiled for the baseline and for AVX2 / AVX-512 machines, picked at load time: the loops of such a function
 * vectorize (the elementwise and attention code; the integer kernels pick theirs explicitly, gemm.c). */
#define BD_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define BD_CLONES
#endif

/* exp(x) in float32 within 2 ulps (Cephes' expf: Cody-Waite reduction, degree-6 polynomial), branch free so a loop
 * around it vectorizes; 0 below -87.3 (no denormals), +inf above 88.3 (where exp is within 1.6x of FLT_MAX).
 * glibc's expf is one call per element and takes a slow error path on every underflow, which softmax hits often. */
static inline float bd_exp(float x) {
    const float lo = -87.33654f, hi = 88.3f;
    const float xc = x < lo ? lo : (x > hi ? hi : x);
    const float n = (xc * 1.44269504088896341f + 12582912.0f) - 12582912.0f; /* round to nearest, |n| <= 127 */
    const float r = (xc - n * 0.693359375f) - n * -2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    const int32_t bits = ((int32_t)n + 127) << 23;
    float scale;
    memcpy(&scale, &bits, sizeof scale);
    const float y = p * scale;
    return x < lo ? 0.0f : (x > hi ? INFINITY : y);
}

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
/* Lane i of the result: the sum of the 16 lanes of a[i] (one transposed reduction for 16 sums: 45 instructions, where
 * one sum at a time takes 9 each). */
__attribute__((target("avx512f"))) static inline __m512 bd_hsum16_ps(const __m512 a[16]) {
    __m512 b[4];
    for (int g = 0; g < 4; g++) {
        const __m512 *v = a + 4 * g;
        const __m512 s01 = _mm512_add_ps(_mm512_unpacklo_ps(v[0], v[1]), _mm512_unpackhi_ps(v[0], v[1]));
        const __m512 s23 = _mm512_add_ps(_mm512_unpacklo_ps(v[2], v[3]), _mm512_unpackhi_ps(v[2], v[3]));
        b[g] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(s01), _mm512_castps_pd(s23))),
                             _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(s01), _mm512_castps_pd(s23))));
    }
    const __m512 d01 = _mm512_add_ps(_mm512_shuffle_f32x4(b[0], b[1], 0x44), _mm512_shuffle_f32x4(b[0], b[1], 0xEE));
    const __m512 d23 = _mm512_add_ps(_mm512_shuffle_f32x4(b[2], b[3], 0x44), _mm512_shuffle_f32x4(b[2], b[3], 0xEE));
    return _mm512_add_ps(_mm512_shuffle_f32x4(d01, d23, 0x88), _mm512_shuffle_f32x4(d01, d23, 0xDD));
}
#endif

/* gemm.c: shared by the decoder. */

/* Per-token int8 activation quantization of one float32 row, as torch evaluates it:
 * s = (1 / max(max|x|, 1e-5)) * 127, q = clamp(rint(x * s), -128, 127). Returns s; *sum gets sum(q). */
float bd_quantize_row(const float *row, int64_t K, int8_t *q, int32_t *sum);

/* Linears sharing the quantized input xq [M, K] (per-token scales xs [M], code sums sx [M]): output i
 * ([M, 4 P_i]) goes to outs[i] with row stride ldo[i], as y = acc / (xs * scale) + bias (scale: row_scale[col]
 * where given) in float32 rounded
 * to the dtype (bf16), stored as bfloat16 when store_bf16 else float32. A worksharing loop over all packed
 * rows: call it from every thread of a parallel region (or from one thread outside any). */
void bd_linears(const int8_t *xq, const float *xs, const int32_t *sx, int64_t M, int64_t K, const bd_linear *ls,
                int n, void *const *outs, const int64_t *ldo, int bf16, int store_bf16);

/* Quantize x [M, Kp] (float32, zero padded) for the int8 head: per BD_HEAD_BLOCK block of each row, scale
 * amax / 127 and codes; |codes| in qa, sign bits in qs. */
void bd_head_quantize(const float *x, int64_t M, int64_t Kp, uint8_t *qa, int8_t *qsgn, float *bs);

/* logits[m, v] = scale[v] * sum_b bs[m, b] * dot(codes of block b, w[v] block b) for M rows; worksharing loop
 * over v (call from every thread of a parallel region, or from one outside). */
void bd_head_logits(const bd_head *h, const uint8_t *qa, const int8_t *qsgn, const float *bs, int64_t M,
                    float *logits, int64_t ldl);

#endif
