/* Packed ternary GEMV/GEMM and the int8 head, with kernels picked at run time for the CPU's instructions.
 *
 * Ternary: out[m, n] = sum_k x[m, k] * T[n, k] = sum_k x*c - sum_k x for the codes c = T + 1 in {0, 1, 2}; the
 * kernels compute the exact int32 sum_k x*c of four weight rows (one packed row) at a time:
 *   scalar        the reference every kernel is tested against, bit for bit;
 *   AVX2          vpmaddubsw (c unsigned times x signed: pair sums |.| <= 512, no int16 saturation);
 *   AVX-512 VNNI  vpdpbusd (four products summed straight into int32 lanes), each code plane masked in place
 *                 (4^j c: no shift) and the sums shifted back: exact for K <= 65536 (cpu_ext.NATIVE_MAX_K).
 * Unpacking the 2-bit codes costs a shift and a mask per code vector (VNNI: a mask); it is cheaper here than a lookup table
 * (TL1/TL2, T-MAC), which pays off where multiply-accumulate is slow, not where VNNI is present. Work is done in
 * tiles (tile_fn): four packed rows against one token (decode: the token's codes loaded once for 16 weight rows) or
 * one packed row against four tokens (batches and prompts: the codes unpacked once for four tokens, four such tiles
 * of consecutive packed rows per work unit, stored together); the VNNI tile sums its 16 accumulators with one
 * transposed reduction and scales the 16 results in one vectorized epilogue.
 *
 * Int8 head: logits = scale[v] * sum_b s_b * dot_b, the activation quantized per 64-feature block (scale s_b).
 * AVX2 multiplies |q| by sign-applied weights as unsigned x signed bytes (no saturation: 128 * 127 * 2 fits
 * int16 for its pair sums); VNNI multiplies w + 128 by q (four products summed into int32) and takes 128 sum q
 * back per token, for several tokens in groups of four rows by four tokens with one transposed reduction. Each block's
 * integer dot is exact; the float sum over blocks runs in another order per kernel.
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

/* One tile of the exact product: nr packed rows p + u K (u < nr) against one token x, or one packed row p against nt
 * tokens x + u ldx (u < nt): either nr == 1 or nt == 1, both <= BD_TILE. acc[j * BD_TILE + u] = sum_k x*c for weight
 * row j P + r0 + u (a row tile) or for row j P + r0 and token u (a token tile): the codes of each packed row are
 * unpacked once for every token of the tile, the token's codes loaded once for every row. */
typedef void (*tile_fn)(const int8_t *x, int64_t ldx, int nt, const uint8_t *p, int nr, int64_t K, int32_t *acc);
#define BD_TILE 4
/* nv <= BD_HEAD_ROWS consecutive head rows (w: the first, row stride Kp) against nt <= BD_HEAD_TOKENS tokens (codes
 * qs/qa with row stride Kp, block scales bs with stride Kp / BD_HEAD_BLOCK, corr: see bd_head_logits): logits[t ldl + r]
 * = scale[r] * (the row's block sum for token t). */
typedef void (*head_rows_fn)(const int8_t *w, int nv, const uint8_t *qa, const int8_t *qs, const float *bs,
                             const float *corr, int nt, int64_t Kp, const float *scale, float *logits, int64_t ldl);
#define BD_HEAD_TOKENS 4
#define BD_HEAD_ROWS 16
/* The epilogue of one tile: scales the 16 exact sums acc of tile_fn and stores them (store_tile). */
typedef void (*store_fn)(const bd_linear *l, int64_t r0, int nr, int64_t m0, int nt, const int32_t *acc,
                         const float *xs, const int32_t *sx, void *out, int64_t ldo, int bf16, int store_bf16);

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

/* Scatter four sums of unit u into a tile's layout. */
static inline void tile_put(const int32_t a[4], int u, int32_t *acc) {
    for (int j = 0; j < 4; j++) acc[j * BD_TILE + u] = a[j];
}

static void tile_scalar(const int8_t *x, int64_t ldx, int nt, const uint8_t *p, int nr, int64_t K, int32_t *acc) {
    int32_t a[4];
    for (int u = 0; u < nr; u++) { row4_scalar(x, p + u * K, K, a); tile_put(a, u, acc); }
    for (int u = 1; u < nt; u++) { row4_scalar(x + u * ldx, p, K, a); tile_put(a, u, acc); }
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

static void head_rows_scalar(const int8_t *w, int nv, const uint8_t *qa, const int8_t *qs, const float *bs,
                             const float *corr, int nt, int64_t Kp, const float *scale, float *logits, int64_t ldl) {
    (void)corr;
    for (int r = 0; r < nv; r++)
        for (int t = 0; t < nt; t++)
            logits[t * ldl + r] =
                scale[r] * head_row_scalar(w + r * Kp, qa + t * Kp, qs + t * Kp, bs + t * (Kp / BD_HEAD_BLOCK), Kp);
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
        const int32_t oa[4] = {hsum256(a0) + ta[0], hsum256(a1) + ta[1], hsum256(a2) + ta[2], hsum256(a3) + ta[3]};
        const int32_t ob[4] = {hsum256(b0) + tb[0], hsum256(b1) + tb[1], hsum256(b2) + tb[2], hsum256(b3) + tb[3]};
        tile_put(oa, t, acc);
        tile_put(ob, t + 1, acc);
    }
    for (; t < nt; t++) {
        int32_t a[4];
        row4_avx2(x + t * ldx, p, K, a);
        tile_put(a, t, acc);
    }
}

static void tile_avx2(const int8_t *x, int64_t ldx, int nt, const uint8_t *p, int nr, int64_t K, int32_t *acc) {
    if (nt > 1) { rows4_avx2(x, ldx, nt, p, K, acc); return; }
    for (int u = 0; u < nr; u++) {
        int32_t a[4];
        row4_avx2(x, p + u * K, K, a);
        tile_put(a, u, acc);
    }
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

static void head_rows_avx2(const int8_t *w, int nv, const uint8_t *qa, const int8_t *qs, const float *bs,
                           const float *corr, int nt, int64_t Kp, const float *scale, float *logits, int64_t ldl) {
    (void)corr;
    for (int r = 0; r < nv; r++)
        for (int t = 0; t < nt; t++)
            logits[t * ldl + r] =
                scale[r] * head_row_avx2(w + r * Kp, qa + t * Kp, qs + t * Kp, bs + t * (Kp / BD_HEAD_BLOCK), Kp);
}

#define BD_VNNI "avx512f,avx512bw,avx512vl,avx512vnni"

/* Lane i of the result: the sum of the lanes of a[i] (a transposed reduction: 45 instructions for 16 sums, where
 * one sum at a time takes 9 each). */
__attribute__((target(BD_VNNI))) static inline __m512i hsum16_epi32(const __m512i a[16]) {
    __m512i b[4];
#pragma GCC unroll 4
    for (int g = 0; g < 4; g++) {
        const __m512i *v = a + 4 * g;
        const __m512i s01 = _mm512_add_epi32(_mm512_unpacklo_epi32(v[0], v[1]), _mm512_unpackhi_epi32(v[0], v[1]));
        const __m512i s23 = _mm512_add_epi32(_mm512_unpacklo_epi32(v[2], v[3]), _mm512_unpackhi_epi32(v[2], v[3]));
        b[g] = _mm512_add_epi32(_mm512_unpacklo_epi64(s01, s23), _mm512_unpackhi_epi64(s01, s23));
    }
    const __m512i d01 = _mm512_add_epi32(_mm512_shuffle_i32x4(b[0], b[1], 0x44), _mm512_shuffle_i32x4(b[0], b[1], 0xEE));
    const __m512i d23 = _mm512_add_epi32(_mm512_shuffle_i32x4(b[2], b[3], 0x44), _mm512_shuffle_i32x4(b[2], b[3], 0xEE));
    return _mm512_add_epi32(_mm512_shuffle_i32x4(d01, d23, 0x88), _mm512_shuffle_i32x4(d01, d23, 0xDD));
}

#define BD_LOAD(ptr) _mm512_loadu_si512((const void *)(ptr))
#define BD_LOAD_TAIL(ptr) _mm512_maskz_loadu_epi8(tail, (const void *)(ptr))
/* acc += the vpdpbusd of u (unsigned) and x (signed) in place: the intrinsic's copy semantics made GCC move the
 * accumulators between registers on every step. */
#define BD_DP(acc, u, x) __asm__("vpdpbusd %2, %1, %0" : "+v"(acc) : "v"(u), "v"(x))
/* The code planes are not shifted down: plane j is masked in place (m_j: 3 << 2j in every byte), so its vpdpbusd sums
 * 4^j c x, exact in int32 (|product| <= 192 * 128: no intermediate overflow), and the finished sums are shifted right
 * by 2j (plane_shifts). Three shifts fewer per 64 packed bytes than unpacking each plane to 0..2. */
#define BD_PLANE_MASKS                                                                                          \
    const __m512i m0 = _mm512_set1_epi8(0x03), m1 = _mm512_set1_epi8(0x0C), m2 = _mm512_set1_epi8(0x30);        \
    const __m512i m3 = _mm512_set1_epi8((char)0xC0)
/* 64 features of one packed row: its four code planes, each in place, times xv into A, B, C, D. */
#define BD_ROW(A, B, C, D, pv, xv)                                                                              \
    do {                                                                                                        \
        BD_DP(A, _mm512_and_si512(pv, m0), xv); BD_DP(B, _mm512_and_si512(pv, m1), xv);                         \
        BD_DP(C, _mm512_and_si512(pv, m2), xv); BD_DP(D, _mm512_and_si512(pv, m3), xv);                         \
    } while (0)

/* Lane i of a tile's 16 sums belongs to plane i / 4: undo its 4^j. */
__attribute__((target(BD_VNNI))) static inline __m512i plane_shifts(__m512i sums) {
    return _mm512_srav_epi32(sums, _mm512_set_epi32(6, 6, 6, 6, 4, 4, 4, 4, 2, 2, 2, 2, 0, 0, 0, 0));
}

/* The full token tile of tile_vnni (one packed row, four tokens) with its 16 accumulators in named variables: held in
 * an array, GCC copied them between registers on every step (28 moves and two spills per 16 vpdpbusd). */
__attribute__((target(BD_VNNI))) static void tokens4_vnni(const int8_t *x, int64_t ldx, const uint8_t *p, int64_t K,
                                                           int32_t *acc) {
    BD_PLANE_MASKS;
    const int64_t K64 = K / 64 * 64;
    const __mmask64 tail = ((__mmask64)1 << (K - K64)) - 1;
    __m512i a0 = _mm512_setzero_si512(), a1 = a0, a2 = a0, a3 = a0, a4 = a0, a5 = a0, a6 = a0, a7 = a0, a8 = a0,
            a9 = a0, a10 = a0, a11 = a0, a12 = a0, a13 = a0, a14 = a0, a15 = a0;
#define BD_STEP4(k, LOAD)                                                                                       \
    do {                                                                                                        \
        const __m512i pv = LOAD(p + (k));                                                                       \
        const __m512i c0 = _mm512_and_si512(pv, m0), c1 = _mm512_and_si512(pv, m1);                             \
        const __m512i c2 = _mm512_and_si512(pv, m2), c3 = _mm512_and_si512(pv, m3);                             \
        const __m512i x0 = LOAD(x + (k)), x1 = LOAD(x + ldx + (k)), x2 = LOAD(x + 2 * ldx + (k));               \
        const __m512i x3 = LOAD(x + 3 * ldx + (k));                                                             \
        BD_DP(a0, c0, x0); BD_DP(a4, c1, x0);                                                                       \
        BD_DP(a8, c2, x0); BD_DP(a12, c3, x0);                                                                      \
        BD_DP(a1, c0, x1); BD_DP(a5, c1, x1);                                                                       \
        BD_DP(a9, c2, x1); BD_DP(a13, c3, x1);                                                                      \
        BD_DP(a2, c0, x2); BD_DP(a6, c1, x2);                                                                       \
        BD_DP(a10, c2, x2); BD_DP(a14, c3, x2);                                                                     \
        BD_DP(a3, c0, x3); BD_DP(a7, c1, x3);                                                                       \
        BD_DP(a11, c2, x3); BD_DP(a15, c3, x3);                                                                     \
    } while (0)
    for (int64_t k = 0; k < K64; k += 64) {
        _mm_prefetch((const char *)(p + 2 * K + k), _MM_HINT_T0); /* two packed rows ahead */
        BD_STEP4(k, BD_LOAD);
    }
    if (K64 < K) BD_STEP4(K64, BD_LOAD_TAIL);
#undef BD_STEP4
    const __m512i s[16] = {a0, a1, a2, a3, a4, a5, a6, a7, a8, a9, a10, a11, a12, a13, a14, a15};
    _mm512_storeu_si512((void *)acc, plane_shifts(hsum16_epi32(s)));
}

/* The full row tile of tile_vnni (four packed rows, one token), its accumulators in named variables as tokens4_vnni's. */
__attribute__((target(BD_VNNI))) static void rows4_vnni(const int8_t *x, const uint8_t *p, int64_t K, int32_t *acc) {
    BD_PLANE_MASKS;
    const int64_t K64 = K / 64 * 64;
    const __mmask64 tail = ((__mmask64)1 << (K - K64)) - 1;
    __m512i a0 = _mm512_setzero_si512(), a1 = a0, a2 = a0, a3 = a0, a4 = a0, a5 = a0, a6 = a0, a7 = a0, a8 = a0,
            a9 = a0, a10 = a0, a11 = a0, a12 = a0, a13 = a0, a14 = a0, a15 = a0;
#define BD_ROWS4(k, LOAD)                                                                                       \
    do {                                                                                                        \
        const __m512i xv = LOAD(x + (k)), p0 = LOAD(p + (k)), p1 = LOAD(p + K + (k));                           \
        const __m512i p2 = LOAD(p + 2 * K + (k)), p3 = LOAD(p + 3 * K + (k));                                   \
        BD_ROW(a0, a4, a8, a12, p0, xv); BD_ROW(a1, a5, a9, a13, p1, xv);                                       \
        BD_ROW(a2, a6, a10, a14, p2, xv); BD_ROW(a3, a7, a11, a15, p3, xv);                                     \
    } while (0)
    for (int64_t k = 0; k < K64; k += 64) {
        /* the next tile's rows: four short streams at once defeat the hardware prefetcher */
        for (int u = 0; u < BD_TILE; u++) _mm_prefetch((const char *)(p + (BD_TILE + u) * K + k), _MM_HINT_T0);
        BD_ROWS4(k, BD_LOAD);
    }
    if (K64 < K) BD_ROWS4(K64, BD_LOAD_TAIL);
#undef BD_ROWS4
    const __m512i s[16] = {a0, a1, a2, a3, a4, a5, a6, a7, a8, a9, a10, a11, a12, a13, a14, a15};
    _mm512_storeu_si512((void *)acc, plane_shifts(hsum16_epi32(s)));
}

/* Full tiles (four tokens or four rows) run tokens4_vnni / rows4_vnni: 16 accumulators (4 planes x 4 units), plain loads
 * up to the last multiple of 64 and one masked step for the rest (zeros contribute nothing), so any K runs in vector
 * code, and one reduction for all. Partial tiles run unit by unit. */
__attribute__((target(BD_VNNI))) static void tile_vnni(const int8_t *x, int64_t ldx, int nt, const uint8_t *p, int nr,
                                                        int64_t K, int32_t *acc) {
    if (nt == BD_TILE) {
        tokens4_vnni(x, ldx, p, K, acc);
        return;
    }
    if (nr == BD_TILE) {
        rows4_vnni(x, p, K, acc);
        return;
    }
    BD_PLANE_MASKS;
    const int64_t K64 = K / 64 * 64;
    const __mmask64 tail = ((__mmask64)1 << (K - K64)) - 1;
    int32_t part[4 * BD_TILE] = {0};
    for (int u = 0; u < (nr > nt ? nr : nt); u++) {
        const uint8_t *pu = nr > 1 ? p + u * K : p;
        const int8_t *xu = nt > 1 ? x + u * ldx : x;
        __m512i a[4] = {_mm512_setzero_si512(), _mm512_setzero_si512(), _mm512_setzero_si512(), _mm512_setzero_si512()};
        for (int64_t k = 0; k < K64; k += 64) {
            const __m512i pv = BD_LOAD(pu + k), xv = BD_LOAD(xu + k);
            BD_ROW(a[0], a[1], a[2], a[3], pv, xv);
        }
        if (K64 < K) {
            const __m512i pv = BD_LOAD_TAIL(pu + K64), xv = BD_LOAD_TAIL(xu + K64);
            BD_ROW(a[0], a[1], a[2], a[3], pv, xv);
        }
        for (int j = 0; j < 4; j++) part[j * BD_TILE + u] = _mm512_reduce_add_epi32(a[j]) >> (2 * j);
    }
    memcpy(acc, part, sizeof part);
}
#undef BD_LOAD
#undef BD_LOAD_TAIL
#undef BD_ROW
#undef BD_PLANE_MASKS
#undef BD_DP

/* The head streams V x Kp bytes once per step, row after row: a software prefetch this far ahead (past the next 4 KiB
 * pages, where the hardware prefetcher stops) measured 5-25% more tokens per second at batch 1 on a 2048-wide head
 * than none, and no slower than 16 or 64 KiB (interleaved A/B, issue 51). */
#define BD_HEAD_PREFETCH 32768

/* Head rows for the VNNI kernels read the weights as unsigned w + 128 (vpdpbusd multiplies unsigned by signed bytes):
 * sum (w + 128) q = sum w q + 128 sum q, the second term taken back per token once (corr). */

/* One token: row after row, one reduction per row. (Rows in groups of 16 with one transposed reduction took 1.4x as
 * long on a head streamed from memory.) */
__attribute__((target(BD_VNNI))) static void head_rows1_vnni(const int8_t *w, int nv, const int8_t *qs, const float *bs,
                                                              const float *corr, int64_t Kp, const float *scale,
                                                              float *logits) {
    const __m512i zero = _mm512_setzero_si512(), flip = _mm512_set1_epi8((char)0x80);
    for (int r = 0; r < nv; r++) {
        const int8_t *wr = w + r * Kp;
        __m512 acc = _mm512_setzero_ps();
        for (int64_t b = 0; b < Kp / BD_HEAD_BLOCK; b++) {
            const int64_t k = b * BD_HEAD_BLOCK;
            _mm_prefetch((const char *)(wr + k + BD_HEAD_PREFETCH), _MM_HINT_T0);
            const __m512i d = _mm512_dpbusd_epi32(zero, _mm512_xor_si512(_mm512_loadu_si512((const void *)(wr + k)), flip),
                                                  _mm512_loadu_si512((const void *)(qs + k)));
            acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d), _mm512_set1_ps(bs[b]), acc);
        }
        logits[r] = scale[r] * (_mm512_reduce_add_ps(acc) - corr[0]);
    }
}

/* Up to four tokens: groups of four rows x four tokens, 16 accumulators and one transposed reduction (lane 4 t + r:
 * row r, token t), each weight block loaded once for the four tokens; rows past nv repeat the last (not stored). */
__attribute__((target(BD_VNNI))) static void head_rows_vnni(const int8_t *w, int nv, const uint8_t *qa, const int8_t *qs,
                                                             const float *bs, const float *corr, int nt, int64_t Kp,
                                                             const float *scale, float *logits, int64_t ldl) {
    (void)qa;
    if (nt == 1) {
        head_rows1_vnni(w, nv, qs, bs, corr, Kp, scale, logits);
        return;
    }
    const __m512i zero = _mm512_setzero_si512(), flip = _mm512_set1_epi8((char)0x80);
    const __m512i lane = _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
    const __m512i row = _mm512_and_si512(lane, _mm512_set1_epi32(3)), tok = _mm512_srli_epi32(lane, 2);
    const int64_t nb = Kp / BD_HEAD_BLOCK;
    const __m512 co = _mm512_permutexvar_ps(tok, _mm512_maskz_loadu_ps((__mmask16)((1u << nt) - 1), corr));
    for (int g = 0; g < nv; g += 4) {
        const int ng = nv - g < 4 ? nv - g : 4;
        __m512 acc[16];
#pragma GCC unroll 16
        for (int i = 0; i < 16; i++) acc[i] = _mm512_setzero_ps();
        for (int64_t b = 0; b < nb; b++) {
            const int64_t k = b * BD_HEAD_BLOCK;
            __m512i x[4];
            __m512 sb[4];
#pragma GCC unroll 4
            for (int t = 0; t < 4; t++) {
                x[t] = t < nt ? _mm512_loadu_si512((const void *)(qs + t * Kp + k)) : zero;
                sb[t] = _mm512_set1_ps(t < nt ? bs[t * nb + b] : 0.0f);
            }
#pragma GCC unroll 4
            for (int r = 0; r < 4; r++) {
                const int8_t *wr = w + (g + (r < ng ? r : ng - 1)) * Kp + k;
                _mm_prefetch((const char *)(wr + BD_HEAD_PREFETCH), _MM_HINT_T0);
                const __m512i wu = _mm512_xor_si512(_mm512_loadu_si512((const void *)wr), flip);
#pragma GCC unroll 4
                for (int t = 0; t < 4; t++)
                    acc[4 * t + r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_dpbusd_epi32(zero, wu, x[t])), sb[t],
                                                     acc[4 * t + r]);
            }
        }
        const __mmask16 rows = (__mmask16)((1u << ng) - 1);
        const __m512 sc = _mm512_permutexvar_ps(row, _mm512_maskz_loadu_ps(rows, scale + g));
        const __m512 y = _mm512_mul_ps(sc, _mm512_sub_ps(bd_hsum16_ps(acc), co));
        for (int t = 0; t < nt; t++) /* token t's four lanes down to lane 0 */
            _mm512_mask_storeu_ps(logits + t * ldl + g, rows,
                                  _mm512_permutexvar_ps(_mm512_add_epi32(lane, _mm512_set1_epi32(4 * t)), y));
    }
}
#endif

/* The epilogue of one tile (see tile_fn), the one place the weight scale is applied: out[m, col] =
 * dtype((acc - sx[m]) / (xs[m] * scale) + bias[col]) for weight row col = j P + r, stored as float32 or bfloat16.
 * Lane by lane over the 16 sums in loops without branches (IEEE division, as the reference), then one scatter of
 * the 16 values: four columns of a token apart by P. The scalar and AVX2 kernels' epilogue, and the AVX-512 one's
 * for partial tiles and bfloat16 outputs. */
static void store_tile(const bd_linear *l, int64_t r0, int nr, int64_t m0, int nt, const int32_t *acc,
                       const float *xs, const int32_t *sx, void *out, int64_t ldo, int bf16, int store_bf16) {
    enum { N = 4 * BD_TILE };
    const int rows = nr > 1, nu = rows ? nr : nt;
    float den[N], y[N], bias[N];
    int32_t sub[N];
    uint16_t yb[N];
    for (int j = 0; j < 4; j++)
        for (int u = 0; u < BD_TILE; u++) {
            const int uu = u < nu ? u : nu - 1; /* lanes past a partial tile repeat its last unit (not stored) */
            const int64_t m = rows ? m0 : m0 + uu, col = j * l->P + r0 + (rows ? uu : 0);
            den[j * BD_TILE + u] = xs[m] * (l->row_scale ? l->row_scale[col] : l->scale);
            sub[j * BD_TILE + u] = sx[m];
            bias[j * BD_TILE + u] = l->bias ? l->bias[col] : 0.0f;
        }
    for (int i = 0; i < N; i++) y[i] = (float)(acc[i] - sub[i]) / den[i];
    if (l->bias)
        for (int i = 0; i < N; i++) y[i] += bias[i];
    if (store_bf16) {
        for (int i = 0; i < N; i++) yb[i] = bd_f32_to_bf16(y[i]);
    } else if (bf16) {
        for (int i = 0; i < N; i++) y[i] = bd_round(y[i], 1);
    }
    for (int u = 0; u < nu; u++) {
        const int64_t at = (rows ? m0 : m0 + u) * ldo + r0 + (rows ? u : 0);
        if (store_bf16)
            for (int j = 0; j < 4; j++) ((uint16_t *)out)[at + j * l->P] = yb[j * BD_TILE + u];
        else
            for (int j = 0; j < 4; j++) ((float *)out)[at + j * l->P] = y[j * BD_TILE + u];
    }
}

#ifdef BD_X86
/* Round 16 floats to bfloat16 values as bd_round: nearest even, NaN to 0x7FC0. */
__attribute__((target(BD_VNNI))) static inline __m512 round_bf16_ps(__m512 y) {
    const __m512i b = _mm512_castps_si512(y), one = _mm512_set1_epi32(1);
    __m512i r = _mm512_add_epi32(_mm512_add_epi32(b, _mm512_set1_epi32(0x7FFF)),
                                 _mm512_and_si512(_mm512_srli_epi32(b, 16), one));
    r = _mm512_slli_epi32(_mm512_srli_epi32(r, 16), 16);
    return _mm512_castsi512_ps(
        _mm512_mask_mov_epi32(r, _mm512_cmp_ps_mask(y, y, _CMP_UNORD_Q), _mm512_set1_epi32(0x7FC00000)));
}

/* store_tile for a full tile stored as float32 (the decoder's case), in AVX-512: the same float32 operations lane by
 * lane, so the same bits. Lane i = 4 j + u: row tile: token m0, column j P + r0 + u (four contiguous columns per j);
 * token tile: token m0 + u, column j P + r0. Anything else goes to store_tile. */
__attribute__((target(BD_VNNI))) static void store_tile_vnni(const bd_linear *l, int64_t r0, int nr, int64_t m0,
                                                              int nt, const int32_t *acc, const float *xs,
                                                              const int32_t *sx, void *out, int64_t ldo, int bf16,
                                                              int store_bf16) {
    const int rows = nr == BD_TILE && nt == 1;
    if (store_bf16 || !(rows || (nt == BD_TILE && nr == 1)) || l->P > INT32_MAX / 4 || ldo > INT32_MAX / 8) {
        store_tile(l, r0, nr, m0, nt, acc, xs, sx, out, ldo, bf16, store_bf16);
        return;
    }
    const __m512i lane = _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
    const __m512i j = _mm512_srli_epi32(lane, 2), u = _mm512_and_si512(lane, _mm512_set1_epi32(3));
    const __m512i jp = _mm512_mullo_epi32(j, _mm512_set1_epi32((int32_t)l->P));
    const __m512i col = rows ? _mm512_add_epi32(jp, u) : jp; /* column - r0 */
    const __m512 xsv = rows ? _mm512_set1_ps(xs[m0]) : _mm512_broadcast_f32x4(_mm_loadu_ps(xs + m0));
    const __m512i sxv = rows ? _mm512_set1_epi32(sx[m0]) : _mm512_broadcast_i32x4(_mm_loadu_si128((const __m128i *)(sx + m0)));
    const __m512 scale = l->row_scale ? _mm512_i32gather_ps(col, l->row_scale + r0, 4) : _mm512_set1_ps(l->scale);
    __m512 y = _mm512_div_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(_mm512_loadu_si512((const void *)acc), sxv)),
                             _mm512_mul_ps(xsv, scale));
    if (l->bias) y = _mm512_add_ps(y, _mm512_i32gather_ps(col, l->bias + r0, 4));
    if (bf16) y = round_bf16_ps(y);
    float *o = (float *)out + m0 * ldo + r0;
    if (rows) {
        _mm_storeu_ps(o, _mm512_extractf32x4_ps(y, 0));
        _mm_storeu_ps(o + l->P, _mm512_extractf32x4_ps(y, 1));
        _mm_storeu_ps(o + 2 * l->P, _mm512_extractf32x4_ps(y, 2));
        _mm_storeu_ps(o + 3 * l->P, _mm512_extractf32x4_ps(y, 3));
    } else {
        _mm512_i32scatter_ps(o, _mm512_add_epi32(jp, _mm512_mullo_epi32(u, _mm512_set1_epi32((int32_t)ldo))), y, 4);
    }
}

/* store_token_tiles for four full token tiles stored as float32 (a batch's or a prompt's case): the same float32
 * operations lane by lane as store_tile, so the same bits. Tile i's lane 4 j + u is token m0 + u, column j P + r0 + i,
 * so after a 4 x 4 transpose inside each 128-bit lane the four columns r0..r0+3 of one j and one token are
 * contiguous: sixteen 128-bit stores instead of four 16-lane scatters, and four independent divisions. */
__attribute__((target(BD_VNNI))) static void store_token_tiles_vnni(const bd_linear *l, int64_t r0, int nr,
                                                                     int64_t m0, int nt, const int32_t *acc,
                                                                     const float *xs, const int32_t *sx, void *out,
                                                                     int64_t ldo, int bf16, int store_bf16) {
    if (store_bf16 || nr != BD_TILE || nt != BD_TILE || l->P > INT32_MAX / 4) {
        for (int i = 0; i < nr; i++)
            store_tile_vnni(l, r0 + i, 1, m0, nt, acc + 4 * BD_TILE * i, xs, sx, out, ldo, bf16, store_bf16);
        return;
    }
    const __m512i lane = _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
    const __m512i jp = _mm512_mullo_epi32(_mm512_srli_epi32(lane, 2), _mm512_set1_epi32((int32_t)l->P));
    const __m512 xsv = _mm512_broadcast_f32x4(_mm_loadu_ps(xs + m0));
    const __m512i sxv = _mm512_broadcast_i32x4(_mm_loadu_si128((const __m128i *)(sx + m0)));
    __m512 y[BD_TILE];
    for (int i = 0; i < BD_TILE; i++) {
        const __m512 scale = l->row_scale ? _mm512_i32gather_ps(jp, l->row_scale + r0 + i, 4) : _mm512_set1_ps(l->scale);
        y[i] = _mm512_div_ps(
            _mm512_cvtepi32_ps(_mm512_sub_epi32(_mm512_loadu_si512((const void *)(acc + 4 * BD_TILE * i)), sxv)),
            _mm512_mul_ps(xsv, scale));
        if (l->bias) y[i] = _mm512_add_ps(y[i], _mm512_i32gather_ps(jp, l->bias + r0 + i, 4));
        if (bf16) y[i] = round_bf16_ps(y[i]);
    }
    const __m512 t0 = _mm512_unpacklo_ps(y[0], y[1]), t1 = _mm512_unpackhi_ps(y[0], y[1]);
    const __m512 t2 = _mm512_unpacklo_ps(y[2], y[3]), t3 = _mm512_unpackhi_ps(y[2], y[3]);
#define BD_PD(f, a, b) _mm512_castpd_ps(f(_mm512_castps_pd(a), _mm512_castps_pd(b)))
    const __m512 by_token[BD_TILE] = {BD_PD(_mm512_unpacklo_pd, t0, t2), BD_PD(_mm512_unpackhi_pd, t0, t2),
                                      BD_PD(_mm512_unpacklo_pd, t1, t3), BD_PD(_mm512_unpackhi_pd, t1, t3)};
#undef BD_PD
    for (int u = 0; u < BD_TILE; u++) {
        float *o = (float *)out + (m0 + u) * ldo + r0;
        _mm_storeu_ps(o, _mm512_extractf32x4_ps(by_token[u], 0));
        _mm_storeu_ps(o + l->P, _mm512_extractf32x4_ps(by_token[u], 1));
        _mm_storeu_ps(o + 2 * l->P, _mm512_extractf32x4_ps(by_token[u], 2));
        _mm_storeu_ps(o + 3 * l->P, _mm512_extractf32x4_ps(by_token[u], 3));
    }
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
static tile_fn tile = tile_scalar;
static store_fn store = store_tile;
static head_rows_fn head_rows = head_rows_scalar;

/* The epilogue of the token tiles (nt > 1 tokens) of nr <= BD_TILE consecutive packed rows, acc + 4 BD_TILE i the
 * tile of packed row r0 + i: one store per tile (the scalar and AVX2 kernels'). */
static void store_token_tiles(const bd_linear *l, int64_t r0, int nr, int64_t m0, int nt, const int32_t *acc,
                              const float *xs, const int32_t *sx, void *out, int64_t ldo, int bf16, int store_bf16) {
    for (int i = 0; i < nr; i++) store(l, r0 + i, 1, m0, nt, acc + 4 * BD_TILE * i, xs, sx, out, ldo, bf16, store_bf16);
}
static store_fn store_tokens = store_token_tiles;

/* Use the kernels of `level`, capped at what this CPU has (a negative level: the best it has). Returns the
 * level in use. Not thread safe: call it before decoding, not during. */
int bitdistill_set_isa(int level) {
    const int best = detected_isa();
    isa = level < 0 || level > best ? best : level;
    tile = tile_scalar;
    store = store_tile;
    store_tokens = store_token_tiles;
    head_rows = head_rows_scalar;
#ifdef BD_X86
    if (isa == BD_ISA_AVX2) { tile = tile_avx2; head_rows = head_rows_avx2; }
    if (isa == BD_ISA_AVX512_VNNI) {
        tile = tile_vnni; store = store_tile_vnni; store_tokens = store_token_tiles_vnni; head_rows = head_rows_vnni;
    }
#endif
    return isa;
}

int bitdistill_isa(void) {
    if (isa < 0) bitdistill_set_isa(-1);
    return isa;
}

__attribute__((constructor)) static void init_isa(void) { bitdistill_set_isa(-1); }

BD_CLONES float bd_quantize_row(const float *row, int64_t K, int8_t *q, int32_t *sum) {
    float part[16] = {0}, amax = 0.0f; /* 16 partial maxima: the loop vectorizes (one chain of maxss did not) */
    int64_t k0 = 0;
    for (; k0 + 16 <= K; k0 += 16)
        for (int i = 0; i < 16; i++) { const float a = fabsf(row[k0 + i]); part[i] = a > part[i] ? a : part[i]; }
    for (; k0 < K; k0++) { const float a = fabsf(row[k0]); amax = a > amax ? a : amax; }
    for (int i = 0; i < 16; i++) amax = part[i] > amax ? part[i] : amax;
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

/* Work units of BD_TILE packed rows: for one token a row tile (the token's codes loaded once for its 16 weight rows),
 * for several a token tile per packed row (its codes unpacked once for BD_TILE tokens) and one epilogue for the
 * unit's tiles. Each packed row is read from memory once and reused from L1 for every token. */
BD_CLONES void bd_linears(const int8_t *xq, const float *xs, const int32_t *sx, int64_t M, int64_t K,
                          const bd_linear *ls, int n, void *const *outs, const int64_t *ldo, int bf16, int store_bf16) {
    int64_t total = 0, units[8];
    for (int i = 0; i < n; i++) total += units[i] = (ls[i].P + BD_TILE - 1) / BD_TILE;
#pragma omp for schedule(static)
    for (int64_t g = 0; g < total; g++) {
        int i = 0;
        int64_t u = g;
        while (u >= units[i]) u -= units[i++];
        const bd_linear *l = &ls[i];
        const int64_t r0 = u * BD_TILE;
        const int nr = l->P - r0 < BD_TILE ? (int)(l->P - r0) : BD_TILE;
        for (int64_t m0 = 0; m0 < M; m0 += BD_TILE) {
            const int nt = M - m0 < BD_TILE ? (int)(M - m0) : BD_TILE;
            int32_t acc[BD_TILE * 4 * BD_TILE];
            if (nt == 1) {
                tile(xq + m0 * K, K, 1, l->packed + r0 * K, nr, K, acc);
                store(l, r0, nr, m0, 1, acc, xs, sx, outs[i], ldo[i], bf16, store_bf16);
            } else {
                for (int r = 0; r < nr; r++) tile(xq + m0 * K, K, nt, l->packed + (r0 + r) * K, 1, K, acc + 4 * BD_TILE * r);
                store_tokens(l, r0, nr, m0, nt, acc, xs, sx, outs[i], ldo[i], bf16, store_bf16);
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
    for (int64_t g = 0; g < (h->V + BD_HEAD_ROWS - 1) / BD_HEAD_ROWS; g++) {
        const int64_t v0 = g * BD_HEAD_ROWS;
        const int nv = h->V - v0 < BD_HEAD_ROWS ? (int)(h->V - v0) : BD_HEAD_ROWS;
        for (int64_t m0 = 0; m0 < M; m0 += BD_HEAD_TOKENS) {
            const int nt = M - m0 < BD_HEAD_TOKENS ? (int)(M - m0) : BD_HEAD_TOKENS;
            head_rows(h->w + v0 * Kp, nv, qa + m0 * Kp, qs + m0 * Kp, bs + m0 * nb, corr + m0, nt, Kp, h->scale + v0,
                      logits + m0 * ldl + v0, ldl);
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
    const int64_t rows = M == 1 ? BD_TILE : 1; /* a row tile for one token, else token tiles of one packed row */
#pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int64_t g = 0; g < (P + rows - 1) / rows; g++) {
        const int64_t r0 = g * rows;
        const int nr = P - r0 < rows ? (int)(P - r0) : (int)rows;
        for (int64_t m0 = 0; m0 < M; m0 += BD_TILE) {
            const int nt = M - m0 < BD_TILE ? (int)(M - m0) : BD_TILE;
            int32_t acc[4 * BD_TILE];
            tile(x + m0 * K, K, nt, packed + r0 * K, nr, K, acc);
            for (int u = 0; u < (nr > nt ? nr : nt); u++)
                for (int j = 0; j < 4; j++) {
                    const int64_t r = nr > 1 ? r0 + u : r0, m = nr > 1 ? m0 : m0 + u;
                    out[m * N + j * P + r] = acc[j * BD_TILE + u] - sums[m];
                }
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
 * reference (activation quantization and epilogue in float32, the product exact) cast to the dtype. Weight i's
 * scale is weight_scale[i], or row_scale[i][col] per output row where row_scale[i] is not NULL. */
int bitdistill_packed_linears(const void *x, int x_bf16, int64_t M, int64_t K, int n, const uint8_t *const *packed,
                              const int64_t *P, const float *weight_scale, const float *const *row_scale,
                              const float *const *bias, void *const *out, void *scratch, int nthreads) {
    bd_linear ls[8];
    int64_t ldo[8], total = 0;
    if (n > 8) return 1;
    for (int i = 0; i < n; i++) {
        ls[i] = (bd_linear){packed[i], P[i], weight_scale[i], bias[i], row_scale[i]};
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
