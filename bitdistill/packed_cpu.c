/* Packed ternary GEMV/GEMM for CPU, straight from the Hugging Face bitnet layout.
 *
 * packed: uint8 [P, K], P = N / 4; byte (r, k) holds codes c = T + 1 of rows r, P+r, 2P+r, 3P+r of
 * the ternary weight T [N, K] in bits 0-1, 2-3, 4-5, 6-7. x: int8 [M, K] activation codes.
 * out: int32 [M, N], out[m, n] = sum_k x[m, k] * T[n, k], computed as sum_k x*c - sum_k x (exact).
 * Rows of `packed` are split across `nthreads` OpenMP threads; no memory is allocated.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#if defined(__AVX2__)
#include <immintrin.h>
#endif

static void row4(const int8_t *x, const uint8_t *p, int64_t K, int32_t acc[4]) {
    int64_t k = 0;
    int32_t a0 = 0, a1 = 0, a2 = 0, a3 = 0;
#if defined(__AVX2__)
    const __m256i mask = _mm256_set1_epi8(3);
    const __m256i ones = _mm256_set1_epi16(1);
    __m256i s0 = _mm256_setzero_si256(), s1 = s0, s2 = s0, s3 = s0;
    for (; k + 32 <= K; k += 32) {
        __m256i pv = _mm256_loadu_si256((const __m256i *)(p + k));
        __m256i xv = _mm256_loadu_si256((const __m256i *)(x + k));
        __m256i c0 = _mm256_and_si256(pv, mask);
        __m256i c1 = _mm256_and_si256(_mm256_srli_epi16(pv, 2), mask);
        __m256i c2 = _mm256_and_si256(_mm256_srli_epi16(pv, 4), mask);
        __m256i c3 = _mm256_and_si256(_mm256_srli_epi16(pv, 6), mask);
        /* c in {0,1,2} (unsigned) times x (signed): pair sums |.| <= 512, no int16 saturation. */
        s0 = _mm256_add_epi32(s0, _mm256_madd_epi16(_mm256_maddubs_epi16(c0, xv), ones));
        s1 = _mm256_add_epi32(s1, _mm256_madd_epi16(_mm256_maddubs_epi16(c1, xv), ones));
        s2 = _mm256_add_epi32(s2, _mm256_madd_epi16(_mm256_maddubs_epi16(c2, xv), ones));
        s3 = _mm256_add_epi32(s3, _mm256_madd_epi16(_mm256_maddubs_epi16(c3, xv), ones));
    }
    int32_t t[8];
    _mm256_storeu_si256((__m256i *)t, s0); for (int i = 0; i < 8; i++) a0 += t[i];
    _mm256_storeu_si256((__m256i *)t, s1); for (int i = 0; i < 8; i++) a1 += t[i];
    _mm256_storeu_si256((__m256i *)t, s2); for (int i = 0; i < 8; i++) a2 += t[i];
    _mm256_storeu_si256((__m256i *)t, s3); for (int i = 0; i < 8; i++) a3 += t[i];
#endif
    for (; k < K; k++) {
        int32_t xk = x[k];
        uint8_t b = p[k];
        a0 += xk * (b & 3);
        a1 += xk * ((b >> 2) & 3);
        a2 += xk * ((b >> 4) & 3);
        a3 += xk * ((b >> 6) & 3);
    }
    acc[0] = a0; acc[1] = a1; acc[2] = a2; acc[3] = a3;
}

/* Below this many packed bytes times tokens a call runs on one thread: a GEMV of a small layer is
 * faster alone than with the fork/join of a parallel region (and far faster when cores are shared). */
#define PARALLEL_MIN_WORK (1 << 16)

int bitdistill_packed_int_mm(const int8_t *x, int64_t M, int64_t K, const uint8_t *packed, int64_t P,
                             int32_t *out, int nthreads) {
    const int64_t N = 4 * P;
    int32_t *sx = (int32_t *)malloc(sizeof(int32_t) * (size_t)(M > 0 ? M : 1));
    if (sx == NULL) return 1;
    for (int64_t m = 0; m < M; m++) {
        int32_t s = 0;
        for (int64_t k = 0; k < K; k++) s += x[m * K + k];
        sx[m] = s;
    }
    if (P * K * M < PARALLEL_MIN_WORK) nthreads = 1;
    /* Each packed row (4 weight rows, K bytes) is read from memory once and reused from L1 for every token. */
#pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int64_t r = 0; r < P; r++) {
        const uint8_t *pr = packed + r * K;
        for (int64_t m = 0; m < M; m++) {
            int32_t acc[4];
            row4(x + m * K, pr, K, acc);
            int32_t *om = out + m * N;
            om[r] = acc[0] - sx[m];
            om[P + r] = acc[1] - sx[m];
            om[2 * P + r] = acc[2] - sx[m];
            om[3 * P + r] = acc[3] - sx[m];
        }
    }
    free(sx);
    return 0;
}

/* Whole BitLinear forward on float32 input: per-token int8 activation quantization
 * (s = (1 / max(max|x|, 1e-5)) * 127, as torch evaluates 127 / t, q = clamp(rint(x * s), -128, 127), round half to even, as torch),
 * the packed integer product, then y = acc / (s * weight_scale) + bias, all in float32 exactly as
 * the torch reference orders them. x: [M, K]; bias: [N] or NULL; out: float32 [M, N]. */
int bitdistill_packed_linears(const void *x, int x_bf16, int64_t M, int64_t K, int n, const uint8_t *const *packed,
                              const int64_t *P, const float *weight_scale, const float *const *bias, void *const *out,
                              int nthreads);

int bitdistill_packed_linear_f32(const float *x, int64_t M, int64_t K, const uint8_t *packed, int64_t P,
                                 float weight_scale, const float *bias, float *out, int nthreads) {
    void *outs[1] = {out};
    return bitdistill_packed_linears(x, 0, M, K, 1, &packed, &P, &weight_scale, &bias, outs, nthreads);
}

/* bfloat16 <-> float32 exactly as torch converts them (widening is exact; narrowing rounds to nearest
 * even, NaN -> 0x7FC0). */
static inline float bf16_to_f32(uint16_t b) {
    uint32_t u = (uint32_t)b << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

static inline uint16_t f32_to_bf16(float f) {
    uint32_t u;
    if (isnan(f)) return 0x7FC0;
    memcpy(&u, &f, sizeof u);
    return (uint16_t)((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}

/* Several BitLinear forwards that share one input (q/k/v, gate/up): the input [M, K] (float32, or bfloat16
 * when x_bf16) is quantized once, then weight i (packed[i]: uint8 [P[i], K], weight_scale[i], bias[i] float32
 * [4 P[i]] or NULL) writes out[i] [M, 4 P[i]] in the input's dtype. Each output equals
 * bitdistill_packed_linear_f32 on the float32 input followed by torch's cast to the input dtype. */
int bitdistill_packed_linears(const void *x, int x_bf16, int64_t M, int64_t K, int n, const uint8_t *const *packed,
                              const int64_t *P, const float *weight_scale, const float *const *bias, void *const *out,
                              int nthreads) {
    int64_t max_n = 1;
    for (int i = 0; i < n; i++) max_n = 4 * P[i] > max_n ? 4 * P[i] : max_n;
    int8_t *xq = (int8_t *)malloc((size_t)(M * K > 0 ? M * K : 1));
    float *scale = (float *)malloc(sizeof(float) * (size_t)(M > 0 ? M : 1));
    float *row = (float *)malloc(sizeof(float) * (size_t)(K > 0 ? K : 1));
    int32_t *acc = (int32_t *)malloc(sizeof(int32_t) * (size_t)(M * max_n > 0 ? M * max_n : 1));
    if (xq == NULL || scale == NULL || row == NULL || acc == NULL) {
        free(xq); free(scale); free(row); free(acc);
        return 1;
    }
    for (int64_t m = 0; m < M; m++) {
        if (x_bf16) {
            const uint16_t *xm = (const uint16_t *)x + m * K;
            for (int64_t k = 0; k < K; k++) row[k] = bf16_to_f32(xm[k]);
        } else {
            memcpy(row, (const float *)x + m * K, sizeof(float) * (size_t)K);
        }
        float amax = 0.0f;
        for (int64_t k = 0; k < K; k++) { float a = fabsf(row[k]); if (a > amax) amax = a; }
        float s = (1.0f / (amax > 1e-5f ? amax : 1e-5f)) * 127.0f;
        for (int64_t k = 0; k < K; k++) {
            float q = nearbyintf(row[k] * s);
            q = q < -128.0f ? -128.0f : (q > 127.0f ? 127.0f : q);
            xq[m * K + k] = (int8_t)q;
        }
        scale[m] = s;
    }
    int status = 0;
    for (int i = 0; i < n && status == 0; i++) {
        const int64_t N = 4 * P[i];
        status = bitdistill_packed_int_mm(xq, M, K, packed[i], P[i], acc, nthreads);
        for (int64_t m = 0; m < M && status == 0; m++) {
            float denom = scale[m] * weight_scale[i];
            for (int64_t j = 0; j < N; j++) {
                float y = (float)acc[m * N + j] / denom;
                if (bias[i]) y = y + bias[i][j];
                if (x_bf16) ((uint16_t *)out[i])[m * N + j] = f32_to_bf16(y);
                else ((float *)out[i])[m * N + j] = y;
            }
        }
    }
    free(xq);
    free(scale);
    free(row);
    free(acc);
    return status;
}
