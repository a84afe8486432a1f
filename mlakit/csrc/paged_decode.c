/* Paged decode attention for CPUs: one query token per sequence, K/V (or MLA latents) read
 * through block tables, fp32 / bf16 / int8 rows, split over positions for parallelism.
 *
 * One routine serves both cache kinds (see mlakit/attention/backends/cpu.py):
 *   MLA absorbed:  one group; nq = H query heads; K row = [c_kv | k_rope] (dk = r + d_rope),
 *                  V = the same row's first dv = r values.
 *   MHA/GQA/MQA:   G groups; nq = H / G query heads per group; K and V rows of G * D values,
 *                  group g reads columns g * D .. g * D + D - 1 (group_stride = D).
 *
 * Work item = (sequence, group, split of positions). Each item streams its positions in tiles of
 * TILE rows: rows are converted to fp32 once per tile (widths zero-padded to 16), scores for all
 * nq heads are computed from the tile sixteen rows at a time (independent FMA chains and one
 * transposing reduction), and an online softmax (running max m, sum l, accumulator acc kept in
 * registers over the tile) folds the tile in with one rescale per tile. Loops are written with GCC vector extensions (16 floats). Items write (acc, m, l); a merge weights splits by exp(m - max).
 * Only positions < context_len are visited, so nothing is masked and no -inf enters the maths
 * except the initial running max.
 *
 * Every bf16 cache on CPUs with AVX512-BF16 takes its own routine (attend_range_bf16, written for
 * MLA; a GQA group reads its K columns and its V columns through the same code, 2.3x the generic
 * routine's speed there, whose per-head dot products with reduction trees it replaced): the
 * tile is transposed so that 16 keys sit in the lanes of one vector (scores without reduction
 * trees) and the value product runs on bf16 pairs of consecutive keys (probabilities rounded to
 * bf16); 1.45x faster per layer at 4096 tokens x 9 heads of width 96. Its tiles are 32 keys, so
 * that the tile's rows, transposed keys and value pairs stay in L1; heads are scored in blocks of
 * up to 4 sharing each key load (9 heads: 3 x 3, six independent VDPBF16PS chains); the softmax
 * runs in registers with an inline exp; the next tile's rows are prefetched into L2 a few rows per
 * head. Together 1.6x over the first version (16 x 4096 tokens, one thread: 95 -> 57 ms). The value
 * product runs rows in blocks of up to 4 sharing each value-pair load (each row's probabilities and
 * alpha are kept beside its scores until then).
 * The same routine serves absorbed prefill: a block of consecutive query tokens of a chunk is one
 * pseudo-sequence over the block's prefix (one shared block table), its rows = tokens x heads, each
 * row with its own causal length (row_lens), so each key tile is transposed and loaded once per block
 * instead of once per token.
 *
 * Built at first use by mlakit with the C compiler, -O3 -march=native -ffast-math -fopenmp:
 * the loops over widths vectorise to whatever the CPU has (AVX2, AVX-512).
 */
#include <math.h>
#include <stdint.h>
#if defined(__AVX512BF16__) && defined(__AVX512BW__)
#include <immintrin.h>
#define HAVE_DPBF16 1 /* bf16 rows: scores by VDPBF16PS straight from the cache, 32 products per instruction */
#define HAVE_DPBF16_FLAG 1
#else
#define HAVE_DPBF16_FLAG 0
#endif
#include <stdlib.h>
#include <string.h>

#define TILE 64
#define MLA_TILE 32 /* the bf16 MLA routine's tile (its softmax is written for exactly 32 keys): its rows,
                      transposed keys and value pairs stay in L1 */
_Static_assert(MLA_TILE == 32, "attend_range_bf16's softmax takes a tile as two 16-lane vectors");
_Static_assert(MLA_TILE <= TILE, "the MLA routine uses the generic routine's scratch buffers");

enum { F32 = 0, BF16 = 1, I8 = 2 };

static inline float bf16_to_f32(uint16_t x) {
    uint32_t u = ((uint32_t)x) << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline void load_row(const void *base, int dtype, int64_t off, int n, float scale, float *restrict dst) {
    if (dtype == F32) {
        const float *p = (const float *)base + off;
        for (int i = 0; i < n; i++) dst[i] = p[i];
    } else if (dtype == BF16) {
        const uint16_t *p = (const uint16_t *)base + off;
        for (int i = 0; i < n; i++) dst[i] = bf16_to_f32(p[i]);
    } else {
        const int8_t *p = (const int8_t *)base + off;
        for (int i = 0; i < n; i++) dst[i] = (float)p[i] * scale;
    }
}

typedef float v16 __attribute__((vector_size(64))); /* 16 floats: one zmm, or two ymm on AVX2 */
#define VL 16
#define ROUND16(n) (((n) + VL - 1) / VL * VL)

/* cache slots of positions t0 .. t0 + n - 1 through a block table: one division per tile, not per row */
static inline void tile_slots(const int64_t *table, int block_size, int64_t t0, int n, int64_t *slots) {
    int64_t blk = t0 / block_size, off = t0 % block_size;
    for (int j = 0; j < n; j++) {
        slots[j] = table[blk] * block_size + off;
        if (++off == block_size) off = 0, blk++;
    }
}

static inline float hsum(v16 v) {
    float s = 0.f;
    for (int i = 0; i < VL; i++) s += v[i];
    return s;
}

static inline v16 vload(const float *p) {
    v16 v;
    memcpy(&v, p, sizeof(v));
    return v;
}

/* [sum(a[0]), ..., sum(a[15])]: a transposing reduction tree, 15 adds and 30 shuffles for 16 sums
 * (independent horizontal sums would take about 8 dependent instructions each). */
static inline v16 reduce16(const v16 *a) {
    v16 b[8], c[4], d[2];
    for (int i = 0; i < 8; i++)
        b[i] = __builtin_shufflevector(a[2 * i], a[2 * i + 1], 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23) +
               __builtin_shufflevector(a[2 * i], a[2 * i + 1], 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30,
                                       31);
    for (int i = 0; i < 4; i++)
        c[i] = __builtin_shufflevector(b[2 * i], b[2 * i + 1], 0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19, 24, 25, 26, 27) +
               __builtin_shufflevector(b[2 * i], b[2 * i + 1], 4, 5, 6, 7, 12, 13, 14, 15, 20, 21, 22, 23, 28, 29, 30,
                                       31);
    for (int i = 0; i < 2; i++)
        d[i] = __builtin_shufflevector(c[2 * i], c[2 * i + 1], 0, 1, 4, 5, 8, 9, 12, 13, 16, 17, 20, 21, 24, 25, 28, 29) +
               __builtin_shufflevector(c[2 * i], c[2 * i + 1], 2, 3, 6, 7, 10, 11, 14, 15, 18, 19, 22, 23, 26, 27, 30,
                                       31);
    return __builtin_shufflevector(d[0], d[1], 0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30) +
           __builtin_shufflevector(d[0], d[1], 1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
}

/* scores of one head against 16 rows (rows dkp apart): 16 independent FMA chains, one reduction tree */
static inline v16 dot16(const float *restrict q, const float *restrict r, int dkp) {
    v16 a[16];
    for (int j = 0; j < 16; j++) a[j] = (v16){0};
    for (int d = 0; d < dkp; d += VL) {
        v16 qv = vload(q + d);
        for (int j = 0; j < 16; j++) a[j] += qv * vload(r + (size_t)j * dkp + d);
    }
    return reduce16(a);
}

/* acc[c0 : c0 + nc * VL] = acc * alpha + sum_j e[j] * rows[j][c0 : ...], nc <= 8 vectors of acc in
 * registers, rows taken two at a time so that every accumulator has two independent chains.
 * Always inlined with a constant nc (see accumulate): a run-time nc left a compare and a branch
 * around every FMA of the inner loop (a fifth of the MLA decode's time). */
static inline __attribute__((always_inline)) void accumulate_cols(float *restrict acc, float alpha,
                                                                  const float *restrict e,
                                                                  const float *restrict rows, int step, int n,
                                                                  int c0, const int nc) {
    v16 a[8], b[8];
    for (int c = 0; c < nc; c++) {
        a[c] = vload(acc + c0 + c * VL) * alpha;
        b[c] = (v16){0};
    }
    int j = 0;
    for (; j + 1 < n; j += 2) {
        const float *r0 = rows + (size_t)j * step + c0, *r1 = r0 + step;
        for (int c = 0; c < nc; c++) {
            a[c] += e[j] * vload(r0 + c * VL);
            b[c] += e[j + 1] * vload(r1 + c * VL);
        }
    }
    if (j < n)
        for (int c = 0; c < nc; c++) a[c] += e[j] * vload(rows + (size_t)j * step + c0 + c * VL);
    for (int c = 0; c < nc; c++) {
        v16 t = a[c] + b[c];
        memcpy(acc + c0 + c * VL, &t, sizeof(t));
    }
}

/* acc[0:dvp] = acc * alpha + sum_j e[j] * rows[j][0:dvp] */
static inline void accumulate(float *restrict acc, float alpha, const float *restrict e, const float *restrict rows,
                              int step, int n, int dvp) {
    for (int c0 = 0; c0 < dvp; c0 += 8 * VL) {
        switch ((dvp - c0) / VL < 8 ? (dvp - c0) / VL : 8) {
#define COLS(k) \
    case k: accumulate_cols(acc, alpha, e, rows, step, n, c0, k); break;
            COLS(1) COLS(2) COLS(3) COLS(4) COLS(5) COLS(6) COLS(7) COLS(8)
#undef COLS
        }
    }
}

/* fold one tile's scores s[0:n] of one head into its running (m, l, acc) */
static inline void softmax_accumulate(float *restrict s, int n, float *m, float *l, float *restrict acc,
                                      const float *restrict vrows, int vstep, int dvp) {
    float mx = *m;
    for (int j = 0; j < n; j++) mx = s[j] > mx ? s[j] : mx;
    float alpha = *m == -INFINITY ? 0.f : expf(*m - mx);
    float sum = 0.f;
    for (int j = 0; j < n; j++) {
        s[j] = expf(s[j] - mx);
        sum += s[j];
    }
    *l = *l * alpha + sum;
    *m = mx;
    accumulate(acc, alpha, s, vrows, vstep, n, dvp);
}


#ifdef HAVE_DPBF16
/* 16 x 16 dwords in place: r[i] lane j -> r[j] lane i (unpacks within 128-bit lanes, then 4 x 4
 * blocks of lanes) */
static inline void transpose16x16(__m512i r[16]) {
    __m512i t[16], u[16];
    for (int i = 0; i < 8; i++) {
        t[2 * i] = _mm512_unpacklo_epi32(r[2 * i], r[2 * i + 1]);
        t[2 * i + 1] = _mm512_unpackhi_epi32(r[2 * i], r[2 * i + 1]);
    }
    for (int g = 0; g < 4; g++) { /* u[4g + x], lane L: column 4L + x of rows 4g .. 4g + 3 */
        u[4 * g] = _mm512_unpacklo_epi64(t[4 * g], t[4 * g + 2]);
        u[4 * g + 1] = _mm512_unpackhi_epi64(t[4 * g], t[4 * g + 2]);
        u[4 * g + 2] = _mm512_unpacklo_epi64(t[4 * g + 1], t[4 * g + 3]);
        u[4 * g + 3] = _mm512_unpackhi_epi64(t[4 * g + 1], t[4 * g + 3]);
    }
    for (int x = 0; x < 4; x++) {
        __m512i s0 = _mm512_shuffle_i32x4(u[x], u[4 + x], 0x44), s1 = _mm512_shuffle_i32x4(u[x], u[4 + x], 0xEE);
        __m512i s2 = _mm512_shuffle_i32x4(u[8 + x], u[12 + x], 0x44);
        __m512i s3 = _mm512_shuffle_i32x4(u[8 + x], u[12 + x], 0xEE);
        r[x] = _mm512_shuffle_i32x4(s0, s2, 0x88);
        r[4 + x] = _mm512_shuffle_i32x4(s0, s2, 0xDD);
        r[8 + x] = _mm512_shuffle_i32x4(s1, s3, 0x88);
        r[12 + x] = _mm512_shuffle_i32x4(s1, s3, 0xDD);
    }
}

/* For nr rows h sharing each value load: acc_h[c0 .. c0 + nc) chunks of 16 = acc_h * alpha_h +
 * sum_i pp_h[i] . vp[i] over npk key pairs, by VDPBF16PS. Row h's accumulator is acc + h * dvp, its
 * probability pairs pp + h * pstride and its alpha al[h * pstride] (always inlined with constant nr,
 * nc: nr * nc independent chains) */
static inline __attribute__((always_inline)) void accumulate_rows(float *restrict acc, int dvp,
                                                                  const uint32_t *restrict pp, const float *al,
                                                                  int pstride, const uint32_t *restrict vp, int npk,
                                                                  int dvc, int c0, const int nc, const int nr) {
    __m512 a[4][4];
    for (int r = 0; r < nr; r++)
        for (int c = 0; c < nc; c++)
            a[r][c] = _mm512_mul_ps(_mm512_loadu_ps(acc + (size_t)r * dvp + 16 * (c0 + c)),
                                    _mm512_set1_ps(al[(size_t)r * pstride]));
    for (int i = 0; i < npk; i++) {
        const uint32_t *vi = vp + ((size_t)i * dvc + c0) * 16;
        __m512bh v[4];
        for (int c = 0; c < nc; c++) v[c] = (__m512bh)_mm512_loadu_si512(vi + 16 * c);
        for (int r = 0; r < nr; r++) {
            __m512bh p = (__m512bh)_mm512_set1_epi32((int)pp[(size_t)r * pstride + i]);
            for (int c = 0; c < nc; c++) a[r][c] = _mm512_dpbf16_ps(a[r][c], v[c], p);
        }
    }
    for (int r = 0; r < nr; r++)
        for (int c = 0; c < nc; c++) _mm512_storeu_ps(acc + (size_t)r * dvp + 16 * (c0 + c), a[r][c]);
}

/* e^x for 16 lanes (x <= 0 here): 2^(x log2 e) = 2^n 2^f, |f| <= 1/2, 2^f by its degree-6 Taylor
 * polynomial (relative error < 2e-7), 2^n by VSCALEFPS; below -87 the result underflows to ~0 */
static inline __m512 exp512(__m512 x) {
    __m512 t = _mm512_mul_ps(_mm512_max_ps(x, _mm512_set1_ps(-87.f)), _mm512_set1_ps(1.44269504f));
    __m512 n = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 f = _mm512_sub_ps(t, n);
    __m512 p = _mm512_set1_ps(1.5403530e-4f);
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.3333558e-3f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(9.6181291e-3f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(5.5504109e-2f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(2.4022651e-1f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(6.9314718e-1f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.f));
    return _mm512_scalef_ps(p, n);
}

#endif

/* keys of the tile [t0, t0 + n) that query row h sees: all n, or fewer when the row's own length
 * lim[h] ends inside the tile (the causal edge of a block of prefill tokens); <= 0 when none */
static inline int row_keys(const int64_t *lim, int h, int64_t t0, int n) {
    if (lim == NULL) return n;
    int64_t k = lim[h] - t0;
    return k < n ? (int)k : n;
}

#ifdef HAVE_DPBF16
/* sc[i][0 : MLA_TILE] = scores of heads i < nh (query pairs qp[i * npair ..]) against the transposed
 * tile kt [npair][MLA_TILE]: nh * MLA_TILE / 16 independent VDPBF16PS chains, each key load shared
 * by the nh heads (always inlined with a constant nh) */
static inline __attribute__((always_inline)) void score_heads(const uint32_t *restrict qp, int npair,
                                                               const uint32_t *restrict kt, float *restrict sc,
                                                               const int nh) {
    __m512 s[4][MLA_TILE / 16];
    for (int i = 0; i < nh; i++)
        for (int g = 0; g < MLA_TILE / 16; g++) s[i][g] = _mm512_setzero_ps();
    for (int c = 0; c < npair; c++) {
        __m512bh b[4];
        for (int i = 0; i < nh; i++) b[i] = (__m512bh)_mm512_set1_epi32((int)qp[(size_t)i * npair + c]);
        for (int g = 0; g < MLA_TILE / 16; g++) {
            __m512bh kv = (__m512bh)_mm512_loadu_si512(kt + (size_t)c * MLA_TILE + 16 * g);
            for (int i = 0; i < nh; i++) s[i][g] = _mm512_dpbf16_ps(s[i][g], kv, b[i]);
        }
    }
    for (int i = 0; i < nh; i++)
        for (int g = 0; g < MLA_TILE / 16; g++) _mm512_storeu_ps(sc + (size_t)i * MLA_TILE + 16 * g, s[i][g]);
}

/* The work item over bf16 rows: keys from base (dk columns), values from vbase (dv columns); for MLA
 * both are the latent row [c_kv | k_rope] (values = its first dv columns), for a GQA group its K and
 * V columns. Keys in vector lanes instead of one head-row dot product per lane:
 *   kt = the tile's keys transposed as bf16 pairs [dk / 2][MLA_TILE] (16 x 16 dword transposes), so
 *        the scores of 16 keys for one head are dk / 2 VDPBF16PS with a broadcast query pair and
 *        need no horizontal sums (the generic path spends as much on its reduction trees);
 *   vp = value rows interleaved in pairs of consecutive keys, so o += p . v is one VDPBF16PS per
 *        two keys and 16 columns, the probabilities rounded to bf16 (the normaliser l sums the
 *        rounded values, so the weights still sum to one).
 * Same outputs as attend_range (acc [nq, dvp], m, l). Scratch: kt >= ceil(dk / 32) * 16 * MLA_TILE
 * dwords, vp >= MLA_TILE / 2 * dvp dwords, sc >= nq * MLA_TILE floats. */
static void attend_range_bf16(const __m512bh *qb, int nq, int dk, int dv, const uint16_t *base, int64_t stride,
                                  const uint16_t *vbase, int64_t vstride,
                                  const int64_t *table, int block_size, int64_t p0, int64_t p1, const int64_t *lim,
                                  float *restrict acc, float *restrict m, float *restrict l, uint32_t *restrict kt,
                                  uint32_t *restrict vp, float *restrict sc) {
    const int nchunk = (dk + 31) / 32, npair = nchunk * 16, dvc = (dv + 15) / 16, dvp = dvc * 16;
    const uint32_t *qp = (const uint32_t *)qb; /* [nq, npair] bf16 pairs, zero past dk */
    uint16_t ix[32];
    for (int k = 0; k < 16; k++) ix[2 * k] = (uint16_t)k, ix[2 * k + 1] = (uint16_t)(32 + k);
    const __m512i inter = _mm512_loadu_si512(ix); /* a0 b0 a1 b1 ... a15 b15 */
    for (int h = 0; h < nq; h++) {
        m[h] = -INFINITY;
        l[h] = 0.f;
    }
    memset(acc, 0, sizeof(float) * (size_t)nq * dvp);
    memset(kt, 0, sizeof(uint32_t) * (size_t)npair * MLA_TILE); /* columns past a short tile stay finite */
    for (int64_t t0 = p0; t0 < p1; t0 += MLA_TILE) {
        int n = (int)((p1 - t0) < MLA_TILE ? (p1 - t0) : MLA_TILE), ng = (n + 15) / 16, npk = (n + 1) / 2;
        const uint16_t *rp[MLA_TILE], *rv[MLA_TILE];
        int64_t slots[MLA_TILE];
        tile_slots(table, block_size, t0, n, slots);
        for (int j = 0; j < ng * 16; j++) { /* past n: repeat the last row (weight zero) */
            int64_t slot = slots[j < n ? j : n - 1];
            rp[j] = base + slot * stride;
            rv[j] = vbase + slot * vstride;
        }
        /* the next tile's rows, prefetched into L2 a few rows per head below while this tile is
           computed (one burst of prefetches stalls on the miss queue; the strided row loads of the
           transposes defeat the hardware prefetchers) */
        int nn = (int)((p1 - t0 - MLA_TILE) < MLA_TILE ? (p1 - t0 - MLA_TILE) : MLA_TILE);
        int64_t next[MLA_TILE];
        if (nn > 0) tile_slots(table, block_size, t0 + MLA_TILE, nn, next);
        for (int g = 0; g < ng; g++)
            for (int k = 0; k < nchunk; k++) {
                __mmask32 mk = dk - 32 * k >= 32 ? 0xffffffffu : ((1u << (dk - 32 * k)) - 1u);
                __m512i r[16];
                for (int t = 0; t < 16; t++) r[t] = _mm512_maskz_loadu_epi16(mk, rp[16 * g + t] + 32 * k);
                transpose16x16(r);
                for (int j = 0; j < 16; j++) _mm512_storeu_si512(kt + (size_t)(16 * k + j) * MLA_TILE + 16 * g, r[j]);
            }
        for (int i = 0; i < npk; i++)
            for (int c = 0; c < dvc; c++) {
                __mmask16 mv = dv - 16 * c >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (dv - 16 * c)) - 1u);
                __m512i a = _mm512_castsi256_si512(_mm256_maskz_loadu_epi16(mv, rv[2 * i] + 16 * c));
                __m512i b = _mm512_castsi256_si512(_mm256_maskz_loadu_epi16(mv, rv[2 * i + 1] + 16 * c));
                _mm512_storeu_si512(vp + ((size_t)i * dvc + c) * 16, _mm512_permutex2var_epi16(a, inter, b));
            }
        for (int h = 0; h < nq;) { /* scores, heads in blocks of up to 4 sharing each key load */
            int nb = (nq - h + 3) / 4, hb = (nq - h + nb - 1) / nb; /* 9 heads: 3 + 3 + 3 */
            switch (hb) {
#define HEADS(k) \
    case k: score_heads(qp + (size_t)h * npair, npair, kt, sc + (size_t)h * MLA_TILE, k); break;
                HEADS(1) HEADS(2) HEADS(3) HEADS(4)
#undef HEADS
            }
            h += hb;
        }
        for (int h = 0; h < nq; h++) {
            for (int j = h * nn / nq; j < (h + 1) * nn / nq; j++) {
                uintptr_t a = (uintptr_t)(base + next[j] * stride), e = a + 2 * (uintptr_t)dk;
                for (a &= ~(uintptr_t)63; a < e; a += 64) _mm_prefetch((const char *)a, _MM_HINT_T1);
                if (vbase != base) { /* GQA: the value row lives elsewhere */
                    a = (uintptr_t)(vbase + next[j] * vstride), e = a + 2 * (uintptr_t)dv;
                    for (a &= ~(uintptr_t)63; a < e; a += 64) _mm_prefetch((const char *)a, _MM_HINT_T1);
                }
            }
            int nh = row_keys(lim, h, t0, n); /* this row's keys in the tile (fewer at its causal edge) */
            float *s = sc + (size_t)h * MLA_TILE;
            if (nh <= 0) { /* past this row's causal edge: probabilities 0, alpha 1 */
                memset(s, 0, sizeof(float) * 16);
                s[16] = 1.f;
                continue;
            }
            __mmask16 k0 = nh >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << nh) - 1u);
            __mmask16 k1 = nh >= 32 ? (__mmask16)0xffff : nh > 16 ? (__mmask16)((1u << (nh - 16)) - 1u) : 0;
            __m512 x0 = _mm512_loadu_ps(s), x1 = _mm512_loadu_ps(s + 16), ninf = _mm512_set1_ps(-INFINITY);
            float mx = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_mask_mov_ps(ninf, k0, x0),
                                                          _mm512_mask_mov_ps(ninf, k1, x1)));
            mx = m[h] > mx ? m[h] : mx;
            /* past the first tiles the running max rarely moves: no exp then */
            float alpha = mx == m[h] ? 1.f : m[h] == -INFINITY ? 0.f : expf(m[h] - mx);
            __m512 vmx = _mm512_set1_ps(mx);
            __m512 e0 = _mm512_maskz_mov_ps(k0, exp512(_mm512_sub_ps(x0, vmx)));
            __m512 e1 = _mm512_maskz_mov_ps(k1, exp512(_mm512_sub_ps(x1, vmx)));
            __m512i pb = (__m512i)_mm512_cvtne2ps_pbh(e1, e0); /* the probabilities as bf16 pairs */
            uint32_t *pp = (uint32_t *)s;                       /* stored over the scores */
            _mm512_storeu_si512(pp, pb);
            /* the normaliser sums the rounded probabilities: bf16 -> fp32 is a 16-bit shift */
            __m512 lo = _mm512_castsi512_ps(_mm512_slli_epi32(pb, 16));
            __m512 hi = _mm512_castsi512_ps(_mm512_and_si512(pb, _mm512_set1_epi32((int)0xffff0000u)));
            l[h] = l[h] * alpha + _mm512_reduce_add_ps(_mm512_add_ps(lo, hi));
            m[h] = mx;
            s[16] = alpha; /* beside the 16 probability pairs, for the value product below */
        }
        /* o += p . v: rows in blocks of up to 4 sharing each value load, 16 columns x up to 4 */
        for (int h = 0; h < nq;) {
            int nb = (nq - h + 3) / 4, hb = (nq - h + nb - 1) / nb;
            const uint32_t *pp = (const uint32_t *)(sc + (size_t)h * MLA_TILE);
            for (int c0 = 0; c0 < dvc; c0 += 4) {
                int nc = dvc - c0 < 4 ? dvc - c0 : 4;
                switch (hb * 4 + nc) {
#define ROWS(r, c) \
    case r * 4 + c: accumulate_rows(acc + (size_t)h * dvp, dvp, pp, sc + (size_t)h * MLA_TILE + 16, MLA_TILE, vp, npk, dvc, c0, c, r); break;
#define ROWS4(r) ROWS(r, 1) ROWS(r, 2) ROWS(r, 3) ROWS(r, 4)
                    ROWS4(1) ROWS4(2) ROWS4(3) ROWS4(4)
#undef ROWS4
#undef ROWS
                }
            }
            h += hb;
        }
    }
}
#endif

/* One work item: positions [p0, p1) of one (sequence, group). q [nq, dkp] zero-padded;
 * writes acc [nq, dvp], m [nq], l [nq]. kt [TILE, dkp], vt [TILE, dvp], sc [nq, TILE] scratch. */
static void attend_range(const float *restrict q, int nq, int dk, int dv, const void *k_base, const void *v_base,
                         const float *k_scale, const float *v_scale, int dtype, int64_t k_stride, int64_t v_stride,
                         int64_t k_off, int64_t v_off, int same_row, const int64_t *table, int block_size, int64_t p0,
                         int64_t p1, const int64_t *lim, float *restrict acc, float *restrict m, float *restrict l, float *restrict kt,
                         float *restrict vt, float *restrict sc, const void *qbv) {
    int dkp = ROUND16(dk), dvp = ROUND16(dv);
#ifdef HAVE_DPBF16
    const __m512bh *qb = (const __m512bh *)qbv;
    if (qb != NULL) { /* bf16 rows: MLA (values = the key row's first dv columns) or a GQA group's K and V */
        const uint16_t *kb = (const uint16_t *)k_base + k_off;
        const uint16_t *vb = same_row ? kb : (const uint16_t *)v_base + v_off;
        attend_range_bf16(qb, nq, dk, dv, kb, k_stride, vb, same_row ? k_stride : v_stride, table, block_size, p0,
                              p1, lim, acc, m, l, (uint32_t *)kt, (uint32_t *)vt, sc);
        return;
    }
#else
    (void)qbv;
#endif
    for (int h = 0; h < nq; h++) {
        m[h] = -INFINITY;
        l[h] = 0.f;
    }
    memset(acc, 0, sizeof(float) * (size_t)nq * dvp);
    memset(kt, 0, sizeof(float) * (size_t)TILE * dkp); /* zero padding columns stay zero */
    memset(vt, 0, sizeof(float) * (size_t)TILE * dvp);
    for (int64_t t0 = p0; t0 < p1; t0 += TILE) {
        int n = (int)((p1 - t0) < TILE ? (p1 - t0) : TILE);
        int n16 = (n + VL - 1) / VL * VL; /* rows past n hold zeros or stale finite values: scored, never used */
        int64_t slots[TILE];
        tile_slots(table, block_size, t0, n, slots);
        for (int j = 0; j < n; j++) {
            int64_t slot = slots[j];
            float ks = k_scale ? k_scale[slot] : 1.f;
            load_row(k_base, dtype, slot * k_stride + k_off, dk, ks, kt + (size_t)j * dkp);
            if (!same_row) {
                float vs = v_scale ? v_scale[slot] : 1.f;
                load_row(v_base, dtype, slot * v_stride + v_off, dv, vs, vt + (size_t)j * dvp);
            }
        }
        const float *vrows = same_row ? kt : vt;
        int vstep = same_row ? dkp : dvp;
        for (int h = 0; h < nq; h++) {
            int nh = row_keys(lim, h, t0, n);
            if (nh <= 0) continue;
            const float *qh = q + (size_t)h * dkp;
            float *s = sc + (size_t)h * TILE;
            for (int j = 0; j < n16; j += VL) {
                v16 sj = dot16(qh, kt + (size_t)j * dkp, dkp);
                memcpy(s + j, &sj, sizeof(sj));
            }
            softmax_accumulate(s, nh, m + h, l + h, acc + (size_t)h * dvp, vrows, vstep, dvp);
        }
    }
}

/* q [n_seqs, n_groups, nq, dk] fp32 (pre-scaled) -> out [n_seqs, n_groups, nq, dv] fp32.
 * tables [n_seqs, table_stride] int64 block ids; ctx_lens [n_seqs] int64.
 * row_lens: NULL, or [n_seqs, n_groups, nq] int64: query row h of (seq, group) sees only positions
 *   < row_lens[..., h] (<= ctx_lens[seq]). A block of prefill tokens is then one sequence whose rows
 *   are its tokens' heads, each with its own causal length: the block shares every key tile.
 * k_base/v_base: the storage; row r of group g starts at r * stride + g * group_stride.
 * k_scale/v_scale: per-row fp32 scales for int8 storage, else NULL. */
int mlakit_paged_decode(int n_seqs, int n_groups, int nq, int dk, int dv, const float *q, const void *k_base,
                        const void *v_base, const float *k_scale, const float *v_scale, int dtype, int64_t k_stride,
                        int64_t v_stride, int64_t group_stride, const int64_t *tables, int64_t table_stride,
                        const int64_t *ctx_lens, const int64_t *row_lens, int block_size, int n_splits, int n_threads,
                        float *out) {
    int same_row = (k_base == v_base) && group_stride == 0 && k_stride == v_stride;
    int64_t n_items = (int64_t)n_seqs * n_groups * n_splits;
    int dkp = ROUND16(dk), dvp = ROUND16(dv);
    size_t part = (size_t)nq * dvp;
    float *acc = (float *)malloc(sizeof(float) * part * n_items);
    float *ms = (float *)malloc(sizeof(float) * nq * n_items);
    float *ls = (float *)malloc(sizeof(float) * nq * n_items);
    if (!acc || !ms || !ls) {
        free(acc);
        free(ms);
        free(ls);
        return 1;
    }
    int failed = 0;
#pragma omp parallel num_threads(n_threads)
    {
        float *kt = (float *)malloc(sizeof(float) * TILE * dkp);
        float *vt = (float *)malloc(sizeof(float) * TILE * dvp);
        float *sc = (float *)malloc(sizeof(float) * TILE * nq);
        float *qp = (float *)calloc((size_t)nq * dkp, sizeof(float));
        void *qb = NULL;
#ifdef HAVE_DPBF16
        int nchunk = (dk + 31) / 32;
        if (dtype == BF16) qb = aligned_alloc(64, sizeof(__m512bh) * (size_t)nq * nchunk);
#endif
        if (!kt || !vt || !sc || !qp || (dtype == BF16 && HAVE_DPBF16_FLAG && !qb)) {
#pragma omp atomic write
            failed = 1;
        } else {
#pragma omp for schedule(dynamic, 1)
            for (int64_t item = 0; item < n_items; item++) {
                int64_t split = item % n_splits;
                int64_t sg = item / n_splits;
                int64_t g = sg % n_groups;
                int64_t seq = sg / n_groups;
                int64_t len = ctx_lens[seq];
                int64_t chunk = (len + n_splits - 1) / n_splits;
                int64_t p0 = split * chunk, p1 = p0 + chunk < len ? p0 + chunk : len;
                for (int h = 0; h < nq; h++) memcpy(qp + (size_t)h * dkp, q + ((size_t)sg * nq + h) * dk, sizeof(float) * dk);
#ifdef HAVE_DPBF16
                if (qb) { /* q as bf16 pairs, zero past dk */
                    __m512bh *out = (__m512bh *)qb;
                    for (int h = 0; h < nq; h++)
                        for (int c = 0; c < nchunk; c++) {
                            float tmp[32] = {0};
                            int w = dk - c * 32 < 32 ? dk - c * 32 : 32;
                            memcpy(tmp, qp + (size_t)h * dkp + c * 32, sizeof(float) * w);
                            out[h * nchunk + c] = _mm512_cvtne2ps_pbh(_mm512_loadu_ps(tmp + 16), _mm512_loadu_ps(tmp));
                        }
                }
#endif
                attend_range(qp, nq, dk, dv, k_base, v_base, k_scale, v_scale, dtype, k_stride,
                             v_stride, g * group_stride, g * group_stride, same_row, tables + seq * table_stride,
                             block_size, p0, p1, row_lens ? row_lens + sg * nq : NULL, acc + (size_t)item * part, ms + (size_t)item * nq,
                             ls + (size_t)item * nq, kt, vt, sc, qb);
            }
        }
        free(kt);
        free(vt);
        free(sc);
        free(qp);
        free(qb);
    }
    if (!failed) {
        /* merge the splits of each (sequence, group): weights exp(m_i - max_i m_i) */
        for (int64_t sg = 0; sg < (int64_t)n_seqs * n_groups; sg++) {
            for (int h = 0; h < nq; h++) {
                float mx = -INFINITY;
                for (int s = 0; s < n_splits; s++) {
                    float mi = ms[(sg * n_splits + s) * nq + h];
                    mx = mi > mx ? mi : mx;
                }
                float *o = out + ((size_t)sg * nq + h) * dv;
                float total = 0.f;
                for (int d = 0; d < dv; d++) o[d] = 0.f;
                for (int s = 0; s < n_splits; s++) {
                    int64_t item = sg * n_splits + s;
                    float mi = ms[item * nq + h];
                    if (mi == -INFINITY) continue; /* an empty split */
                    float w = expf(mi - mx);
                    total += w * ls[item * nq + h];
                    const float *a = acc + (size_t)item * part + (size_t)h * dvp;
                    for (int d = 0; d < dv; d++) o[d] += w * a[d];
                }
                float inv = total > 0.f ? 1.f / total : 0.f;
                for (int d = 0; d < dv; d++) o[d] *= inv;
            }
        }
    }
    free(acc);
    free(ms);
    free(ls);
    return failed ? 1 : 0;
}
