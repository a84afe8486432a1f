/* A whole MLA decode step for CPUs: every decoder layer of the plain Llama-style absorbed model in
 * one call (the `cpu` fused decode of mlakit/engine/cpu_step.py).
 *
 * At batch 1 a decode step of a small model is ~40 small PyTorch calls per layer whose Python
 * and dispatch overhead costs more than the weight products; this routine runs the same maths
 * per layer with no Python in between (llama.cpp runs its graph the same way):
 *
 *   h        = rmsnorm(x) * attn_norm
 *   [q | c_kv | k_r] = W_in h                              (fused q / latent / rope-key product)
 *   (q_lora:  q = W_UQ (rmsnorm(c_q) * q_norm))
 *   q_rope, k_rope = RoPE(q_rope, pos), RoPE(k_r, pos)     (halves layout, fp32 tables)
 *   c_kv     = rmsnorm(c_kv) * kv_norm                     (when the model has kv_norm)
 *   cache[slot] = [c_kv | k_rope]                          (fp32, bf16 or int8 + per-row scale)
 *   q_joint  = scale * [q_nope W_UK | q_rope]              per head
 *   o_latent = softmax(q_joint . cache^T) c_kv             (mlakit_paged_decode, paged_decode.c)
 *   x       += W_O (o_latent W_UV)
 *   x       += W_down (act(W_gate h') * W_up h'),  h' = rmsnorm(x) * mlp_norm
 *
 * The residual stream x stays fp32 for the whole step (the PyTorch path rounds it to the
 * activation dtype after every op; the tests bound the difference). Linear layers are int8
 * (mlakit_int8_gemv, VNNI), fp32 or bf16 (plain loops the compiler vectorises for the CPU).
 * Threads: the weight products and the attention split over OpenMP threads; the small per-token
 * pieces (norms, RoPE, the absorption) run on the calling thread.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

enum { LIN_NONE = 0, LIN_INT8 = 1, LIN_F32 = 2, LIN_BF16 = 3 };
enum { ROW_F32 = 0, ROW_BF16 = 1, ROW_I8 = 2 };
enum { ACT_SILU = 0, ACT_GELU_TANH = 1 };

/* Layouts shared with ctypes in mlakit/engine/cpu_step.py: keep them in sync. */
typedef struct {
    int64_t kind; /* LIN_* */
    int64_t n, k, kp; /* out features, in features, in features padded to 64 (int8) */
    const void *w; /* int8: uint8 tiles [n / 16, kp / 64, 16, 64] (+128, int8_gemv.c); fp32: float [n, k]; bf16: [n, k] */
    const float *scale;  /* int8: per output channel; else NULL */
    const float *bias;   /* [n] or NULL */
} Linear;

typedef struct {
    const float *attn_norm, *mlp_norm, *q_norm, *kv_norm; /* fp32 [width]; q_norm/kv_norm may be NULL */
    Linear w_in, w_uq, w_o, w_gate_up, w_down;            /* w_uq.kind == LIN_NONE without q_lora */
    const float *w_uk;                                    /* [H, d_nope, r] */
    const float *w_uv;                                    /* [H, r, d_v] */
    const float *cos, *sin;                               /* [max_pos, d_rope] */
    void *rows;                                           /* cache storage [slots, r + d_rope] */
    float *row_scale;                                     /* int8 storage: [slots]; else NULL */
    int64_t row_dtype, row_stride;                        /* ROW_*, elements between rows */
    int64_t rank;                                         /* this layer's kv_lora_rank (conversions vary it) */
} Layer;

typedef struct { /* rank: the largest of the layers' ranks (sizes the buffers) */
    int64_t hidden, heads, q_lora, rank, d_nope, d_rope, d_v, inter, act;
    float eps, softmax_scale;
} Dims;

int mlakit_int8_gemv(int M, int N, int K, int Kp, const void *x, const uint8_t *w_u8, const float *w_scale,
                     const float *bias, void *y, int bf16, int n_threads);
int mlakit_paged_decode(int n_seqs, int n_groups, int nq, int dk, int dv, const float *q, const void *k_base,
                        const void *v_base, const float *k_scale, const float *v_scale, int dtype, int64_t k_stride,
                        int64_t v_stride, int64_t group_stride, const int64_t *tables, int64_t table_stride,
                        const int64_t *ctx_lens, int block_size, int n_splits, int n_threads, float *out);

/* x [M, k] fp32 -> y [M, n] fp32 */
static int linear(const Linear *l, int M, const float *x, float *y, int n_threads) {
    if (l->kind == LIN_INT8)
        return mlakit_int8_gemv(M, (int)l->n, (int)l->k, (int)l->kp, x, (const uint8_t *)l->w, l->scale, l->bias, y,
                                0, n_threads);
    int64_t n = l->n, k = l->k;
    if (l->kind == LIN_F32) {
        const float *w = (const float *)l->w;
#pragma omp parallel for num_threads(n_threads) schedule(static)
        for (int64_t o = 0; o < n; o++) {
            const float *wr = w + o * k;
            for (int m = 0; m < M; m++) {
                const float *xr = x + (int64_t)m * k;
                float s = 0.f;
                for (int64_t j = 0; j < k; j++) s += xr[j] * wr[j];
                y[(int64_t)m * n + o] = s + (l->bias ? l->bias[o] : 0.f);
            }
        }
        return 0;
    }
    if (l->kind != LIN_BF16) return 4;
    const uint16_t *w = (const uint16_t *)l->w; /* bf16 weights widened in registers, products in fp32 */
#pragma omp parallel for num_threads(n_threads) schedule(static)
    for (int64_t o = 0; o < n; o++) {
        const uint16_t *wr = w + o * k;
        for (int m = 0; m < M; m++) {
            const float *xr = x + (int64_t)m * k;
            float s = 0.f;
            for (int64_t j = 0; j < k; j++) {
                uint32_t u = (uint32_t)wr[j] << 16;
                float f;
                memcpy(&f, &u, 4);
                s += xr[j] * f;
            }
            y[(int64_t)m * n + o] = s + (l->bias ? l->bias[o] : 0.f);
        }
    }
    return 0;
}

static void rmsnorm(const float *x, const float *w, int64_t n, float eps, float *out) {
    float ss = 0.f;
    for (int64_t i = 0; i < n; i++) ss += x[i] * x[i];
    float inv = 1.f / sqrtf(ss / (float)n + eps);
    for (int64_t i = 0; i < n; i++) out[i] = x[i] * inv * w[i];
}

/* RoPE, halves layout: out = x * cos + [-x2, x1] * sin, in place on x [d] */
static void rope(float *x, const float *cos, const float *sin, int64_t d) {
    int64_t half = d / 2;
    for (int64_t i = 0; i < half; i++) {
        float a = x[i], b = x[i + half];
        x[i] = a * cos[i] - b * sin[i];
        x[i + half] = b * cos[i + half] + a * sin[i + half];
    }
}

static inline uint16_t f32_to_bf16(float f) { /* round to nearest even, as torch's .to(bfloat16) */
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40); /* NaN stays NaN */
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

static void write_row(const Layer *L, int64_t slot, const float *row, int64_t w) {
    if (L->row_dtype == ROW_F32) {
        memcpy((float *)L->rows + slot * L->row_stride, row, sizeof(float) * w);
    } else if (L->row_dtype == ROW_BF16) {
        uint16_t *dst = (uint16_t *)L->rows + slot * L->row_stride;
        for (int64_t i = 0; i < w; i++) dst[i] = f32_to_bf16(row[i]);
    } else { /* symmetric int8, one scale per row (mlakit.paged.PagedRows.write) */
        float amax = 0.f;
        for (int64_t i = 0; i < w; i++) amax = fabsf(row[i]) > amax ? fabsf(row[i]) : amax;
        float s = (amax > 1e-12f ? amax : 1e-12f) / 127.f;
        int8_t *dst = (int8_t *)L->rows + slot * L->row_stride;
        for (int64_t i = 0; i < w; i++) {
            float q = nearbyintf(row[i] / s);
            dst[i] = (int8_t)(q > 127.f ? 127.f : q < -127.f ? -127.f : q);
        }
        L->row_scale[slot] = s;
    }
}

static inline float act(float g, int64_t kind) {
    if (kind == ACT_SILU) return g / (1.f + expf(-g));
    return 0.5f * g * (1.f + tanhf(0.7978845608028654f * (g + 0.044715f * g * g * g)));
}

/* All layers for M decode tokens: x [M, hidden] fp32 (embedded tokens in, last hidden states out).
 * positions/slots [M]; tables [M, table_stride] block ids; ctx_lens [M] (= positions + 1).
 * Returns 0, or non-zero when a buffer cannot be allocated or a kernel refuses its shapes. */
int mlakit_mla_decode_step(const Dims *d, int n_layers, const Layer *layers, int M, float *x, const int64_t *positions,
                           const int64_t *slots, const int64_t *tables, int64_t table_stride, const int64_t *ctx_lens,
                           int block_size, int n_splits, int n_threads) {
    int64_t H = d->heads, r = d->rank, dn = d->d_nope, dr = d->d_rope, dv = d->d_v, hid = d->hidden;
    int64_t qk = dn + dr, jw = r + dr, q_out = d->q_lora ? d->q_lora : H * qk;
    int64_t in_w = q_out + r + dr;
    int64_t widest = in_w > 2 * d->inter ? in_w : 2 * d->inter;
    widest = widest > H * qk ? widest : H * qk;
    widest = widest > hid ? widest : hid;
    widest = widest > H * r ? widest : H * r;
    widest = widest > H * dv ? widest : H * dv;
    /* four [M, widest] scratch rows: h (normed input), y (product out), q (queries / gate), o (attention out) */
    float *buf = (float *)malloc(sizeof(float) * 4 * (size_t)M * (widest + jw + 16));
    float *qj = (float *)malloc(sizeof(float) * (size_t)M * H * jw);
    float *ol = (float *)malloc(sizeof(float) * (size_t)M * H * r);
    if (!buf || !qj || !ol) {
        free(buf);
        free(qj);
        free(ol);
        return 1;
    }
    size_t st = (size_t)M * (widest + jw + 16);
    float *h = buf, *y = buf + st, *q = buf + 2 * st, *o = buf + 3 * st;
    int rc = 0;
    for (int li = 0; li < n_layers && !rc; li++) {
        const Layer *L = layers + li;
        r = L->rank, jw = r + dr, in_w = q_out + r + dr;
        for (int m = 0; m < M; m++) rmsnorm(x + m * hid, L->attn_norm, hid, d->eps, h + m * hid);
        if ((rc = linear(&L->w_in, M, h, y, n_threads))) break;
        const float *qsrc = y; /* queries [M, H * qk] at row stride qs */
        int64_t qs = in_w;
        if (d->q_lora) {
            for (int m = 0; m < M; m++) rmsnorm(y + m * in_w, L->q_norm, d->q_lora, d->eps, h + m * d->q_lora);
            if ((rc = linear(&L->w_uq, M, h, q, n_threads))) break;
            qsrc = q;
            qs = H * qk;
        }
        for (int m = 0; m < M; m++) {
            int64_t p = positions[m];
            const float *cs = L->cos + p * dr, *sn = L->sin + p * dr;
            float *yr = y + m * in_w;
            float row[jw];
            if (L->kv_norm)
                rmsnorm(yr + q_out, L->kv_norm, r, d->eps, row);
            else
                memcpy(row, yr + q_out, sizeof(float) * r);
            memcpy(row + r, yr + q_out + r, sizeof(float) * dr);
            rope(row + r, cs, sn, dr);
            write_row(L, slots[m], row, jw);
            for (int64_t hh = 0; hh < H; hh++) {
                const float *qh = qsrc + m * qs + hh * qk; /* [q_nope | q_rope] of head hh */
                float *out = qj + (m * H + hh) * jw;
                const float *wk = L->w_uk + hh * dn * r;
                for (int64_t j = 0; j < r; j++) out[j] = 0.f;
                for (int64_t i = 0; i < dn; i++) {
                    float a = qh[i] * d->softmax_scale;
                    for (int64_t j = 0; j < r; j++) out[j] += a * wk[i * r + j];
                }
                for (int64_t i = 0; i < dr; i++) out[r + i] = qh[dn + i];
                rope(out + r, cs, sn, dr);
                for (int64_t i = 0; i < dr; i++) out[r + i] *= d->softmax_scale;
            }
        }
        if ((rc = mlakit_paged_decode(M, 1, (int)H, (int)jw, (int)r, qj, L->rows, L->rows, L->row_scale, L->row_scale,
                                      (int)L->row_dtype, L->row_stride, L->row_stride, 0, tables, table_stride,
                                      ctx_lens, block_size, n_splits, n_threads, ol)))
            break;
        for (int m = 0; m < M; m++)
            for (int64_t hh = 0; hh < H; hh++) {
                const float *a = ol + (m * H + hh) * r, *wv = L->w_uv + hh * r * dv;
                float *out = o + m * H * dv + hh * dv;
                for (int64_t j = 0; j < dv; j++) out[j] = 0.f;
                for (int64_t i = 0; i < r; i++)
                    for (int64_t j = 0; j < dv; j++) out[j] += a[i] * wv[i * dv + j];
            }
        if ((rc = linear(&L->w_o, M, o, y, n_threads))) break;
        for (int64_t i = 0; i < M * hid; i++) x[i] += y[i];
        for (int m = 0; m < M; m++) rmsnorm(x + m * hid, L->mlp_norm, hid, d->eps, h + m * hid);
        if ((rc = linear(&L->w_gate_up, M, h, y, n_threads))) break;
        int64_t I = d->inter;
        for (int m = 0; m < M; m++)
            for (int64_t i = 0; i < I; i++) q[m * I + i] = act(y[m * 2 * I + i], d->act) * y[m * 2 * I + I + i];
        if ((rc = linear(&L->w_down, M, q, y, n_threads))) break;
        for (int64_t i = 0; i < M * hid; i++) x[i] += y[i];
    }
    free(buf);
    free(qj);
    free(ol);
    return rc;
}
