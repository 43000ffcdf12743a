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

/* Element i of a float32 (bf16 == 0) or bfloat16 array, as float32; store; round a float32 to the dtype. */
static inline float load_elem(const void *p, int64_t i, int bf16) {
    return bf16 ? bf16_to_f32(((const uint16_t *)p)[i]) : ((const float *)p)[i];
}

static inline void store_elem(void *p, int64_t i, float v, int bf16) {
    if (bf16) ((uint16_t *)p)[i] = f32_to_bf16(v);
    else ((float *)p)[i] = v;
}

static inline float round_to(float v, int bf16) { return bf16 ? bf16_to_f32(f32_to_bf16(v)) : v; }

/* Per-token int8 activation quantization of one float32 row, as torch evaluates it:
 * s = (1 / max(max|x|, 1e-5)) * 127, q = clamp(rint(x * s), -128, 127) (round half to even). Returns s. */
static float quantize_row(const float *row, int64_t K, int8_t *q) {
    float amax = 0.0f;
    for (int64_t k = 0; k < K; k++) { float a = fabsf(row[k]); if (a > amax) amax = a; }
    float s = (1.0f / (amax > 1e-5f ? amax : 1e-5f)) * 127.0f;
    for (int64_t k = 0; k < K; k++) {
        float v = nearbyintf(row[k] * s);
        q[k] = (int8_t)(v < -128.0f ? -128.0f : (v > 127.0f ? 127.0f : v));
    }
    return s;
}

/* One packed BitLinear: uint8 [P, K] codes, the per-tensor weight scale, float32 bias [4 P] or NULL. */
typedef struct {
    const uint8_t *packed;
    int64_t P;
    float scale;
    const float *bias;
} bd_linear;

/* The epilogue of a BitLinear, y = acc / (s * weight_scale) + bias in float32 (the reference's order),
 * for M tokens, written to out[m * ldo + j] as float32 rounded to the dtype. */
static void epilogue(const int32_t *acc, int64_t M, const float *xs, const bd_linear *l, float *out, int64_t ldo,
                     int bf16) {
    const int64_t N = 4 * l->P;
    for (int64_t m = 0; m < M; m++) {
        float denom = xs[m] * l->scale;
        for (int64_t j = 0; j < N; j++) {
            float y = (float)acc[m * N + j] / denom;
            if (l->bias) y = y + l->bias[j];
            out[m * ldo + j] = round_to(y, bf16);
        }
    }
}

/* Several BitLinear forwards that share one input (q/k/v, gate/up): the input [M, K] (float32, or bfloat16
 * when x_bf16) is quantized once, then weight i (packed[i]: uint8 [P[i], K], weight_scale[i], bias[i] float32
 * [4 P[i]] or NULL) writes out[i] [M, 4 P[i]] in the input's dtype. Each output equals the torch reference
 * (activation quantization and epilogue in float32, the product exact) followed by torch's cast to the dtype. */
int bitdistill_packed_linears(const void *x, int x_bf16, int64_t M, int64_t K, int n, const uint8_t *const *packed,
                              const int64_t *P, const float *weight_scale, const float *const *bias, void *const *out,
                              int nthreads) {
    int64_t max_n = 1;
    for (int i = 0; i < n; i++) max_n = 4 * P[i] > max_n ? 4 * P[i] : max_n;
    int8_t *xq = (int8_t *)malloc((size_t)(M * K > 0 ? M * K : 1));
    float *scale = (float *)malloc(sizeof(float) * (size_t)(M > 0 ? M : 1));
    float *row = (float *)malloc(sizeof(float) * (size_t)(K > 0 ? K : 1));
    int32_t *acc = (int32_t *)malloc(sizeof(int32_t) * (size_t)(M * max_n > 0 ? M * max_n : 1));
    float *y = (float *)malloc(sizeof(float) * (size_t)(M * max_n > 0 ? M * max_n : 1));
    if (xq == NULL || scale == NULL || row == NULL || acc == NULL || y == NULL) {
        free(xq); free(scale); free(row); free(acc); free(y);
        return 1;
    }
    for (int64_t m = 0; m < M; m++) {
        for (int64_t k = 0; k < K; k++) row[k] = load_elem(x, m * K + k, x_bf16);
        scale[m] = quantize_row(row, K, xq + m * K);
    }
    int status = 0;
    for (int i = 0; i < n && status == 0; i++) {
        const bd_linear l = {packed[i], P[i], weight_scale[i], bias[i]};
        const int64_t N = 4 * P[i];
        status = bitdistill_packed_int_mm(xq, M, K, l.packed, l.P, acc, nthreads);
        if (status) break;
        epilogue(acc, M, scale, &l, y, N, x_bf16);
        for (int64_t j = 0; j < M * N; j++) store_elem(out[i], j, y[j], x_bf16);
    }
    free(xq); free(scale); free(row); free(acc); free(y);
    return status;
}

int bitdistill_packed_linear_f32(const float *x, int64_t M, int64_t K, const uint8_t *packed, int64_t P,
                                 float weight_scale, const float *bias, float *out, int nthreads) {
    void *outs[1] = {out};
    return bitdistill_packed_linears(x, 0, M, K, 1, &packed, &P, &weight_scale, &bias, outs, nthreads);
}

/* ---------------------------------------------------------------------------------------------------------
 * A whole Llama-family decoder stack for a few tokens, batch 1 (bitdistill.cpu_ext.NativeDecoderStack).
 *
 * Every step is the model's own math in float32, rounded to the model's dtype wherever torch rounds it
 * (each RMSNorm output and weight product, each projection, each rotary product and sum, the attention
 * output, the activation and its product, each residual add), so a bfloat16 model's activations carry
 * bfloat16 values exactly as in the eager model. Reductions (the RMSNorm mean square, attention scores,
 * softmax) run in a different order than torch's kernels, so values can differ from the eager model in the
 * last float32 bits before rounding; the projections are exact given their inputs.
 * ------------------------------------------------------------------------------------------------------- */

typedef struct {
    const void *weight; /* [n] in the model dtype; NULL: no norm */
    float eps;
} bd_norm;

typedef struct {
    bd_norm input_norm, post_norm, q_norm, k_norm, attn_sub_norm, ffn_sub_norm;
    bd_linear qkv[3]; /* q, k, v; or one fused [q; k; v] projection */
    int32_t n_qkv;
    bd_linear o;
    bd_linear mlp_in[2]; /* gate, up; or one fused [gate; up] projection */
    int32_t n_mlp_in;
    bd_linear down;
    void *k_cache, *v_cache; /* [n_kv, max_len, head_dim] in the model dtype */
} bd_layer;

typedef struct {
    int64_t n_layers, hidden, n_heads, n_kv, head_dim, intermediate, rot, max_len;
    float scaling;
    int32_t bf16;
    int32_t act; /* 0: SiLU, 1: ReLU squared */
    const void *cos, *sin; /* [max_len, rot] in the model dtype */
    bd_norm final_norm;
    const bd_layer *layers;
} bd_model;

/* LlamaRMSNorm on one row: y = w * dtype(x * rsqrt(mean(x^2) + eps)), the product rounded to the dtype. */
static void rms_norm(const float *x, float *y, int64_t n, const bd_norm *norm, int bf16) {
    double ss = 0.0;
    for (int64_t i = 0; i < n; i++) ss += (double)x[i] * x[i];
    float r = 1.0f / sqrtf((float)(ss / (double)n) + norm->eps);
    for (int64_t i = 0; i < n; i++) y[i] = round_to(load_elem(norm->weight, i, bf16) * round_to(x[i] * r, bf16), bf16);
}

/* rms_norm of x [n] in place, through scratch [n]. */
static void norm_in_place(float *x, int64_t n, const bd_norm *norm, float *scratch, int bf16) {
    rms_norm(x, scratch, n, norm, bf16);
    memcpy(x, scratch, sizeof(float) * (size_t)n);
}

/* Linears sharing the input x [M, K]: output i goes to columns off_i.. of out (row stride ldo). */
static int shared_linears(const float *x, int64_t M, int64_t K, const bd_linear *ls, int n, float *out, int64_t ldo,
                          int8_t *xq, float *xs, int32_t *acc, int bf16, int nthreads) {
    for (int64_t m = 0; m < M; m++) xs[m] = quantize_row(x + m * K, K, xq + m * K);
    int64_t off = 0;
    for (int i = 0; i < n; i++) {
        if (bitdistill_packed_int_mm(xq, M, K, ls[i].packed, ls[i].P, acc, nthreads)) return 1;
        epilogue(acc, M, xs, &ls[i], out + off, ldo, bf16);
        off += 4 * ls[i].P;
    }
    return 0;
}

/* Rotate-half RoPE on the first `rot` features of one head vector x [D] at one position. */
static void rope(float *x, const void *cos, const void *sin, int64_t rot, int bf16) {
    const int64_t half = rot / 2;
    for (int64_t i = 0; i < half; i++) {
        float x1 = x[i], x2 = x[i + half];
        float a = round_to(x1 * load_elem(cos, i, bf16), bf16), b = round_to(-x2 * load_elem(sin, i, bf16), bf16);
        float c = round_to(x2 * load_elem(cos, i + half, bf16), bf16);
        float d = round_to(x1 * load_elem(sin, i + half, bf16), bf16);
        x[i] = round_to(a + b, bf16);
        x[i + half] = round_to(c + d, bf16);
    }
}

/* Causal attention of one head's query q [D] over cached positions 0..n-1 of one kv head; out [D]. */
static void attend(const float *q, const void *k_cache, const void *v_cache, int64_t n, int64_t D, float scaling,
                   float *scores, float *out, int bf16) {
    float mx = -INFINITY;
    for (int64_t j = 0; j < n; j++) {
        float s = 0.0f;
        for (int64_t d = 0; d < D; d++) s += q[d] * load_elem(k_cache, j * D + d, bf16);
        scores[j] = s * scaling;
        if (scores[j] > mx) mx = scores[j];
    }
    float total = 0.0f;
    for (int64_t j = 0; j < n; j++) { scores[j] = expf(scores[j] - mx); total += scores[j]; }
    for (int64_t d = 0; d < D; d++) out[d] = 0.0f;
    for (int64_t j = 0; j < n; j++) {
        float p = scores[j] / total;
        for (int64_t d = 0; d < D; d++) out[d] += p * load_elem(v_cache, j * D + d, bf16);
    }
    for (int64_t d = 0; d < D; d++) out[d] = round_to(out[d], bf16);
}

/* Run tokens h [T, hidden] (model dtype) at positions pos..pos+T-1 through every layer, writing their keys
 * and values into the caches; out [hidden] (model dtype) gets the final norm of the last token's state.
 * Returns 0, or 1 when scratch memory could not be allocated. */
int bitdistill_decode(const bd_model *m, const void *h_in, int64_t T, int64_t pos, void *out, int nthreads) {
    const int bf16 = m->bf16;
    const int64_t H = m->hidden, D = m->head_dim, QD = m->n_heads * D, KD = m->n_kv * D, I = m->intermediate;
    const int64_t QKV = QD + 2 * KD, group = m->n_heads / m->n_kv, widest_in = H > I ? (H > QD ? H : QD) : (I > QD ? I : QD);
    int64_t widest_out = QKV > 2 * I ? QKV : 2 * I;
    widest_out = widest_out > H ? widest_out : H;
    float *h = malloc(sizeof(float) * (size_t)(T * H)), *xn = malloc(sizeof(float) * (size_t)(T * widest_in));
    float *qkv = malloc(sizeof(float) * (size_t)(T * QKV)), *att = malloc(sizeof(float) * (size_t)(T * QD));
    float *mlp = malloc(sizeof(float) * (size_t)(T * 2 * I)), *tmp = malloc(sizeof(float) * (size_t)(T * H));
    float *scores = malloc(sizeof(float) * (size_t)m->max_len), *xs = malloc(sizeof(float) * (size_t)T);
    float *row = malloc(sizeof(float) * (size_t)widest_in);
    int8_t *xq = malloc((size_t)(T * widest_in));
    int32_t *acc = malloc(sizeof(int32_t) * (size_t)(T * widest_out));
    int status = 1;
    if (!h || !xn || !qkv || !att || !mlp || !tmp || !scores || !xs || !row || !xq || !acc) goto done;
    for (int64_t i = 0; i < T * H; i++) h[i] = load_elem(h_in, i, bf16);
    for (int64_t li = 0; li < m->n_layers; li++) {
        const bd_layer *L = &m->layers[li];
        /* attention */
        for (int64_t t = 0; t < T; t++) rms_norm(h + t * H, xn + t * H, H, &L->input_norm, bf16);
        if (shared_linears(xn, T, H, L->qkv, L->n_qkv, qkv, QKV, xq, xs, acc, bf16, nthreads)) goto done;
        for (int64_t t = 0; t < T; t++) {
            float *q = qkv + t * QKV, *k = q + QD, *v = k + KD;
            const int64_t p = pos + t;
            const char *cs = (const char *)m->cos + p * m->rot * (bf16 ? 2 : 4);
            const char *sn = (const char *)m->sin + p * m->rot * (bf16 ? 2 : 4);
            for (int64_t hd = 0; hd < m->n_heads; hd++) {
                if (L->q_norm.weight) norm_in_place(q + hd * D, D, &L->q_norm, row, bf16);
                rope(q + hd * D, cs, sn, m->rot, bf16);
            }
            for (int64_t hd = 0; hd < m->n_kv; hd++) {
                if (L->k_norm.weight) norm_in_place(k + hd * D, D, &L->k_norm, row, bf16);
                rope(k + hd * D, cs, sn, m->rot, bf16);
                for (int64_t d = 0; d < D; d++) {
                    store_elem(L->k_cache, (hd * m->max_len + p) * D + d, k[hd * D + d], bf16);
                    store_elem(L->v_cache, (hd * m->max_len + p) * D + d, v[hd * D + d], bf16);
                }
            }
        }
        for (int64_t t = 0; t < T; t++) {
            for (int64_t hd = 0; hd < m->n_heads; hd++) {
                const int64_t kv = hd / group, off = (kv * m->max_len) * D * (bf16 ? 2 : 4);
                attend(qkv + t * QKV + hd * D, (const char *)L->k_cache + off, (const char *)L->v_cache + off,
                       pos + t + 1, D, m->scaling, scores, att + t * QD + hd * D, bf16);
            }
            if (L->attn_sub_norm.weight) norm_in_place(att + t * QD, QD, &L->attn_sub_norm, row, bf16);
        }
        if (shared_linears(att, T, QD, &L->o, 1, tmp, H, xq, xs, acc, bf16, nthreads)) goto done;
        for (int64_t i = 0; i < T * H; i++) h[i] = round_to(h[i] + tmp[i], bf16);
        /* MLP */
        for (int64_t t = 0; t < T; t++) rms_norm(h + t * H, xn + t * H, H, &L->post_norm, bf16);
        if (shared_linears(xn, T, H, L->mlp_in, L->n_mlp_in, mlp, 2 * I, xq, xs, acc, bf16, nthreads)) goto done;
        for (int64_t t = 0; t < T; t++) {
            const float *gate = mlp + t * 2 * I, *up = gate + I;
            float *mid = xn + t * I;
            for (int64_t j = 0; j < I; j++) {
                float g = gate[j], a;
                if (m->act == 0) a = round_to(g / (1.0f + expf(-g)), bf16);
                else { float r = g > 0.0f ? g : 0.0f; a = round_to(r * r, bf16); }
                mid[j] = round_to(a * up[j], bf16);
            }
            if (L->ffn_sub_norm.weight) norm_in_place(mid, I, &L->ffn_sub_norm, row, bf16);
        }
        if (shared_linears(xn, T, I, &L->down, 1, tmp, H, xq, xs, acc, bf16, nthreads)) goto done;
        for (int64_t i = 0; i < T * H; i++) h[i] = round_to(h[i] + tmp[i], bf16);
    }
    rms_norm(h + (T - 1) * H, tmp, H, &m->final_norm, bf16);
    for (int64_t i = 0; i < H; i++) store_elem(out, i, tmp[i], bf16);
    status = 0;
done:
    free(h); free(xn); free(qkv); free(att); free(mlp); free(tmp); free(scores); free(xs); free(row); free(xq); free(acc);
    return status;
}
