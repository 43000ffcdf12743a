/* A whole Llama-family decoder stack for B sequences of T new tokens (bitdistill.cpu_ext.NativeDecoderStack).
 *
 * Every step is the model's own math in float32, rounded to the model's dtype wherever torch rounds it
 * (each RMSNorm output and weight product, each projection, each rotary product and sum, the attention
 * output, the activation and its product, each residual add), so a bfloat16 model's activations carry
 * bfloat16 values exactly as in the eager model. Reductions (the RMSNorm mean square, attention scores,
 * softmax) run in a different order than torch's kernels, so values can differ from the eager model in the
 * last float32 bits before rounding; the projections are exact given their inputs.
 *
 * One OpenMP parallel region per chunk of tokens runs every layer: the projections split over packed rows,
 * rotary and attention over (token, head) pairs, norms over tokens, the head over vocabulary rows. Tokens go
 * through the stack in chunks of at most max_chunk per sequence (prefill as GEMM), so the scratch, allocated
 * once by the caller (bitdistill_decode_scratch_bytes), has a fixed size; nothing is allocated per call.
 */
#include "bitdistill_cpu.h"

#include <stddef.h>
#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define BD_FLOAT_AVX512 1
#endif
#ifdef _OPENMP
#include <omp.h>
#endif

static int thread_id(void) {
#ifdef _OPENMP
    return omp_get_thread_num();
#else
    return 0;
#endif
}

/* Scratch of one decode call, carved from the caller's buffer (64-byte aligned pieces). */
typedef struct {
    float *h, *xn, *qkv, *att, *mlp, *tmp, *xs, *scores, *row, *head_x, *head_bs;
    int32_t *sx;
    int8_t *xq, *head_qs;
    uint8_t *head_qa;
} bd_scratch;

static int64_t widest_in(const bd_model *m) {
    const int64_t QD = m->n_heads * m->head_dim, I = m->intermediate, H = m->hidden;
    int64_t w = H > I ? H : I;
    return w > QD ? w : QD;
}

/* Lay the scratch out from base (NULL: only measure); returns the bytes it spans. */
static int64_t carve(const bd_model *m, int nthreads, char *base, bd_scratch *s) {
    const int64_t M = m->max_batch * m->max_chunk, H = m->hidden, QD = m->n_heads * m->head_dim;
    const int64_t QKV = QD + 2 * m->n_kv * m->head_dim, W = widest_in(m), Kp = m->head.Kp;
    int64_t off = 0;
#define BD_PIECE(field, type, count)                                        \
    do {                                                                    \
        if (base) s->field = (type *)(base + off);                          \
        off += ((int64_t)sizeof(type) * (count) + 63) / 64 * 64;            \
    } while (0)
    BD_PIECE(h, float, M * H);
    BD_PIECE(xn, float, M * W);
    BD_PIECE(qkv, float, M * QKV);
    BD_PIECE(att, float, M * QD);
    BD_PIECE(mlp, float, M * 2 * m->intermediate);
    BD_PIECE(tmp, float, M * H);
    BD_PIECE(xs, float, M);
    BD_PIECE(sx, int32_t, M);
    BD_PIECE(xq, int8_t, M * W);
    BD_PIECE(scores, float, nthreads * m->max_len * (m->n_heads / m->n_kv));
    BD_PIECE(row, float, nthreads * W);
    BD_PIECE(head_x, float, M * Kp);
    BD_PIECE(head_bs, float, M * (Kp / BD_HEAD_BLOCK));
    BD_PIECE(head_qa, uint8_t, M * Kp);
    BD_PIECE(head_qs, int8_t, M * Kp);
#undef BD_PIECE
    return off;
}

int64_t bitdistill_decode_scratch_bytes(const bd_model *m, int nthreads) {
    return carve(m, nthreads < 1 ? 1 : nthreads, NULL, NULL) + 64;
}

/* LlamaRMSNorm on one row: y = w * dtype(x * rsqrt(mean(x^2) + eps)), the product rounded to the dtype. */
BD_CLONES static void rms_norm(const float *x, float *y, int64_t n, const bd_norm *norm, int bf16) {
    double part[8] = {0}, ss = 0.0; /* 8 partial sums: the loop vectorizes */
    int64_t i0 = 0;
    for (; i0 + 8 <= n; i0 += 8)
        for (int i = 0; i < 8; i++) part[i] += (double)x[i0 + i] * x[i0 + i];
    for (; i0 < n; i0++) ss += (double)x[i0] * x[i0];
    for (int i = 0; i < 8; i++) ss += part[i];
    float r = 1.0f / sqrtf((float)(ss / (double)n) + norm->eps);
    for (int64_t i = 0; i < n; i++) y[i] = bd_round(bd_load(norm->weight, i, bf16) * bd_round(x[i] * r, bf16), bf16);
}

static void norm_in_place(float *x, int64_t n, const bd_norm *norm, float *scratch, int bf16) {
    rms_norm(x, scratch, n, norm, bf16);
    memcpy(x, scratch, sizeof(float) * (size_t)n);
}

/* Rotate-half RoPE on the first `rot` features of one head vector x [D] at one position. */
BD_CLONES static void rope(float *x, const void *cos, const void *sin, int64_t rot, int bf16) {
    const int64_t half = rot / 2;
    for (int64_t i = 0; i < half; i++) {
        float x1 = x[i], x2 = x[i + half];
        float a = bd_round(x1 * bd_load(cos, i, bf16), bf16), b = bd_round(-x2 * bd_load(sin, i, bf16), bf16);
        float c = bd_round(x2 * bd_load(cos, i + half, bf16), bf16);
        float d = bd_round(x1 * bd_load(sin, i + half, bf16), bf16);
        x[i] = bd_round(a + b, bf16);
        x[i + half] = bd_round(c + d, bf16);
    }
}

/* q . k for float32 rows of D: 16 partial sums added as a tree (vectorizable; another summation order than a
 * plain loop, as torch's kernels also use). */
static inline float dot(const float *q, const float *k, int64_t D) {
    float part[16] = {0};
    int64_t d = 0;
    for (; d + 16 <= D; d += 16)
        for (int i = 0; i < 16; i++) part[i] += q[d + i] * k[d + i];
    for (int w = 8; w >= 1; w /= 2)  /* a chain of 16 dependent adds costs more than the dot product */
        for (int i = 0; i < w; i++) part[i] += part[i + w];
    float s = part[0];
    for (; d < D; d++) s += q[d] * k[d];
    return s;
}

/* Row j of a key or value cache [*, D] as float32. */
static inline void cache_row(const void *cache, int64_t j, int64_t D, int bf16, float *row) {
    if (bf16) {
        const uint16_t *b = (const uint16_t *)cache + j * D;
        for (int64_t d = 0; d < D; d++) row[d] = bd_bf16_to_f32(b[d]);
    } else {
        memcpy(row, (const float *)cache + j * D, sizeof(float) * (size_t)D);
    }
}

/* Prefetch key row kj and value row vj of a cache of rows of row_bytes (the keys run ahead of the key pass; the values
 * are wanted by the value pass right after it). */
static inline void prefetch_kv(const void *k_cache, const void *v_cache, int64_t kj, int64_t vj, int64_t row_bytes) {
    for (int64_t b = 0; b < row_bytes; b += 64) {
        __builtin_prefetch((const char *)k_cache + kj * row_bytes + b);
        __builtin_prefetch((const char *)v_cache + vj * row_bytes + b);
    }
}

#ifdef BD_FLOAT_AVX512
/* The float code's AVX-512 (attention, the greedy choice's maximum), picked by the CPU like the BD_CLONES code, not by
 * bitdistill_set_isa: the attention (a float reduction) stays the same whichever integer kernels a test forces, so
 * the stack's states can be compared bit for bit across them. */
static int float_avx512;
__attribute__((constructor)) static void init_float_avx512(void) {
    __builtin_cpu_init();
    float_avx512 = __builtin_cpu_supports("avx512f");
}

/* Cache elements i..i+15 of a key or value cache (bfloat16 or float32) as float32. */
__attribute__((target("avx512f"))) static inline __m512 load16_ps(const void *cache, int64_t i, int bf16) {
    return bf16 ? _mm512_castsi512_ps(_mm512_slli_epi32(
                      _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)((const uint16_t *)cache + i))), 16))
                : _mm512_loadu_ps((const float *)cache + i);
}

/* The key pass of attend in AVX-512 for D a multiple of 16 up to 256: keys in blocks of 16, each widened once into
 * kb (L1), then per query head 16 dot products as 16-lane partial sums and one transposed reduction (another
 * summation order than dot's, as torch's kernels also differ). scores[g n + j] = (q_g . k_j) * scaling. */
__attribute__((target("avx512f"))) static void key_scores_avx512(const float *q, int64_t G, const void *k_cache,
                                                                  const void *v_cache, int64_t n, int64_t D,
                                                                  float scaling, float *scores, int bf16) {
    float kb[16 * 256];
    const int64_t C = D / 16, row_bytes = D * (bf16 ? 2 : 4);
    for (int64_t j0 = 0; j0 < n; j0 += 16) {
        const int nb = n - j0 < 16 ? (int)(n - j0) : 16;
        for (int jj = 0; jj < nb; jj++) {
            const int64_t j = j0 + jj;
            prefetch_kv(k_cache, v_cache, j + 16, j, row_bytes);
            for (int64_t c = 0; c < C; c++) {
                _mm512_storeu_ps(kb + jj * D + 16 * c, load16_ps(k_cache, j * D + 16 * c, bf16));
            }
        }
        for (int64_t g = 0; g < G; g++) {
            __m512 part[16];
            for (int jj = 0; jj < 16; jj++) {
                __m512 acc = _mm512_setzero_ps();
                if (jj < nb)
                    for (int64_t c = 0; c < C; c++)
                        acc = _mm512_fmadd_ps(_mm512_loadu_ps(q + g * D + 16 * c), _mm512_loadu_ps(kb + jj * D + 16 * c), acc);
                part[jj] = acc;
            }
            const __m512 s = _mm512_mul_ps(bd_hsum16_ps(part), _mm512_set1_ps(scaling));
            _mm512_mask_storeu_ps(scores + g * n + j0, (__mmask16)((1u << nb) - 1), s);
        }
    }
}

/* The value pass of attend in AVX-512 for D = 16 C: out[g] = sum_j p[g, j] v_j with the C accumulators of a head in
 * registers (C a constant once inlined), each value row widened from the cache as it is read. */
__attribute__((target("avx512f"), always_inline)) static inline void values_avx512_c(const float *p, int64_t G,
                                                                                     const void *v_cache, int64_t n,
                                                                                     float *out, int bf16, const int C) {
    const int64_t D = 16 * C;
    for (int64_t g = 0; g < G; g++) {
        __m512 acc[8];
#pragma GCC unroll 8
        for (int c = 0; c < C; c++) acc[c] = _mm512_setzero_ps();
        for (int64_t j = 0; j < n; j++) {
            const __m512 pj = _mm512_set1_ps(p[g * n + j]);
#pragma GCC unroll 8
            for (int c = 0; c < C; c++) {
                acc[c] = _mm512_fmadd_ps(pj, load16_ps(v_cache, j * D + 16 * c, bf16), acc[c]);
            }
        }
#pragma GCC unroll 8
        for (int c = 0; c < C; c++) _mm512_storeu_ps(out + g * D + 16 * c, acc[c]);
    }
}

/* max_and_nan over the first V / 16 * 16 floats of x (max_ps keeps the running maximum where x is NaN); returns how
 * many it covered. */
__attribute__((target("avx512f"))) static int64_t max_and_nan_avx512(const float *x, int64_t V, float *mx, int *nan) {
    __m512 m = _mm512_set1_ps(-INFINITY);
    __mmask16 n = 0;
    int64_t v = 0;
    for (; v + 16 <= V; v += 16) {
        const __m512 y = _mm512_loadu_ps(x + v);
        n |= _mm512_cmp_ps_mask(y, y, _CMP_UNORD_Q);
        m = _mm512_max_ps(y, m);
    }
    *mx = _mm512_reduce_max_ps(m);
    *nan = n != 0;
    return v;
}

/* values_avx512_c for head dims 16, 32, 64 and 128; 0 for others (the caller's C loop runs). */
__attribute__((target("avx512f"))) static int values_avx512(const float *p, int64_t G, const void *v_cache, int64_t n,
                                                              int64_t D, float *out, int bf16) {
    switch (D) {
    case 16: values_avx512_c(p, G, v_cache, n, out, bf16, 1); return 1;
    case 32: values_avx512_c(p, G, v_cache, n, out, bf16, 2); return 1;
    case 64: values_avx512_c(p, G, v_cache, n, out, bf16, 4); return 1;
    case 128: values_avx512_c(p, G, v_cache, n, out, bf16, 8); return 1;
    default: return 0;
    }
}
#endif

/* Causal attention of the G query heads q [G, D] that share one kv head, over its cached positions 0..n-1: out [G, D].
 * Each key and value row is read (and widened) once for the G heads. scores: G n floats; row: D floats. */
BD_CLONES static void attend(const float *q, int64_t G, const void *k_cache, const void *v_cache, int64_t n, int64_t D,
                             float scaling, float *scores, float *row, float *out, int bf16) {
    const int64_t row_bytes = D * (bf16 ? 2 : 4);
#ifdef BD_FLOAT_AVX512
    if (float_avx512 && D % 16 == 0 && D <= 256)
        key_scores_avx512(q, G, k_cache, v_cache, n, D, scaling, scores, bf16);
    else
#endif
        for (int64_t j = 0; j < n; j++) {
            prefetch_kv(k_cache, v_cache, j + 8, j, row_bytes);
            cache_row(k_cache, j, D, bf16, row);
            for (int64_t g = 0; g < G; g++) scores[g * n + j] = dot(q + g * D, row, D) * scaling;
        }
    for (int64_t g = 0; g < G; g++) {
        float *sc = scores + g * n, mx = -INFINITY, part[16] = {0}, total = 0.0f;
        for (int64_t j = 0; j < n; j++) mx = sc[j] > mx ? sc[j] : mx;
        for (int64_t j = 0; j < n; j++) sc[j] = bd_exp(sc[j] - mx);
        int64_t j0 = 0;
        for (; j0 + 16 <= n; j0 += 16)
            for (int i = 0; i < 16; i++) part[i] += sc[j0 + i];
        for (; j0 < n; j0++) total += sc[j0];
        for (int i = 0; i < 16; i++) total += part[i];
        for (int64_t j = 0; j < n; j++) sc[j] = sc[j] / total;
    }
#ifdef BD_FLOAT_AVX512
    if (!(float_avx512 && values_avx512(scores, G, v_cache, n, D, out, bf16)))
#endif
    {
        for (int64_t i = 0; i < G * D; i++) out[i] = 0.0f;
        for (int64_t j = 0; j < n; j++) {
            cache_row(v_cache, j, D, bf16, row);
            for (int64_t g = 0; g < G; g++) {
                const float p = scores[g * n + j];
                for (int64_t d = 0; d < D; d++) out[g * D + d] += p * row[d];
            }
        }
    }
    for (int64_t i = 0; i < G * D; i++) out[i] = bd_round(out[i], bf16);
}

/* The MLP's act(gate) * up for one token: gate, up = g [0:I], g [I:2I]; out [I]. */
BD_CLONES static void gated_act(const float *g, int64_t I, int act, float *out, int bf16) {
    if (act == 0)
        for (int64_t j = 0; j < I; j++) out[j] = bd_round(bd_round(g[j] / (1.0f + bd_exp(-g[j])), bf16) * g[I + j], bf16);
    else
        for (int64_t j = 0; j < I; j++) {
            const float z = g[j] > 0.0f ? g[j] : 0.0f;
            out[j] = bd_round(bd_round(z * z, bf16) * g[I + j], bf16);
        }
}

/* Add the residual branch d (NULL: none) to the rows of x [M, K], normalize them into y (norm may have no
 * weight: only quantize) and quantize them for the next linears: one pass, one barrier. */
static void norm_quantize(const bd_model *m, float *x, const float *d, float *y, int64_t M, int64_t K,
                          const bd_norm *norm, const bd_scratch *s) {
#pragma omp for schedule(static)
    for (int64_t r = 0; r < M; r++) {
        float *src = x + r * K;
        if (d)
            for (int64_t i = 0; i < K; i++) src[i] = bd_round(src[i] + d[r * K + i], m->bf16);
        if (norm->weight) {
            rms_norm(src, y + r * K, K, norm, m->bf16);
            src = y + r * K;
        }
        s->xs[r] = bd_quantize_row(src, K, s->xq + r * K, &s->sx[r]);
    }
}

static void residual(float *h, const float *d, int64_t M, int64_t H, int bf16) {
#pragma omp for schedule(static)
    for (int64_t r = 0; r < M; r++)
        for (int64_t i = r * H; i < (r + 1) * H; i++) h[i] = bd_round(h[i] + d[i], bf16);
}

/* Head hd of row r (token p = pos0 + r % Tc of sequence r / Tc): a query head (hd < n_heads) gets its norm and
 * rotary; a kv head (n_heads + kv) its norm and rotary, and its key and value go to the cache at position p. */
static void position_head(const bd_model *m, const bd_layer *L, const bd_scratch *s, int64_t r, int64_t hd,
                          int64_t Tc, int64_t pos0, float *row) {
    const int bf16 = m->bf16;
    const int64_t D = m->head_dim, QD = m->n_heads * D, KD = m->n_kv * D, b = r / Tc, p = pos0 + r % Tc;
    const size_t esz = bf16 ? 2 : 4;
    const char *cs = (const char *)m->cos + p * m->rot * esz, *sn = (const char *)m->sin + p * m->rot * esz;
    float *q = s->qkv + r * (QD + 2 * KD);
    if (hd < m->n_heads) {
        if (L->q_norm.weight) norm_in_place(q + hd * D, D, &L->q_norm, row, bf16);
        rope(q + hd * D, cs, sn, m->rot, bf16);
        return;
    }
    const int64_t kv = hd - m->n_heads;
    float *k = q + QD + kv * D, *v = q + QD + KD + kv * D;
    if (L->k_norm.weight) norm_in_place(k, D, &L->k_norm, row, bf16);
    rope(k, cs, sn, m->rot, bf16);
    const int64_t base = ((b * m->n_kv + kv) * m->max_len + p) * D;
    for (int64_t d = 0; d < D; d++) {
        bd_store(L->k_cache, base + d, k[d], bf16);
        bd_store(L->v_cache, base + d, v[d], bf16);
    }
}

/* The query heads of kv group kv in row r attend over the cached positions 0..p of their sequence. */
static void attend_group(const bd_model *m, const bd_layer *L, const bd_scratch *s, int64_t r, int64_t kv, int64_t Tc,
                         int64_t pos0, float *scores, float *row) {
    const int64_t D = m->head_dim, QD = m->n_heads * D, QKV = QD + 2 * m->n_kv * D, group = m->n_heads / m->n_kv;
    const int64_t b = r / Tc, p = pos0 + r % Tc, q0 = kv * group * D;
    const int64_t off = (b * m->n_kv + kv) * m->max_len * D * (int64_t)(m->bf16 ? 2 : 4);
    attend(s->qkv + r * QKV + q0, group, (const char *)L->k_cache + off, (const char *)L->v_cache + off, p + 1, D,
           m->scaling, scores, row, s->att + r * QD + q0, m->bf16);
}

/* One chunk: tokens t0..t0+Tc-1 of every sequence (rows b * Tc + t), run by every thread of a parallel region. */
static void run_chunk(const bd_model *m, const bd_scratch *s, int64_t B, int64_t Tc, int64_t pos0, const int bf16) {
    const int64_t H = m->hidden, D = m->head_dim, QD = m->n_heads * D, KD = m->n_kv * D, I = m->intermediate;
    const int64_t QKV = QD + 2 * KD, group = m->n_heads / m->n_kv, M = B * Tc, NH = m->n_heads + m->n_kv;
    const bd_norm none = {NULL, 0.0f};
    float *row = s->row + thread_id() * widest_in(m), *scores = s->scores + thread_id() * m->max_len * group;
    for (int64_t li = 0; li < m->n_layers; li++) {
        const bd_layer *L = &m->layers[li];
        /* attention */
        norm_quantize(m, s->h, li > 0 ? s->tmp : NULL, s->xn, M, H, &L->input_norm, s);
        {
            void *outs[3];
            int64_t ldo[3], off = 0;
            for (int i = 0; i < L->n_qkv; i++) { outs[i] = s->qkv + off; ldo[i] = QKV; off += 4 * L->qkv[i].P; }
            bd_linears(s->xq, s->xs, s->sx, M, H, L->qkv, L->n_qkv, outs, ldo, bf16, 0);
        }
        if (Tc == 1) { /* decode: each (sequence, kv group) unit ropes its heads, caches its key and attends */
#pragma omp for schedule(static)
            for (int64_t u = 0; u < M * m->n_kv; u++) {
                const int64_t r = u / m->n_kv, kv = u % m->n_kv;
                for (int64_t g = 0; g < group; g++) position_head(m, L, s, r, kv * group + g, Tc, pos0, row);
                position_head(m, L, s, r, m->n_heads + kv, Tc, pos0, row);
                attend_group(m, L, s, r, kv, Tc, pos0, scores, row);
            }
        } else { /* a chunk of a prompt: every key of the chunk is cached before any token attends */
#pragma omp for schedule(static)
            for (int64_t u = 0; u < M * NH; u++) position_head(m, L, s, u / NH, u % NH, Tc, pos0, row);
#pragma omp for schedule(static)
            for (int64_t u = 0; u < M * m->n_kv; u++) attend_group(m, L, s, u / m->n_kv, u % m->n_kv, Tc, pos0, scores, row);
        }
        norm_quantize(m, s->att, NULL, s->att, M, QD, L->attn_sub_norm.weight ? &L->attn_sub_norm : &none, s);
        {
            void *outs[1] = {s->tmp};
            int64_t ldo[1] = {H};
            bd_linears(s->xq, s->xs, s->sx, M, QD, &L->o, 1, outs, ldo, bf16, 0);
        }
        /* MLP */
        norm_quantize(m, s->h, s->tmp, s->xn, M, H, &L->post_norm, s);
        {
            void *outs[2] = {s->mlp, s->mlp + (L->n_mlp_in == 2 ? I : 0)};
            int64_t ldo[2] = {2 * I, 2 * I};
            bd_linears(s->xq, s->xs, s->sx, M, H, L->mlp_in, L->n_mlp_in, outs, ldo, bf16, 0);
        }
#pragma omp for schedule(static)
        for (int64_t r = 0; r < M; r++) {
            float *mid = s->xn + r * I;
            gated_act(s->mlp + r * 2 * I, I, m->act, mid, bf16);
            if (L->ffn_sub_norm.weight) norm_in_place(mid, I, &L->ffn_sub_norm, row, bf16);
            s->xs[r] = bd_quantize_row(mid, I, s->xq + r * I, &s->sx[r]);
        }
        {
            void *outs[1] = {s->tmp};
            int64_t ldo[1] = {H};
            bd_linears(s->xq, s->xs, s->sx, M, I, &L->down, 1, outs, ldo, bf16, 0);
        }
    }
    residual(s->h, s->tmp, M, H, bf16); /* the last layer's; each other one is added by the next layer's norm */
}

/* Run h_in [B, T, hidden] (model dtype; B sequences of T new tokens at positions pos..pos+T-1, sequence b in
 * cache slot b) through every layer, writing keys and values into the caches. With all_positions the final norm
 * of every token goes to out_h [B, T, hidden] (model dtype) and, when the model has a native head, its logits
 * to logits [B, T, V] (float32); otherwise only the last token's, out_h [B, hidden] and logits [B, V].
 * scratch: bitdistill_decode_scratch_bytes(m, scratch_threads) bytes, 64-byte aligned. Returns 0, or 1 when
 * the arguments exceed the sizes the model and scratch were made for. */
int bitdistill_decode(const bd_model *m, void *scratch, int scratch_threads, const void *h_in, int64_t B, int64_t T,
                      int64_t pos, int all_positions, void *out_h, float *logits, int nthreads) {
    const int bf16 = m->bf16;
    const int64_t H = m->hidden, V = m->head.V, Kp = m->head.Kp, nb = Kp / BD_HEAD_BLOCK;
    if (B < 1 || B > m->max_batch || T < 1 || pos < 0 || pos + T > m->max_len) return 1;
    if (nthreads > scratch_threads) nthreads = scratch_threads;
    if (nthreads < 1) nthreads = 1;
    bd_scratch s;
    carve(m, scratch_threads, (char *)scratch, &s);
    for (int64_t c0 = 0; c0 < T; c0 += m->max_chunk) {
        const int64_t Tc = T - c0 < m->max_chunk ? T - c0 : m->max_chunk, M = B * Tc;
        const int final = all_positions || c0 + Tc == T;
        const int64_t n_out = all_positions ? M : B;
#pragma omp parallel num_threads(nthreads)
        {
#pragma omp for schedule(static)
            for (int64_t r = 0; r < M; r++) {
                const int64_t src = (r / Tc) * T + c0 + r % Tc;
                for (int64_t i = 0; i < H; i++) s.h[r * H + i] = bd_load(h_in, src * H + i, bf16);
            }
            run_chunk(m, &s, B, Tc, pos + c0, bf16);
            if (final) {
#pragma omp for schedule(static)
                for (int64_t o = 0; o < n_out; o++) {
                    const int64_t r = all_positions ? o : o * Tc + Tc - 1, b = r / Tc;
                    const int64_t dst = all_positions ? b * T + c0 + r % Tc : b;
                    float *y = s.tmp + r * H;
                    rms_norm(s.h + r * H, y, H, &m->final_norm, bf16);
                    for (int64_t i = 0; i < H; i++) bd_store(out_h, dst * H + i, y[i], bf16);
                    if (m->head.w && logits) {
                        float *xp = s.head_x + o * Kp;
                        for (int64_t i = 0; i < Kp; i++) xp[i] = i < H ? y[i] : 0.0f;
                        bd_head_quantize(xp, 1, Kp, s.head_qa + o * Kp, s.head_qs + o * Kp, s.head_bs + o * nb);
                    }
                }
                if (m->head.w && logits) {
                    if (all_positions) {
                        for (int64_t b = 0; b < B; b++)
                            bd_head_logits(&m->head, s.head_qa + b * Tc * Kp, s.head_qs + b * Tc * Kp,
                                           s.head_bs + b * Tc * nb, Tc, logits + (b * T + c0) * V, V);
                    } else {
                        bd_head_logits(&m->head, s.head_qa, s.head_qs, s.head_bs, B, logits, V);
                    }
                }
            }
        }
    }
    return 0;
}

/* The maximum of x [V] ignoring NaNs (-inf for none), and whether x holds a NaN. */
static float max_and_nan(const float *x, int64_t V, int *any_nan) {
    float mx = -INFINITY;
    int nan = 0;
    int64_t v = 0;
#ifdef BD_FLOAT_AVX512
    if (float_avx512) v = max_and_nan_avx512(x, V, &mx, &nan);
#endif
    for (; v < V; v++) {
        nan |= x[v] != x[v];
        mx = x[v] > mx ? x[v] : mx;
    }
    *any_nan = nan;
    return mx;
}

/* The greedy token of each row of logits [B, V] (float32) as torch picks it from the logits rounded to the model's
 * dtype (bf16): the index of the maximum, the first of equal maxima, or the first NaN where a row has one (torch's
 * argmax treats NaN as the largest value). Rounding to bfloat16 keeps order, so the rounded maximum is the rounded
 * maximum of the floats; then a scan for the first index that rounds to it, 16 lanes at a time (vectorized). */
BD_CLONES void bitdistill_greedy(const float *logits, int64_t B, int64_t V, int bf16, int64_t *out) {
    for (int64_t b = 0; b < B; b++) {
        const float *x = logits + b * V;
        int any_nan;
        const float mx = bd_round(max_and_nan(x, V, &any_nan), bf16);
        int64_t i = 0;
        for (; i + 16 <= V; i += 16) { /* the first block holding the index (NaN: a NaN; else the rounded maximum) */
            int hit = 0;
            for (int j = 0; j < 16; j++) {
                const float y = x[i + j];
                hit |= any_nan ? y != y : bd_round(y, bf16) == mx;
            }
            if (hit) break;
        }
        while (i < V - 1 && !(any_nan ? x[i] != x[i] : bd_round(x[i], bf16) == mx)) i++;
        out[b] = i;
    }
}

/* Row id of the embedding table embed [n_embed, H] (model dtype) into h (model dtype); 0, or 1 for an id outside it. */
static int embed_row(const void *embed, int64_t n_embed, int64_t H, int64_t id, int bf16, void *h) {
    if (id < 0 || id >= n_embed) return 1;
    const size_t row = (size_t)H * (bf16 ? 2 : 4);
    memcpy(h, (const char *)embed + (size_t)id * row, row);
    return 0;
}

/* Greedy generation in one call, the steps of FastDecoder.generate without a return to Python between tokens: the
 * prompts [B, T] (token ids) are embedded from embed [n_embed, hidden] (model dtype) and run through the stack at
 * positions 0..T-1, then each step's greedy token (bitdistill_greedy over the head's logits) is written to
 * tokens [B, max_new] and run at the next position. With eos >= 0, a sequence that has produced eos is continued
 * with it, and generation stops once every sequence has. h_buf holds B T hidden values of the model dtype, out_h
 * B hidden, logits B V floats. Returns the number of tokens generated (0..max_new; 0 only for max_new 0), -1 when
 * the sizes exceed the model's or it has no native head, -2 for a token id outside the embedding. */
int64_t bitdistill_generate(const bd_model *m, void *scratch, int scratch_threads, const void *embed, int64_t n_embed,
                            const int64_t *prompt, int64_t B, int64_t T, int64_t max_new, int64_t eos, int64_t *tokens,
                            void *h_buf, void *out_h, float *logits, int nthreads) {
    const int bf16 = m->bf16;
    const int64_t H = m->hidden, V = m->head.V;
    const size_t row = (size_t)H * (bf16 ? 2 : 4);
    if (!m->head.w || max_new < 0 || T < 1 || B < 1 || B > m->max_batch || T + max_new > m->max_len) return -1;
    for (int64_t i = 0; i < B * T; i++)
        if (embed_row(embed, n_embed, H, prompt[i], bf16, (char *)h_buf + i * row)) return -2;
    if (bitdistill_decode(m, scratch, scratch_threads, h_buf, B, T, 0, 0, out_h, logits, nthreads)) return -1;
    char done[B];
    memset(done, 0, (size_t)B);
    for (int64_t n = 0; n < max_new; n++) {
        int64_t tok[B];
        int all_done = 1;
        bitdistill_greedy(logits, B, V, bf16, tok);
        for (int64_t b = 0; b < B; b++) {
            if (eos >= 0) {
                if (done[b]) tok[b] = eos;
                done[b] |= tok[b] == eos;
                all_done &= done[b];
            }
            tokens[b * max_new + n] = tok[b];
        }
        if (n + 1 == max_new || (eos >= 0 && all_done)) return n + 1;
        for (int64_t b = 0; b < B; b++)
            if (embed_row(embed, n_embed, H, tok[b], bf16, (char *)h_buf + b * row)) return -2;
        if (bitdistill_decode(m, scratch, scratch_threads, h_buf, B, 1, T + n, 0, out_h, logits, nthreads)) return -1;
    }
    return 0;
}

/* Sizes and offsets of the structs cpu_ext.py mirrors with ctypes, in a fixed order: for each struct its size,
 * then the offset of each field in declaration order. Writes at most n values; returns how many there are. */
int64_t bitdistill_layout(int64_t *out, int64_t n) {
    const int64_t v[] = {
        sizeof(bd_linear), offsetof(bd_linear, packed), offsetof(bd_linear, P), offsetof(bd_linear, scale),
        offsetof(bd_linear, bias), offsetof(bd_linear, row_scale),
        sizeof(bd_norm), offsetof(bd_norm, weight), offsetof(bd_norm, eps),
        sizeof(bd_head), offsetof(bd_head, w), offsetof(bd_head, scale), offsetof(bd_head, V), offsetof(bd_head, K),
        offsetof(bd_head, Kp),
        sizeof(bd_layer), offsetof(bd_layer, input_norm), offsetof(bd_layer, post_norm), offsetof(bd_layer, q_norm),
        offsetof(bd_layer, k_norm), offsetof(bd_layer, attn_sub_norm), offsetof(bd_layer, ffn_sub_norm),
        offsetof(bd_layer, qkv), offsetof(bd_layer, n_qkv), offsetof(bd_layer, o), offsetof(bd_layer, mlp_in),
        offsetof(bd_layer, n_mlp_in), offsetof(bd_layer, down), offsetof(bd_layer, k_cache),
        offsetof(bd_layer, v_cache),
        sizeof(bd_model), offsetof(bd_model, n_layers), offsetof(bd_model, hidden), offsetof(bd_model, n_heads),
        offsetof(bd_model, n_kv), offsetof(bd_model, head_dim), offsetof(bd_model, intermediate),
        offsetof(bd_model, rot), offsetof(bd_model, max_len), offsetof(bd_model, max_batch),
        offsetof(bd_model, max_chunk), offsetof(bd_model, scaling), offsetof(bd_model, bf16), offsetof(bd_model, act),
        offsetof(bd_model, cos), offsetof(bd_model, sin), offsetof(bd_model, final_norm), offsetof(bd_model, layers),
        offsetof(bd_model, head),
    };
    const int64_t count = (int64_t)(sizeof v / sizeof v[0]);
    for (int64_t i = 0; i < n && i < count; i++) out[i] = v[i];
    return count;
}
