/* A whole decode step for CPUs: every decoder layer of a Llama-style model, absorbed MLA or
 * MHA/GQA/MQA attention, in one call (the fused CPU decode of mlakit/engine/cpu_step.py).
 *
 * At batch 1 a decode step of a small model is ~40 small PyTorch calls per layer whose Python
 * and dispatch overhead costs more than the weight products; this routine runs the same maths
 * per layer with no Python in between (llama.cpp runs its graph the same way):
 *
 *   h        = rmsnorm(x) * attn_norm
 *   MLA:  [q | c_kv | k_r] = W_in h                         (fused q / latent / rope-key product)
 *         (q_lora:  q = W_UQ (rmsnorm(c_q) * q_norm))
 *         q_rope, k_rope = RoPE(q_rope, pos), RoPE(k_r, pos) (halves layout, fp32 tables)
 *         c_kv     = rmsnorm(c_kv) * kv_norm                 (when the model has kv_norm)
 *         cache[slot] = [c_kv | k_rope]                      (fp32, bf16 or int8 + per-row scale)
 *         q_joint  = scale * [q_nope W_UK | q_rope]          per head
 *         o_latent = softmax(q_joint . cache^T) c_kv         (mlakit_paged_decode, paged_decode.c)
 *         o        = o_latent W_UV                           per head
 *   GQA:  [q | k | v] = W_in h; per-head norms (qk_norm), RoPE on q and k; K and V rows cached;
 *         o = softmax(scale * q . K^T) V                     (paged_decode, G groups of H / G heads)
 *   x       += W_O o
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
    /* baseline (MHA/GQA/MQA) layers: K rows in rows/row_scale, V rows here; per-head norms or NULL */
    void *v_rows;
    float *v_row_scale;
    const float *q_head_norm, *k_head_norm; /* [head_dim] */
} Layer;

/* MLA models: heads, q_lora, rank (the largest of the layers' ranks: it sizes the buffers), d_nope,
 * d_rope, d_v. Baseline models (mla = 0): heads, kv_heads, head_dim (RoPE over the whole head). */
typedef struct {
    int64_t hidden, heads, q_lora, rank, d_nope, d_rope, d_v, inter, act, mla, kv_heads, head_dim;
    float eps, softmax_scale;
} Dims;

int mlakit_int8_gemv(int M, int N, int K, int Kp, const void *x, const uint8_t *w_u8, const float *w_scale,
                     const float *bias, void *y, int bf16, int n_threads);
int mlakit_paged_decode(int n_seqs, int n_groups, int nq, int dk, int dv, const float *q, const void *k_base,
                        const void *v_base, const float *k_scale, const float *v_scale, int dtype, int64_t k_stride,
                        int64_t v_stride, int64_t group_stride, const int64_t *tables, int64_t table_stride,
                        const int64_t *ctx_lens, const int64_t *row_lens, int block_size, int n_splits, int n_threads,
                        float *out);

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

/* out[0:r] = scale * sum_i a[i] * w[i, 0:r] for w [n, r] row-major (restrict: the accumulator stays in registers) */
static void vecmat(const float *restrict a, const float *restrict w, int64_t n, int64_t r, float scale,
                   float *restrict out) {
    for (int64_t j = 0; j < r; j++) out[j] = 0.f;
    for (int64_t i = 0; i < n; i++) {
        float ai = a[i] * scale;
        const float *restrict wi = w + i * r;
        for (int64_t j = 0; j < r; j++) out[j] += ai * wi[j];
    }
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

/* one row of w values into storage `rows` (dtype ROW_*, `stride` elements per slot; int8: + per-row scale) */
static void write_row(void *rows, float *row_scale, int64_t dtype, int64_t stride, int64_t slot, const float *row,
                      int64_t w) {
    if (dtype == ROW_F32) {
        memcpy((float *)rows + slot * stride, row, sizeof(float) * w);
    } else if (dtype == ROW_BF16) {
        uint16_t *dst = (uint16_t *)rows + slot * stride;
        for (int64_t i = 0; i < w; i++) dst[i] = f32_to_bf16(row[i]);
    } else { /* symmetric int8, one scale per row (mlakit.paged.PagedRows.write) */
        float amax = 0.f;
        for (int64_t i = 0; i < w; i++) amax = fabsf(row[i]) > amax ? fabsf(row[i]) : amax;
        float s = (amax > 1e-12f ? amax : 1e-12f) / 127.f;
        int8_t *dst = (int8_t *)rows + slot * stride;
        for (int64_t i = 0; i < w; i++) {
            float q = nearbyintf(row[i] / s);
            dst[i] = (int8_t)(q > 127.f ? 127.f : q < -127.f ? -127.f : q);
        }
        row_scale[slot] = s;
    }
}

static inline float act(float g, int64_t kind) {
    if (kind == ACT_SILU) return g / (1.f + expf(-g));
    return 0.5f * g * (1.f + tanhf(0.7978845608028654f * (g + 0.044715f * g * g * g)));
}

typedef struct { /* one step's batch, as the entry point received it */
    int M;
    const int64_t *positions, *slots, *tables, *ctx_lens;
    int64_t table_stride;
    int block_size, n_splits, n_threads;
} Step;

/* MLA attention of one layer: h [M, hidden] (normed input) -> o [M, H * d_v]; y, q, qj, ol scratch */
static int mla_attention(const Dims *d, const Layer *L, const Step *S, const float *h, float *y, float *q, float *qj,
                         float *ol, float *o) {
    int M = S->M;
    int64_t H = d->heads, r = L->rank, dn = d->d_nope, dr = d->d_rope, dv = d->d_v;
    int64_t qk = dn + dr, jw = r + dr, q_out = d->q_lora ? d->q_lora : H * qk, in_w = q_out + r + dr;
    int rc;
    if ((rc = linear(&L->w_in, M, h, y, S->n_threads))) return rc;
    const float *qsrc = y; /* queries [M, H * qk] at row stride qs */
    int64_t qs = in_w;
    if (d->q_lora) {
        for (int m = 0; m < M; m++) rmsnorm(y + m * in_w, L->q_norm, d->q_lora, d->eps, q + m * d->q_lora);
        if ((rc = linear(&L->w_uq, M, q, o, S->n_threads))) return rc; /* o: free until the attention below */
        qsrc = o;
        qs = H * qk;
    }
    for (int m = 0; m < M; m++) {
        int64_t p = S->positions[m];
        const float *cs = L->cos + p * dr, *sn = L->sin + p * dr;
        const float *yr = y + m * in_w;
        float row[jw];
        if (L->kv_norm)
            rmsnorm(yr + q_out, L->kv_norm, r, d->eps, row);
        else
            memcpy(row, yr + q_out, sizeof(float) * r);
        memcpy(row + r, yr + q_out + r, sizeof(float) * dr);
        rope(row + r, cs, sn, dr);
        write_row(L->rows, L->row_scale, L->row_dtype, L->row_stride, S->slots[m], row, jw);
        for (int64_t hh = 0; hh < H; hh++) {
            const float *qh = qsrc + m * qs + hh * qk; /* [q_nope | q_rope] of head hh */
            float *out = qj + (m * H + hh) * jw;
            vecmat(qh, L->w_uk + hh * dn * r, dn, r, d->softmax_scale, out); /* q_nope W_UK */
            for (int64_t i = 0; i < dr; i++) out[r + i] = qh[dn + i];
            rope(out + r, cs, sn, dr);
            for (int64_t i = 0; i < dr; i++) out[r + i] *= d->softmax_scale;
        }
    }
    if ((rc = mlakit_paged_decode(M, 1, (int)H, (int)jw, (int)r, qj, L->rows, L->rows, L->row_scale, L->row_scale,
                                  (int)L->row_dtype, L->row_stride, L->row_stride, 0, S->tables, S->table_stride,
                                  S->ctx_lens, NULL, S->block_size, S->n_splits, S->n_threads, ol)))
        return rc;
    for (int m = 0; m < M; m++)
        for (int64_t hh = 0; hh < H; hh++) /* o_h = o_latent W_UV */
            vecmat(ol + (m * H + hh) * r, L->w_uv + hh * r * dv, r, dv, 1.f, o + m * H * dv + hh * dv);
    return 0;
}

/* Baseline (MHA/GQA/MQA) attention of one layer: h [M, hidden] -> o [M, H * D]; y, qj scratch.
 * [q | k | v] = W_in h; per-head norms (qk_norm), RoPE on q and k, K and V rows written, then
 * paged_decode with G groups of H / G query heads (query head h reads kv head h / (H / G)). */
static int gqa_attention(const Dims *d, const Layer *L, const Step *S, const float *h, float *y, float *qj, float *o) {
    int M = S->M;
    int64_t H = d->heads, G = d->kv_heads, D = d->head_dim, in_w = (H + 2 * G) * D;
    int rc;
    if ((rc = linear(&L->w_in, M, h, y, S->n_threads))) return rc;
    for (int m = 0; m < M; m++) {
        int64_t p = S->positions[m];
        const float *cs = L->cos + p * D, *sn = L->sin + p * D;
        float *yr = y + m * in_w; /* rotated in place */
        for (int64_t hh = 0; hh < H + G; hh++) { /* the H query heads, then the G key heads */
            float *v = yr + hh * D;
            const float *norm = hh < H ? L->q_head_norm : L->k_head_norm;
            if (norm) rmsnorm(v, norm, D, d->eps, v);
            rope(v, cs, sn, D);
        }
        for (int64_t i = 0; i < H * D; i++) qj[m * H * D + i] = yr[i] * d->softmax_scale;
        write_row(L->rows, L->row_scale, L->row_dtype, L->row_stride, S->slots[m], yr + H * D, G * D);
        write_row(L->v_rows, L->v_row_scale, L->row_dtype, L->row_stride, S->slots[m], yr + (H + G) * D, G * D);
    }
    return mlakit_paged_decode(M, (int)G, (int)(H / G), (int)D, (int)D, qj, L->rows, L->v_rows, L->row_scale,
                               L->v_row_scale, (int)L->row_dtype, L->row_stride, L->row_stride, D, S->tables,
                               S->table_stride, S->ctx_lens, NULL, S->block_size, S->n_splits, S->n_threads, o);
}

/* All layers for M decode tokens: x [M, hidden] fp32 (embedded tokens in, last hidden states out).
 * positions/slots [M]; tables [M, table_stride] block ids; ctx_lens [M] (= positions + 1).
 * Returns 0, or non-zero when a buffer cannot be allocated or a kernel refuses its shapes. */
int mlakit_decode_step(const Dims *d, int n_layers, const Layer *layers, int M, float *x, const int64_t *positions,
                           const int64_t *slots, const int64_t *tables, int64_t table_stride, const int64_t *ctx_lens,
                           int block_size, int n_splits, int n_threads) {
    const Step S = {M, positions, slots, tables, ctx_lens, table_stride, block_size, n_splits, n_threads};
    int64_t H = d->heads, hid = d->hidden, I = d->inter;
    int64_t in_w, q_w, o_w; /* widest input-projection output, query row, attention output per token */
    if (d->mla) {
        int64_t qk = d->d_nope + d->d_rope, jw = d->rank + d->d_rope;
        in_w = (d->q_lora ? d->q_lora : H * qk) + jw;
        q_w = H * (jw > qk ? jw : qk);
        o_w = H * (d->d_v > d->rank ? d->d_v : d->rank);
    } else {
        in_w = (H + 2 * d->kv_heads) * d->head_dim;
        q_w = o_w = H * d->head_dim;
    }
    int64_t widest = in_w > 2 * I ? in_w : 2 * I;
    widest = widest > hid ? widest : hid;
    widest = widest > q_w ? widest : q_w;
    widest = widest > o_w ? widest : o_w;
    /* [M, widest] scratch: h (normed input), y (product out), q (q_lora input / gate), o (attention
     * out), qj (queries for the kernel), ol (MLA latent attention out) */
    size_t st = (size_t)M * (widest + 16);
    float *buf = (float *)malloc(sizeof(float) * 6 * st);
    if (!buf) return 1;
    float *h = buf, *y = buf + st, *q = buf + 2 * st, *o = buf + 3 * st, *qj = buf + 4 * st, *ol = buf + 5 * st;
    int rc = 0;
    for (int li = 0; li < n_layers && !rc; li++) {
        const Layer *L = layers + li;
        for (int m = 0; m < M; m++) rmsnorm(x + m * hid, L->attn_norm, hid, d->eps, h + m * hid);
        rc = d->mla ? mla_attention(d, L, &S, h, y, q, qj, ol, o) : gqa_attention(d, L, &S, h, y, qj, o);
        if (rc || (rc = linear(&L->w_o, M, o, y, n_threads))) break;
        for (int64_t i = 0; i < M * hid; i++) x[i] += y[i];
        for (int m = 0; m < M; m++) rmsnorm(x + m * hid, L->mlp_norm, hid, d->eps, h + m * hid);
        if ((rc = linear(&L->w_gate_up, M, h, y, n_threads))) break;
        for (int m = 0; m < M; m++)
            for (int64_t i = 0; i < I; i++) q[m * I + i] = act(y[m * 2 * I + i], d->act) * y[m * 2 * I + I + i];
        if ((rc = linear(&L->w_down, M, q, y, n_threads))) break;
        for (int64_t i = 0; i < M * hid; i++) x[i] += y[i];
    }
    free(buf);
    return rc;
}
