/* One decoding step of a gptlab GPT for one row, in C (gptlab/models/native_step.py builds and calls it).
 *
 * DecodeStep (decode_step.py) computes a step with some 20 PyTorch operations a layer; on a small
 * model each costs a few microseconds of dispatch, as much as the products that read the weights.
 * Here the same step is one call: every norm, product, attention and activation is a plain loop
 * over float arrays the model and its KV cache already hold. The products, which read every weight
 * once, and attention, which reads the whole cache, are split across threads with OpenMP when the
 * compiler has it and the work is large enough to repay the hand-off; the rest runs on the calling
 * thread.
 *
 * The structs mirror the ctypes Structures of native_step.py field for field.
 */
#include <math.h>
#include <stdint.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif
#if defined(__AVX2__) || defined(__AVX512VNNI__)
#include <immintrin.h>
#endif

#if defined(__GNUC__) || defined(__clang__)
#define ALWAYS_INLINE __attribute__((always_inline))
#else
#define ALWAYS_INLINE
#endif

enum { ACT_GELU_TANH = 0, ACT_RELU2 = 1, ACT_SWIGLU = 2 };

/* Below this many weights a product runs on one thread: waking the others costs more. */
#define PARALLEL_MIN_WEIGHTS (1 << 15)
/* An int8 product reads a quarter of the bytes: it is split from four times as many weights. */
#define PARALLEL_MIN_INT8_WEIGHTS (1 << 17)
/* Attention splits its heads across threads from this many cached values a layer (heads x slots x hs). */
#define PARALLEL_MIN_ATTENTION (1 << 12)

typedef struct {
    const float *weight; /* n_out x n_in values (NULL for int8 weights) */
    const float *bias;   /* n_out values, or NULL */
    int64_t n_in, n_out;
    int64_t in_major;    /* 0: stored (out, in), as nn.Linear stores it; 1: stored (in, out) */
    /* An Int8Linear's (gptlab/models/int8.py), or NULL: int8 weights (out, in); per output, the
     * input's quantization step times the weights' scale, and the sum of the int8 weights. */
    const int8_t *qweight;
    const float *multipliers;
    const int32_t *qweight_sums;
} Matrix;

typedef struct {
    const float *weight, *bias; /* dim values each, or NULL */
    float eps;
    int32_t rms;                /* 1: RMSNorm, 0: LayerNorm */
} Norm;

typedef struct {
    Norm norm_1, norm_2;
    Matrix qkv, proj, fc, mlp_proj;
    float *keys, *values;       /* this layer's KV cache, (heads, max_len, head_dim) */
} Layer;

typedef struct {
    int64_t n_layers, dim, n_heads, head_dim, max_len, threads;
    int64_t activation;
    float qk_norm_eps;          /* < 0: no QK-norm */
    float softcap;              /* <= 0: none */
    const float *embeddings;    /* token table: row t starts at t * embed_row, steps of embed_col */
    int64_t embed_row, embed_col;
    Norm norm_f;
    Matrix head;
    const Layer *layers;
    /* scratch: x, x_norm and y (dim each), qkv (3 dim), h (fc's outputs), scores (heads x max_len);
     * xq: an int8 product's quantized input (as many bytes as the widest input) */
    float *x, *x_norm, *y, *qkv, *h, *scores;
    uint8_t *xq;
} Model;

/* y = W x + b, in W's memory order. */
static void float_product(const Matrix *m, const float *x, float *y, int64_t threads)
{
    const int64_t n_in = m->n_in, n_out = m->n_out;
    const float *w = m->weight, *b = m->bias;
    const int nt = n_in * n_out >= PARALLEL_MIN_WEIGHTS ? (int)threads : 1;
    if (!m->in_major) {
        /* Four dot products at once: four independent sums keep the FMA units busy, x is read once. */
        const int64_t n_four = n_out / 4 * 4;
#pragma omp parallel for num_threads(nt) if (nt > 1) schedule(static)
        for (int64_t o = 0; o < n_four; o += 4) {
            const float *w0 = w + o * n_in, *w1 = w0 + n_in, *w2 = w1 + n_in, *w3 = w2 + n_in;
            float s0 = 0, s1 = 0, s2 = 0, s3 = 0;
#pragma omp simd reduction(+ : s0, s1, s2, s3)
            for (int64_t i = 0; i < n_in; i++) {
                s0 += w0[i] * x[i];
                s1 += w1[i] * x[i];
                s2 += w2[i] * x[i];
                s3 += w3[i] * x[i];
            }
            y[o] = s0 + (b ? b[o] : 0);
            y[o + 1] = s1 + (b ? b[o + 1] : 0);
            y[o + 2] = s2 + (b ? b[o + 2] : 0);
            y[o + 3] = s3 + (b ? b[o + 3] : 0);
        }
        for (int64_t o = n_four; o < n_out; o++) {
            float s = 0;
            for (int64_t i = 0; i < n_in; i++)
                s += w[o * n_in + i] * x[i];
            y[o] = s + (b ? b[o] : 0);
        }
        return;
    }
    /* (in, out): y accumulates x[i] times row i; each thread owns a contiguous slice of y. */
#pragma omp parallel num_threads(nt) if (nt > 1)
    {
        int64_t parts = 1, part = 0;
#ifdef _OPENMP
        parts = omp_get_num_threads();
        part = omp_get_thread_num();
#endif
        const int64_t chunk = (n_out + parts - 1) / parts;
        const int64_t start = part * chunk, end = start + chunk < n_out ? start + chunk : n_out;
        for (int64_t o = start; o < end; o++)
            y[o] = b ? b[o] : 0;
        int64_t i = 0;
        for (; i + 4 <= n_in; i += 4) { /* four rows a pass: y is loaded and stored a quarter as often */
            const float x0 = x[i], x1 = x[i + 1], x2 = x[i + 2], x3 = x[i + 3];
            const float *r0 = w + i * n_out, *r1 = r0 + n_out, *r2 = r1 + n_out, *r3 = r2 + n_out;
#pragma omp simd
            for (int64_t o = start; o < end; o++)
                y[o] += x0 * r0[o] + x1 * r1[o] + x2 * r2[o] + x3 * r3[o];
        }
        for (; i < n_in; i++) {
            const float *r = w + i * n_out;
            for (int64_t o = start; o < end; o++)
                y[o] += x[i] * r[o];
        }
    }
}

/* Int8 weights. Int8Linear (int8.py) gives fbgemm each input row divided by its largest magnitude,
 * with two marker inputs, +1 and -1, whose weights are 0: the range is [-1, 1] exactly, for which
 * fbgemm's 7-bit parameters are a step of 2/127 and a zero point of 64. It rounds the fused
 * multiply-add x / step + 64 (by the step's inverse) to the nearest integer, ties to even: 0..128.
 * Done the same way here, the integer sums are fbgemm's exactly: for the same input, a product here
 * equals Int8Linear's to float rounding (tests/test_native_step.py checks it on ties). */
#define INT8_ZERO_POINT 64

/* xq = x quantized as above; returns the row's largest magnitude (its scale). */
static float quantize_row(const float *x, int64_t n, uint8_t *xq)
{
    float top = 0;
    for (int64_t i = 0; i < n; i++)
        top = fabsf(x[i]) > top ? fabsf(x[i]) : top;
    top = top < 1e-30f ? 1e-30f : top;
    const float inverse = 1.0f / (2.0f / 127.0f);
    for (int64_t i = 0; i < n; i++) /* x[i] / top as PyTorch divides: rounded once */
        xq[i] = (uint8_t)rintf(fmaf(x[i] / top, inverse, (float)INT8_ZERO_POINT));
    return top;
}

#ifdef __AVX2__
static inline int32_t sum_lanes(__m256i v)
{
    __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
    s = _mm_hadd_epi32(s, s);
    s = _mm_hadd_epi32(s, s);
    return _mm_cvtsi128_si32(s);
}
#endif

/* sums[r] = xq . w[r] for four rows of n int8 weights: xq is loaded once for the four.
 * Vector forms: AVX-512 VNNI multiplies and sums 64 byte pairs an instruction; AVX2 pairs bytes
 * into 16-bit sums (at most 2 x 128 x 127, so none saturates) and those into 32-bit ones. */
static inline void dot4_int8(const uint8_t *xq, const int8_t *const w[4], int64_t n, int32_t sums[4])
{
    int64_t i = 0;
    for (int r = 0; r < 4; r++)
        sums[r] = 0;
#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
    __m512i acc[4] = {_mm512_setzero_si512(), _mm512_setzero_si512(), _mm512_setzero_si512(), _mm512_setzero_si512()};
    for (; i + 64 <= n; i += 64) {
        const __m512i v = _mm512_loadu_si512(xq + i);
        for (int r = 0; r < 4; r++)
            acc[r] = _mm512_dpbusd_epi32(acc[r], v, _mm512_loadu_si512(w[r] + i));
    }
    for (int r = 0; r < 4; r++)
        sums[r] = _mm512_reduce_add_epi32(acc[r]);
#elif defined(__AVX2__)
    const __m256i ones = _mm256_set1_epi16(1);
    __m256i acc[4] = {_mm256_setzero_si256(), _mm256_setzero_si256(), _mm256_setzero_si256(), _mm256_setzero_si256()};
    for (; i + 32 <= n; i += 32) {
        const __m256i v = _mm256_loadu_si256((const __m256i *)(xq + i));
        for (int r = 0; r < 4; r++) {
            const __m256i pairs = _mm256_maddubs_epi16(v, _mm256_loadu_si256((const __m256i *)(w[r] + i)));
            acc[r] = _mm256_add_epi32(acc[r], _mm256_madd_epi16(pairs, ones));
        }
    }
    for (int r = 0; r < 4; r++)
        sums[r] = sum_lanes(acc[r]);
#endif
    for (; i < n; i++)
        for (int r = 0; r < 4; r++)
            sums[r] += (int32_t)xq[i] * w[r][i];
}

/* y = W x + b with W int8 (Int8Linear's): x quantized into xq, integer sums, each output scaled back. */
static void int8_product(const Matrix *m, const float *x, float *y, uint8_t *xq, int64_t threads)
{
    const int64_t n_in = m->n_in, n_out = m->n_out;
    const float top = quantize_row(x, n_in, xq);
    const int nt = n_in * n_out >= PARALLEL_MIN_INT8_WEIGHTS ? (int)threads : 1;
#pragma omp parallel for num_threads(nt) if (nt > 1) schedule(static)
    for (int64_t o = 0; o < n_out; o += 4) {
        const int64_t count = n_out - o < 4 ? n_out - o : 4; /* the last group may repeat its first row */
        const int8_t *rows[4];
        int32_t sums[4];
        for (int r = 0; r < 4; r++)
            rows[r] = m->qweight + (o + (r < count ? r : 0)) * n_in;
        dot4_int8(xq, rows, n_in, sums);
        for (int64_t r = 0; r < count; r++) {
            const float v = (float)(sums[r] - INT8_ZERO_POINT * m->qweight_sums[o + r]) * m->multipliers[o + r];
            y[o + r] = m->bias ? m->bias[o + r] + v * top : v * top;
        }
    }
}

static void product(const Matrix *m, const float *x, float *y, uint8_t *xq, int64_t threads)
{
    if (m->qweight)
        int8_product(m, x, y, xq, threads);
    else
        float_product(m, x, y, threads);
}

/* One product alone, for tests/test_native_step.py: y = W x + b for one row. */
void gptlab_product(const Matrix *m, const float *x, float *y, uint8_t *xq, int64_t threads)
{
    product(m, x, y, xq, threads);
}

/* out = norm(x) over n values: LayerNorm or RMSNorm, with the gain and bias where present. */
static void normalize(const Norm *norm, const float *x, float *out, int64_t n)
{
    float mean = 0, sum_sq = 0;
    if (!norm->rms) {
#pragma omp simd reduction(+ : mean)
        for (int64_t i = 0; i < n; i++)
            mean += x[i];
        mean /= n;
    }
#pragma omp simd reduction(+ : sum_sq)
    for (int64_t i = 0; i < n; i++)
        sum_sq += (x[i] - mean) * (x[i] - mean);
    const float scale = 1.0f / sqrtf(sum_sq / n + norm->eps);
    for (int64_t i = 0; i < n; i++) {
        float v = (x[i] - mean) * scale;
        if (norm->weight)
            v *= norm->weight[i];
        if (norm->bias)
            v += norm->bias[i];
        out[i] = v;
    }
}

/* QK-norm: a head's vector scaled to unit RMS, without a gain. */
static void unit_rms(float *v, int64_t n, float eps)
{
    float sum_sq = 0;
#pragma omp simd reduction(+ : sum_sq)
    for (int64_t i = 0; i < n; i++)
        sum_sq += v[i] * v[i];
    const float scale = 1.0f / sqrtf(sum_sq / n + eps);
    for (int64_t i = 0; i < n; i++)
        v[i] *= scale;
}

/* RoPE, "rotate half": the pairs (i, i + n/2) turned by this position's angles. */
static void rotate(float *v, int64_t n, const float *cos_row, const float *sin_row)
{
    const int64_t half = n / 2;
    for (int64_t i = 0; i < half; i++) {
        const float a = v[i], b = v[i + half];
        v[i] = a * cos_row[i] - b * sin_row[i];
        v[i + half] = a * sin_row[i] + b * cos_row[i];
    }
}

/* e^x to about 2e-7 relative, in a form compilers vectorize (libm's expf is one call a value):
 * x = n ln 2 + r with |r| <= ln 2 / 2, e^r by its Taylor series to r^7, times 2^n built in the
 * exponent bits. x is first clamped to [-87, 88], where 2^n stays a normal float. (The clamps are
 * written as selects and n is rounded with rintf: fminf and floorf would keep gcc from vectorizing.) */
static inline float fast_exp(float x)
{
    x = x < -87.0f ? -87.0f : x;
    x = x > 88.0f ? 88.0f : x;
    const float n = rintf(x * 1.44269504f);
    const float r = x - n * 0.693359375f + n * 2.12194440e-4f; /* ln 2 in two parts: r exact */
    float p = 1.0f / 5040;
    p = p * r + 1.0f / 720;
    p = p * r + 1.0f / 120;
    p = p * r + 1.0f / 24;
    p = p * r + 1.0f / 6;
    p = p * r + 0.5f;
    p = p * r + 1.0f;
    p = p * r + 1.0f;
    const int32_t bits = ((int32_t)n + 127) << 23; /* 2^n as a float's bits */
    float two_n;
    memcpy(&two_n, &bits, sizeof two_n); /* a register move, which compilers vectorize */
    return p * two_n;
}

/* One query's attention over a head's cached slots 0..last: softmax(q k / sqrt(hs)) v -> out.
 * Inlined into attend() once per common head size, so that each copy's loops over hs have a
 * constant length: unrolled, with q and out held in registers across the slots. */
static inline ALWAYS_INLINE void attend_head(const float *q, const float *keys, const float *values, int64_t last,
                                             const int64_t hs, float *scores, float *out)
{
    const float scale = 1.0f / sqrtf((float)hs);
    float top = -INFINITY, total = 0;
    for (int64_t s = 0; s <= last; s++) {
        const float *k = keys + s * hs;
        float dot = 0;
#pragma omp simd reduction(+ : dot)
        for (int64_t i = 0; i < hs; i++)
            dot += q[i] * k[i];
        scores[s] = dot * scale;
        top = scores[s] > top ? scores[s] : top;
    }
#pragma omp simd reduction(+ : total)
    for (int64_t s = 0; s <= last; s++) {
        scores[s] = fast_exp(scores[s] - top);
        total += scores[s];
    }
    for (int64_t i = 0; i < hs; i++)
        out[i] = 0;
    for (int64_t s = 0; s <= last; s++) {
        const float p = scores[s] / total, *v = values + s * hs;
#pragma omp simd
        for (int64_t i = 0; i < hs; i++)
            out[i] += p * v[i];
    }
}

static void attend(const float *q, const float *keys, const float *values, int64_t last, int64_t hs,
                   float *scores, float *out)
{
    switch (hs) {
    case 32: attend_head(q, keys, values, last, 32, scores, out); break;
    case 64: attend_head(q, keys, values, last, 64, scores, out); break;
    case 128: attend_head(q, keys, values, last, 128, scores, out); break;
    default: attend_head(q, keys, values, last, hs, scores, out);
    }
}

static void activate(float *h, int64_t n_fc, int64_t activation)
{
    if (activation == ACT_GELU_TANH) { /* GPT-2's "gelu_new" */
        /* 1 + tanh(u) = 2 / (1 + e^(-2u)) */
#pragma omp simd
        for (int64_t i = 0; i < n_fc; i++) {
            const float v = h[i], u = 0.7978845608028654f * (v + 0.044715f * v * v * v);
            h[i] = v / (1.0f + fast_exp(-2.0f * u));
        }
    } else if (activation == ACT_RELU2) {
        for (int64_t i = 0; i < n_fc; i++)
            h[i] = h[i] > 0 ? h[i] * h[i] : 0;
    } else { /* SwiGLU: silu(gate) * value, the gate the first half; the result in the first half */
        const int64_t hidden = n_fc / 2;
#pragma omp simd
        for (int64_t i = 0; i < hidden; i++) {
            const float gate = h[i];
            h[i] = gate / (1.0f + fast_exp(-gate)) * h[hidden + i];
        }
    }
}

/* The index of the largest logit, banned ones (banned: one byte an id, or NULL) counted as -inf,
 * as PyTorch's max finds it: the first of equal maxima, or the first NaN. */
static int64_t best_logit(const float *logits, int64_t n, const uint8_t *banned)
{
    int64_t best = 0;
    float top = -INFINITY;
    for (int64_t i = 0; i < n; i++) {
        const float v = banned && banned[i] ? -INFINITY : logits[i];
        if (isnan(v))
            return i;
        if (v > top) {
            top = v;
            best = i;
        }
    }
    return best;
}

/* Logits of `token` at cache slot `slot` (also its position); its keys and values fill that slot.
 * position: its learned or sinusoidal vector (dim values), or NULL; cos_row, sin_row: its RoPE
 * angles (head_dim / 2 values each), or NULL. best: where to write the greedy choice (the largest
 * logit not banned, as best_logit), or NULL. */
void gptlab_decode_step(const Model *m, int64_t token, int64_t slot, const float *position,
                        const float *cos_row, const float *sin_row, float *logits, const uint8_t *banned,
                        int64_t *best)
{
    const int64_t C = m->dim, nh = m->n_heads, hs = m->head_dim;
    float *x = m->x, *x_norm = m->x_norm, *y = m->y, *qkv = m->qkv, *h = m->h;
    const float *row = m->embeddings + token * m->embed_row;
    for (int64_t c = 0; c < C; c++)
        x[c] = row[c * m->embed_col] + (position ? position[c] : 0);
    for (int64_t l = 0; l < m->n_layers; l++) {
        const Layer *layer = &m->layers[l];
        normalize(&layer->norm_1, x, x_norm, C);
        product(&layer->qkv, x_norm, qkv, m->xq, m->threads);
        for (int64_t head = 0; head < nh; head++) {
            float *q = qkv + head * hs, *k = qkv + C + head * hs, *v = qkv + 2 * C + head * hs;
            if (m->qk_norm_eps >= 0) {
                unit_rms(q, hs, m->qk_norm_eps);
                unit_rms(k, hs, m->qk_norm_eps);
            }
            if (cos_row) {
                rotate(q, hs, cos_row, sin_row);
                rotate(k, hs, cos_row, sin_row);
            }
            const int64_t at = (head * m->max_len + slot) * hs;
            for (int64_t i = 0; i < hs; i++) {
                layer->keys[at + i] = k[i];
                layer->values[at + i] = v[i];
            }
        }
        /* The heads are independent: across threads once they read enough of the cache. */
        const int nt = nh * (slot + 1) * hs >= PARALLEL_MIN_ATTENTION ? (int)m->threads : 1;
#pragma omp parallel for num_threads(nt) if (nt > 1) schedule(static)
        for (int64_t head = 0; head < nh; head++) {
            const int64_t cached = head * m->max_len * hs;
            attend(qkv + head * hs, layer->keys + cached, layer->values + cached, slot, hs,
                   m->scores + head * m->max_len, y + head * hs);
        }
        product(&layer->proj, y, x_norm, m->xq, m->threads); /* x_norm is free again: it holds proj's output */
        for (int64_t c = 0; c < C; c++)
            x[c] += x_norm[c];
        normalize(&layer->norm_2, x, x_norm, C);
        product(&layer->fc, x_norm, h, m->xq, m->threads);
        activate(h, layer->fc.n_out, m->activation);
        product(&layer->mlp_proj, h, y, m->xq, m->threads);
        for (int64_t c = 0; c < C; c++)
            x[c] += y[c];
    }
    normalize(&m->norm_f, x, x_norm, C);
    product(&m->head, x_norm, logits, m->xq, m->threads);
    if (m->softcap > 0) { /* cap tanh(l / cap) = cap (2 / (1 + e^(-2 l / cap)) - 1) */
#pragma omp simd
        for (int64_t i = 0; i < m->head.n_out; i++)
            logits[i] = m->softcap * (2.0f / (1.0f + fast_exp(-2.0f * logits[i] / m->softcap)) - 1.0f);
    }
    if (best)
        *best = best_logit(logits, m->head.n_out, banned);
}
