/* Packed ternary GEMV/GEMM and the int8 head, with kernels picked at run time for the CPU's instructions.
 *
 * Ternary: out[m, n] = sum_k x[m, k] * T[n, k] = sum_k x*c - sum_k x for the codes c = T + 1 in {0, 1, 2}; the
 * kernels compute the exact int32 sum_k x*c of four weight rows (one packed row) at a time:
 *   scalar        the reference every kernel is tested against, bit for bit;
 *   AVX2          vpmaddubsw (c unsigned times x signed: pair sums |.| <= 512, no int16 saturation);
 *   AVX-512 VNNI  vpdpbusd (four products summed straight into int32 lanes).
 * Unpacking the 2-bit codes costs a shift and a mask per code vector; it is cheaper here than a lookup table
 * (TL1/TL2, T-MAC), which pays off where multiply-accumulate is slow, not where VNNI is present.
 *
 * Int8 head: logits = scale[v] * sum_b s_b * dot_b, the activation quantized per 64-feature block (scale s_b).
 * AVX2 multiplies |q| by sign-applied weights as unsigned x signed bytes (no saturation: 128 * 127 * 2 fits
 * int16 for its pair sums); VNNI multiplies w + 128 by q (four products summed into int32) and takes 128 sum q
 * back per token. Each block's integer dot is exact; the float sum over blocks runs in another order per kernel.
 *
 * Nothing here allocates memory: callers pass scratch.
 */
#include "bitdistill_cpu.h"

#include <stdlib.h>
#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define BD_X86 1
#endif
#ifdef _OPENMP
#include <omp.h>
#endif

typedef void (*row4_fn)(const int8_t *x, const uint8_t *p, int64_t K, int32_t acc[4]);
/* The same for nt <= BD_TOKENS tokens x[t * ldx ..] at once (the codes unpacked once for all): acc[t * 4 + j]. */
typedef void (*rows4_fn)(const int8_t *x, int64_t ldx, int nt, const uint8_t *p, int64_t K, int32_t *acc);
#define BD_TOKENS 4
typedef float (*head_row_fn)(const int8_t *w, const uint8_t *qa, const int8_t *qs, const float *bs, int64_t Kp);
/* One head row against nt <= BD_HEAD_TOKENS tokens (codes qs/qa with row stride Kp, block scales bs with stride
 * Kp / BD_HEAD_BLOCK, corr: see bd_head_logits): out[t]. */
typedef void (*head_rows_fn)(const int8_t *w, const uint8_t *qa, const int8_t *qs, const float *bs, const float *corr,
                             int nt, int64_t Kp, float *out);
#define BD_HEAD_TOKENS 4

static void row4_scalar(const int8_t *x, const uint8_t *p, int64_t K, int32_t acc[4]) {
    int32_t a0 = 0, a1 = 0, a2 = 0, a3 = 0;
    for (int64_t k = 0; k < K; k++) {
        int32_t xk = x[k];
        uint8_t b = p[k];
        a0 += xk * (b & 3);
        a1 += xk * ((b >> 2) & 3);
        a2 += xk * ((b >> 4) & 3);
        a3 += xk * ((b >> 6) & 3);
    }
    acc[0] = a0; acc[1] = a1; acc[2] = a2; acc[3] = a3;
}

static void rows4_scalar(const int8_t *x, int64_t ldx, int nt, const uint8_t *p, int64_t K, int32_t *acc) {
    for (int t = 0; t < nt; t++) row4_scalar(x + t * ldx, p, K, acc + 4 * t);
}

static float head_row_scalar(const int8_t *w, const uint8_t *qa, const int8_t *qs, const float *bs, int64_t Kp) {
    float acc = 0.0f;
    (void)qa;
    for (int64_t b = 0; b < Kp / BD_HEAD_BLOCK; b++) {
        int32_t d = 0;
        for (int64_t k = b * BD_HEAD_BLOCK; k < (b + 1) * BD_HEAD_BLOCK; k++) d += (int32_t)w[k] * qs[k];
        acc += bs[b] * (float)d;
    }
    return acc;
}

static void head_rows_scalar(const int8_t *w, const uint8_t *qa, const int8_t *qs, const float *bs, const float *corr,
                             int nt, int64_t Kp, float *out) {
    (void)corr;
    for (int t = 0; t < nt; t++)
        out[t] = head_row_scalar(w, qa + t * Kp, qs + t * Kp, bs + t * (Kp / BD_HEAD_BLOCK), Kp);
}

#ifdef BD_X86
__attribute__((target("avx2"))) static inline int32_t hsum256(__m256i v) {
    __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4E));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xB1));
    return _mm_cvtsi128_si32(s);
}

__attribute__((target("avx2,fma"))) static void row4_avx2(const int8_t *x, const uint8_t *p, int64_t K,
                                                           int32_t acc[4]) {
    const __m256i mask = _mm256_set1_epi8(3), ones = _mm256_set1_epi16(1);
    __m256i s0 = _mm256_setzero_si256(), s1 = s0, s2 = s0, s3 = s0;
    int64_t k = 0;
    for (; k + 32 <= K; k += 32) {
        __m256i pv = _mm256_loadu_si256((const __m256i *)(p + k));
        __m256i xv = _mm256_loadu_si256((const __m256i *)(x + k));
        s0 = _mm256_add_epi32(s0, _mm256_madd_epi16(_mm256_maddubs_epi16(_mm256_and_si256(pv, mask), xv), ones));
        s1 = _mm256_add_epi32(s1, _mm256_madd_epi16(
            _mm256_maddubs_epi16(_mm256_and_si256(_mm256_srli_epi16(pv, 2), mask), xv), ones));
        s2 = _mm256_add_epi32(s2, _mm256_madd_epi16(
            _mm256_maddubs_epi16(_mm256_and_si256(_mm256_srli_epi16(pv, 4), mask), xv), ones));
        s3 = _mm256_add_epi32(s3, _mm256_madd_epi16(
            _mm256_maddubs_epi16(_mm256_and_si256(_mm256_srli_epi16(pv, 6), mask), xv), ones));
    }
    int32_t tail[4];
    row4_scalar(x + k, p + k, K - k, tail);
    acc[0] = hsum256(s0) + tail[0]; acc[1] = hsum256(s1) + tail[1];
    acc[2] = hsum256(s2) + tail[2]; acc[3] = hsum256(s3) + tail[3];
}

/* Two tokens per pass (16 ymm registers: 8 accumulators, 4 code vectors). */
__attribute__((target("avx2,fma"))) static void rows4_avx2(const int8_t *x, int64_t ldx, int nt, const uint8_t *p,
                                                            int64_t K, int32_t *acc) {
    const __m256i mask = _mm256_set1_epi8(3), ones = _mm256_set1_epi16(1);
    int t = 0;
    for (; t + 2 <= nt; t += 2) {
        const int8_t *xa = x + t * ldx, *xb = xa + ldx;
        __m256i a0 = _mm256_setzero_si256(), a1 = a0, a2 = a0, a3 = a0, b0 = a0, b1 = a0, b2 = a0, b3 = a0;
        int64_t k = 0;
        for (; k + 32 <= K; k += 32) {
            __m256i pv = _mm256_loadu_si256((const __m256i *)(p + k));
            __m256i c0 = _mm256_and_si256(pv, mask), c1 = _mm256_and_si256(_mm256_srli_epi16(pv, 2), mask);
            __m256i c2 = _mm256_and_si256(_mm256_srli_epi16(pv, 4), mask), c3 = _mm256_and_si256(_mm256_srli_epi16(pv, 6), mask);
            __m256i xv = _mm256_loadu_si256((const __m256i *)(xa + k));
            a0 = _mm256_add_epi32(a0, _mm256_madd_epi16(_mm256_maddubs_epi16(c0, xv), ones));
            a1 = _mm256_add_epi32(a1, _mm256_madd_epi16(_mm256_maddubs_epi16(c1, xv), ones));
            a2 = _mm256_add_epi32(a2, _mm256_madd_epi16(_mm256_maddubs_epi16(c2, xv), ones));
            a3 = _mm256_add_epi32(a3, _mm256_madd_epi16(_mm256_maddubs_epi16(c3, xv), ones));
            xv = _mm256_loadu_si256((const __m256i *)(xb + k));
            b0 = _mm256_add_epi32(b0, _mm256_madd_epi16(_mm256_maddubs_epi16(c0, xv), ones));
            b1 = _mm256_add_epi32(b1, _mm256_madd_epi16(_mm256_maddubs_epi16(c1, xv), ones));
            b2 = _mm256_add_epi32(b2, _mm256_madd_epi16(_mm256_maddubs_epi16(c2, xv), ones));
            b3 = _mm256_add_epi32(b3, _mm256_madd_epi16(_mm256_maddubs_epi16(c3, xv), ones));
        }
        int32_t ta[4], tb[4];
        row4_scalar(xa + k, p + k, K - k, ta);
        row4_scalar(xb + k, p + k, K - k, tb);
        int32_t *o = acc + 4 * t;
        o[0] = hsum256(a0) + ta[0]; o[1] = hsum256(a1) + ta[1]; o[2] = hsum256(a2) + ta[2]; o[3] = hsum256(a3) + ta[3];
        o[4] = hsum256(b0) + tb[0]; o[5] = hsum256(b1) + tb[1]; o[6] = hsum256(b2) + tb[2]; o[7] = hsum256(b3) + tb[3];
    }
    for (; t < nt; t++) row4_avx2(x + t * ldx, p, K, acc + 4 * t);
}

__attribute__((target("avx2,fma"))) static float head_row_avx2(const int8_t *w, const uint8_t *qa, const int8_t *qs,
                                                                const float *bs, int64_t Kp) {
    const __m256i ones = _mm256_set1_epi16(1);
    __m256 acc = _mm256_setzero_ps();
    for (int64_t b = 0; b < Kp / BD_HEAD_BLOCK; b++) {
        const int64_t k = b * BD_HEAD_BLOCK;
        __m256i w0 = _mm256_loadu_si256((const __m256i *)(w + k)), w1 = _mm256_loadu_si256((const __m256i *)(w + k + 32));
        __m256i a0 = _mm256_loadu_si256((const __m256i *)(qa + k)), a1 = _mm256_loadu_si256((const __m256i *)(qa + k + 32));
        __m256i q0 = _mm256_loadu_si256((const __m256i *)(qs + k)), q1 = _mm256_loadu_si256((const __m256i *)(qs + k + 32));
        __m256i d = _mm256_add_epi32(_mm256_madd_epi16(_mm256_maddubs_epi16(a0, _mm256_sign_epi8(w0, q0)), ones),
                                     _mm256_madd_epi16(_mm256_maddubs_epi16(a1, _mm256_sign_epi8(w1, q1)), ones));
        acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(d), _mm256_set1_ps(bs[b]), acc);
    }
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps(acc, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

static void head_rows_avx2(const int8_t *w, const uint8_t *qa, const int8_t *qs, const float *bs, const float *corr,
                           int nt, int64_t Kp, float *out) {
    (void)corr;
    for (int t = 0; t < nt; t++)
        out[t] = head_row_avx2(w, qa + t * Kp, qs + t * Kp, bs + t * (Kp / BD_HEAD_BLOCK), Kp);
}

#define BD_VNNI "avx512f,avx512bw,avx512vl,avx512vnni"

__attribute__((target(BD_VNNI))) static void row4_vnni(const int8_t *x, const uint8_t *p, int64_t K, int32_t acc[4]) {
    const __m512i mask = _mm512_set1_epi8(3);
    /* Two sets of accumulators: eight independent vpdpbusd chains hide its latency. */
    __m512i s0 = _mm512_setzero_si512(), s1 = s0, s2 = s0, s3 = s0, t0 = s0, t1 = s0, t2 = s0, t3 = s0;
    int64_t k = 0;
    for (; k + 128 <= K; k += 128) {
        __m512i pv = _mm512_loadu_si512((const void *)(p + k)), qv = _mm512_loadu_si512((const void *)(p + k + 64));
        __m512i xv = _mm512_loadu_si512((const void *)(x + k)), yv = _mm512_loadu_si512((const void *)(x + k + 64));
        s0 = _mm512_dpbusd_epi32(s0, _mm512_and_si512(pv, mask), xv);
        t0 = _mm512_dpbusd_epi32(t0, _mm512_and_si512(qv, mask), yv);
        s1 = _mm512_dpbusd_epi32(s1, _mm512_and_si512(_mm512_srli_epi16(pv, 2), mask), xv);
        t1 = _mm512_dpbusd_epi32(t1, _mm512_and_si512(_mm512_srli_epi16(qv, 2), mask), yv);
        s2 = _mm512_dpbusd_epi32(s2, _mm512_and_si512(_mm512_srli_epi16(pv, 4), mask), xv);
        t2 = _mm512_dpbusd_epi32(t2, _mm512_and_si512(_mm512_srli_epi16(qv, 4), mask), yv);
        s3 = _mm512_dpbusd_epi32(s3, _mm512_and_si512(_mm512_srli_epi16(pv, 6), mask), xv);
        t3 = _mm512_dpbusd_epi32(t3, _mm512_and_si512(_mm512_srli_epi16(qv, 6), mask), yv);
    }
    for (; k + 64 <= K; k += 64) {
        __m512i pv = _mm512_loadu_si512((const void *)(p + k));
        __m512i xv = _mm512_loadu_si512((const void *)(x + k));
        s0 = _mm512_dpbusd_epi32(s0, _mm512_and_si512(pv, mask), xv);
        s1 = _mm512_dpbusd_epi32(s1, _mm512_and_si512(_mm512_srli_epi16(pv, 2), mask), xv);
        s2 = _mm512_dpbusd_epi32(s2, _mm512_and_si512(_mm512_srli_epi16(pv, 4), mask), xv);
        s3 = _mm512_dpbusd_epi32(s3, _mm512_and_si512(_mm512_srli_epi16(pv, 6), mask), xv);
    }
    int32_t tail[4];
    row4_scalar(x + k, p + k, K - k, tail);
    acc[0] = _mm512_reduce_add_epi32(_mm512_add_epi32(s0, t0)) + tail[0];
    acc[1] = _mm512_reduce_add_epi32(_mm512_add_epi32(s1, t1)) + tail[1];
    acc[2] = _mm512_reduce_add_epi32(_mm512_add_epi32(s2, t2)) + tail[2];
    acc[3] = _mm512_reduce_add_epi32(_mm512_add_epi32(s3, t3)) + tail[3];
}

/* Up to four tokens per pass (16 accumulators, 4 code vectors of 32 zmm registers). */
__attribute__((target(BD_VNNI))) static void rows4_vnni(const int8_t *x, int64_t ldx, int nt, const uint8_t *p,
                                                         int64_t K, int32_t *acc) {
    const __m512i mask = _mm512_set1_epi8(3);
    __m512i s[BD_TOKENS][4];
    for (int t = 0; t < BD_TOKENS; t++)
        for (int j = 0; j < 4; j++) s[t][j] = _mm512_setzero_si512();
    int64_t k = 0;
    for (; k + 64 <= K; k += 64) {
        __m512i pv = _mm512_loadu_si512((const void *)(p + k));
        __m512i c0 = _mm512_and_si512(pv, mask), c1 = _mm512_and_si512(_mm512_srli_epi16(pv, 2), mask);
        __m512i c2 = _mm512_and_si512(_mm512_srli_epi16(pv, 4), mask), c3 = _mm512_and_si512(_mm512_srli_epi16(pv, 6), mask);
        for (int t = 0; t < BD_TOKENS; t++) {  /* unrolled by the compiler; tokens past nt are skipped */
            if (t >= nt) break;
            __m512i xv = _mm512_loadu_si512((const void *)(x + t * ldx + k));
            s[t][0] = _mm512_dpbusd_epi32(s[t][0], c0, xv);
            s[t][1] = _mm512_dpbusd_epi32(s[t][1], c1, xv);
            s[t][2] = _mm512_dpbusd_epi32(s[t][2], c2, xv);
            s[t][3] = _mm512_dpbusd_epi32(s[t][3], c3, xv);
        }
    }
    for (int t = 0; t < nt; t++) {
        int32_t tail[4];
        row4_scalar(x + t * ldx + k, p + k, K - k, tail);
        for (int j = 0; j < 4; j++) acc[4 * t + j] = _mm512_reduce_add_epi32(s[t][j]) + tail[j];
    }
}

/* Weights read once per block for up to four tokens, as unsigned w + 128 (vpdpbusd multiplies unsigned by signed
 * bytes): sum (w + 128) q = sum w q + 128 sum q, the second term taken back per token once (corr). */
__attribute__((target(BD_VNNI))) static void head_rows_vnni(const int8_t *w, const uint8_t *qa, const int8_t *qs,
                                                             const float *bs, const float *corr, int nt, int64_t Kp,
                                                             float *out) {
    const __m512i zero = _mm512_setzero_si512(), flip = _mm512_set1_epi8((char)0x80);
    const int64_t nb = Kp / BD_HEAD_BLOCK;
    __m512 acc[BD_HEAD_TOKENS];
    (void)qa;
    for (int t = 0; t < BD_HEAD_TOKENS; t++) acc[t] = _mm512_setzero_ps();
    for (int64_t b = 0; b < nb; b++) {
        const int64_t k = b * BD_HEAD_BLOCK;
        const __m512i wu = _mm512_xor_si512(_mm512_loadu_si512((const void *)(w + k)), flip);
        for (int t = 0; t < BD_HEAD_TOKENS; t++) {
            if (t >= nt) break;
            __m512i d = _mm512_dpbusd_epi32(zero, wu, _mm512_loadu_si512((const void *)(qs + t * Kp + k)));
            acc[t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d), _mm512_set1_ps(bs[t * nb + b]), acc[t]);
        }
    }
    for (int t = 0; t < nt; t++) out[t] = _mm512_reduce_add_ps(acc[t]) - corr[t];
}
#endif

static int detected_isa(void) {
#ifdef BD_X86
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
        __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vnni"))
        return BD_ISA_AVX512_VNNI;
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return BD_ISA_AVX2;
#endif
    return BD_ISA_SCALAR;
}

static int isa = -1;
static row4_fn row4 = row4_scalar;
static rows4_fn rows4 = rows4_scalar;
static head_rows_fn head_rows = head_rows_scalar;

/* Use the kernels of `level`, capped at what this CPU has (a negative level: the best it has). Returns the
 * level in use. Not thread safe: call it before decoding, not during. */
int bitdistill_set_isa(int level) {
    const int best = detected_isa();
    isa = level < 0 || level > best ? best : level;
    row4 = row4_scalar;
    rows4 = rows4_scalar;
    head_rows = head_rows_scalar;
#ifdef BD_X86
    if (isa == BD_ISA_AVX2) { row4 = row4_avx2; rows4 = rows4_avx2; head_rows = head_rows_avx2; }
    if (isa == BD_ISA_AVX512_VNNI) { row4 = row4_vnni; rows4 = rows4_vnni; head_rows = head_rows_vnni; }
#endif
    return isa;
}

int bitdistill_isa(void) {
    if (isa < 0) bitdistill_set_isa(-1);
    return isa;
}

__attribute__((constructor)) static void init_isa(void) { bitdistill_set_isa(-1); }

BD_CLONES float bd_quantize_row(const float *row, int64_t K, int8_t *q, int32_t *sum) {
    float amax = 0.0f;
    for (int64_t k = 0; k < K; k++) { float a = fabsf(row[k]); amax = a > amax ? a : amax; }
    float s = (1.0f / (amax > 1e-5f ? amax : 1e-5f)) * 127.0f;
    int32_t total = 0;
    for (int64_t k = 0; k < K; k++) {
        float v = nearbyintf(row[k] * s);
        v = v < -128.0f ? -128.0f : (v > 127.0f ? 127.0f : v);
        q[k] = (int8_t)(int32_t)v;
        total += (int32_t)v;
    }
    *sum = total;
    return s;
}

void bd_linears(const int8_t *xq, const float *xs, const int32_t *sx, int64_t M, int64_t K, const bd_linear *ls,
                int n, void *const *outs, const int64_t *ldo, int bf16, int store_bf16) {
    int64_t total = 0;
    for (int i = 0; i < n; i++) total += ls[i].P;
    /* Each packed row (4 weight rows, K bytes) is read from memory once and reused from L1 for every token. */
#pragma omp for schedule(static)
    for (int64_t g = 0; g < total; g++) {
        int i = 0;
        int64_t r = g;
        while (r >= ls[i].P) r -= ls[i++].P;
        const bd_linear *l = &ls[i];
        const uint8_t *pr = l->packed + r * K;
        for (int64_t m0 = 0; m0 < M; m0 += BD_TOKENS) {
            const int nt = M - m0 < BD_TOKENS ? (int)(M - m0) : BD_TOKENS;
            int32_t acc[4 * BD_TOKENS];
            if (nt == 1) row4(xq + m0 * K, pr, K, acc);
            else rows4(xq + m0 * K, K, nt, pr, K, acc);
            for (int t = 0; t < nt; t++) {
                const int64_t m = m0 + t;
                const float denom = xs[m] * l->scale;
                for (int j = 0; j < 4; j++) {
                    const int64_t col = j * l->P + r;
                    float y = (float)(acc[4 * t + j] - sx[m]) / denom;
                    if (l->bias) y = y + l->bias[col];
                    y = bd_round(y, bf16);
                    if (store_bf16) ((uint16_t *)outs[i])[m * ldo[i] + col] = bd_f32_to_bf16(y);
                    else ((float *)outs[i])[m * ldo[i] + col] = y;
                }
            }
        }
    }
}

void bd_head_quantize(const float *x, int64_t M, int64_t Kp, uint8_t *qa, int8_t *qs, float *bs) {
    const int64_t nb = Kp / BD_HEAD_BLOCK;
    for (int64_t m = 0; m < M; m++) {
        for (int64_t b = 0; b < nb; b++) {
            const float *row = x + m * Kp + b * BD_HEAD_BLOCK;
            float amax = 0.0f;
            for (int k = 0; k < BD_HEAD_BLOCK; k++) { float a = fabsf(row[k]); if (a > amax) amax = a; }
            const float inv = amax > 0.0f ? 127.0f / amax : 0.0f;
            bs[m * nb + b] = amax / 127.0f;
            for (int k = 0; k < BD_HEAD_BLOCK; k++) {
                const int64_t i = m * Kp + b * BD_HEAD_BLOCK + k;
                int v = (int)nearbyintf(row[k] * inv);
                v = v > 127 ? 127 : (v < -127 ? -127 : v);
                qs[i] = (int8_t)v;
                qa[i] = (uint8_t)(v < 0 ? -v : v);
            }
        }
    }
}

void bd_head_logits(const bd_head *h, const uint8_t *qa, const int8_t *qs, const float *bs, int64_t M,
                    float *logits, int64_t ldl) {
    const int64_t nb = h->Kp / BD_HEAD_BLOCK, Kp = h->Kp;
    float corr[M]; /* 128 * sum_b s_b * sum(codes of block b) per token, for kernels that offset the weights */
    for (int64_t m = 0; m < M; m++) {
        float c = 0.0f;
        for (int64_t b = 0; b < nb; b++) {
            int32_t q = 0;
            for (int64_t k = b * BD_HEAD_BLOCK; k < (b + 1) * BD_HEAD_BLOCK; k++) q += qs[m * Kp + k];
            c += bs[m * nb + b] * (float)q;
        }
        corr[m] = 128.0f * c;
    }
#pragma omp for schedule(static)
    for (int64_t v = 0; v < h->V; v++) {
        const int8_t *w = h->w + v * Kp;
        for (int64_t m0 = 0; m0 < M; m0 += BD_HEAD_TOKENS) {
            const int nt = M - m0 < BD_HEAD_TOKENS ? (int)(M - m0) : BD_HEAD_TOKENS;
            float out[BD_HEAD_TOKENS];
            head_rows(w, qa + m0 * Kp, qs + m0 * Kp, bs + m0 * nb, corr + m0, nt, Kp, out);
            for (int t = 0; t < nt; t++) logits[(m0 + t) * ldl + v] = h->scale[v] * out[t];
        }
    }
}

/* ---- exported entry points (bitdistill.cpu_ext) ---- */

/* Below this many packed bytes times tokens a call runs on one thread: a GEMV of a small layer is faster alone
 * than with the fork/join of a parallel region (and far faster when cores are shared). */
#define PARALLEL_MIN_WORK (1 << 16)

/* Exact int32 out [M, 4 P] = x [M, K] (int8 codes) @ T^T for the packed T (uint8 [P, K]); M <= 4096 (the code
 * sums live on the stack). */
int bitdistill_packed_int_mm(const int8_t *x, int64_t M, int64_t K, const uint8_t *packed, int64_t P, int32_t *out,
                             int nthreads) {
    const int64_t N = 4 * P;
    int32_t sums[M > 0 ? M : 1];
    for (int64_t m = 0; m < M; m++) {
        int32_t total = 0;
        for (int64_t k = 0; k < K; k++) total += x[m * K + k];
        sums[m] = total;
    }
    if (P * K * M < PARALLEL_MIN_WORK) nthreads = 1;
#pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int64_t r = 0; r < P; r++) {
        for (int64_t m0 = 0; m0 < M; m0 += BD_TOKENS) {
            const int nt = M - m0 < BD_TOKENS ? (int)(M - m0) : BD_TOKENS;
            int32_t acc[4 * BD_TOKENS];
            if (nt == 1) row4(x + m0 * K, packed + r * K, K, acc);
            else rows4(x + m0 * K, K, nt, packed + r * K, K, acc);
            for (int t = 0; t < nt; t++)
                for (int j = 0; j < 4; j++) out[(m0 + t) * N + j * P + r] = acc[4 * t + j] - sums[m0 + t];
        }
    }
    return 0;
}

/* Bytes of scratch bitdistill_packed_linears needs for M tokens of K features. */
int64_t bitdistill_linears_scratch_bytes(int64_t M, int64_t K) {
    return M * K + 8 * M + 4 * K + 64;
}

/* Several BitLinear forwards sharing one input (q/k/v, gate/up): x [M, K] (float32, or bfloat16 when x_bf16) is
 * quantized once, then weight i writes out[i] [M, 4 P[i]] in the input's dtype. Each output equals the torch
 * reference (activation quantization and epilogue in float32, the product exact) cast to the dtype. */
int bitdistill_packed_linears(const void *x, int x_bf16, int64_t M, int64_t K, int n, const uint8_t *const *packed,
                              const int64_t *P, const float *weight_scale, const float *const *bias, void *const *out,
                              void *scratch, int nthreads) {
    bd_linear ls[8];
    int64_t ldo[8], total = 0;
    if (n > 8) return 1;
    for (int i = 0; i < n; i++) {
        ls[i] = (bd_linear){packed[i], P[i], weight_scale[i], bias[i]};
        ldo[i] = 4 * P[i];
        total += P[i];
    }
    float *xs = (float *)scratch, *row = xs + M;
    int32_t *sx = (int32_t *)(row + K);
    int8_t *xq = (int8_t *)(sx + M);
    for (int64_t m = 0; m < M; m++) {
        for (int64_t k = 0; k < K; k++) row[k] = bd_load(x, m * K + k, x_bf16);
        xs[m] = bd_quantize_row(row, K, xq + m * K, &sx[m]);
    }
    if (total * K * M < PARALLEL_MIN_WORK) nthreads = 1;
#pragma omp parallel num_threads(nthreads)
    bd_linears(xq, xs, sx, M, K, ls, n, out, ldo, x_bf16, x_bf16);
    return 0;
}

/* Int8 head for M rows x [M, K] float32: logits [M, V] float32. scratch: bitdistill_head_scratch_bytes. */
int64_t bitdistill_head_scratch_bytes(int64_t M, int64_t Kp) { return M * Kp * 6 + M * (Kp / BD_HEAD_BLOCK) * 4; }

int bitdistill_head(const bd_head *h, const float *x, int64_t M, float *logits, void *scratch, int nthreads) {
    float *xp = (float *)scratch, *bs = xp + M * h->Kp;
    uint8_t *qa = (uint8_t *)(bs + M * (h->Kp / BD_HEAD_BLOCK));
    int8_t *qs = (int8_t *)(qa + M * h->Kp);
    for (int64_t m = 0; m < M; m++)
        for (int64_t k = 0; k < h->Kp; k++) xp[m * h->Kp + k] = k < h->K ? x[m * h->K + k] : 0.0f;
    bd_head_quantize(xp, M, h->Kp, qa, qs, bs);
#pragma omp parallel num_threads(nthreads)
    bd_head_logits(h, qa, qs, bs, M, logits, h->V);
    return 0;
}

#ifndef BD_SOURCE_HASH
#define BD_SOURCE_HASH "unknown"
#endif

/* The hash of the sources this library was built from (setup.py), so a checkout can tell it is stale. */
const char *bitdistill_source_hash(void) { return BD_SOURCE_HASH; }
