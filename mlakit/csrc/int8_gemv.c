/* int8 weight x int8 activation products for a few rows (decode), llama.cpp-style, with AVX512-VNNI.
 *
 *   y[m, n] = s_w[n] * sum_b s_x[m, b] * sum_{k in b} x_q[m, k] * w_q[n, k]   (+ bias[n])
 *
 * Weights: int8 per output channel (scale s_w), stored offset by +128 as uint8 in tiles of 16 rows:
 * [ceil(N / 16), Kp / 64, 16, 64] (Kp = K rounded up to 64; zero weights = 128 in the padding
 * columns and in the padding rows of the last tile), so the
 * kernel streams each tile's 16 rows x 64 bytes from one sequential address range. Row-major
 * [N, Kp] made it read 16 interleaved streams, which the hardware prefetchers follow badly:
 * 9.5 GB/s against 21 GB/s tiled on one AMD EPYC core (24 GB/s read bandwidth). Activations: quantized here per row in
 * blocks of 64 values (scale s_x[m, b] = max|x| / 127 over the block), as llama.cpp quantizes its
 * activations to Q8 blocks before its integer dot products. VPDPBUSD multiplies unsigned bytes by
 * signed bytes, 64 products per instruction; the +128 offset of the weights adds
 * 128 * sum_{k in b} x_q[m, k] to each block's sum, subtracted once per row.
 *
 * Work: tiles of 16 rows of W over the OpenMP threads; each weight block is loaded once and
 * multiplied with every activation row (M <= MAX_ROWS), per-block int32 sums are scaled into fp32
 * accumulators, and 16 rows are reduced at once with a transposing tree.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define MAX_ROWS 16

#if defined(__AVX512VNNI__) && defined(__AVX512BW__) && defined(__AVX512BF16__)
#include <immintrin.h>

int mlakit_int8_gemv_available(void) { return 1; }

static inline __m512 reduce16_ps(const __m512 *a) {
    /* [sum(a[0]), ..., sum(a[15])] by pairwise interleaving (see paged_decode.c for the tree) */
    __m512 b[8], c[4], d[2];
    const __m512i i0 = _mm512_set_epi32(23, 22, 21, 20, 19, 18, 17, 16, 7, 6, 5, 4, 3, 2, 1, 0);
    const __m512i i1 = _mm512_set_epi32(31, 30, 29, 28, 27, 26, 25, 24, 15, 14, 13, 12, 11, 10, 9, 8);
    const __m512i j0 = _mm512_set_epi32(27, 26, 25, 24, 19, 18, 17, 16, 11, 10, 9, 8, 3, 2, 1, 0);
    const __m512i j1 = _mm512_set_epi32(31, 30, 29, 28, 23, 22, 21, 20, 15, 14, 13, 12, 7, 6, 5, 4);
    const __m512i k0 = _mm512_set_epi32(29, 28, 25, 24, 21, 20, 17, 16, 13, 12, 9, 8, 5, 4, 1, 0);
    const __m512i k1 = _mm512_set_epi32(31, 30, 27, 26, 23, 22, 19, 18, 15, 14, 11, 10, 7, 6, 3, 2);
    const __m512i l0 = _mm512_set_epi32(30, 28, 26, 24, 22, 20, 18, 16, 14, 12, 10, 8, 6, 4, 2, 0);
    const __m512i l1 = _mm512_set_epi32(31, 29, 27, 25, 23, 21, 19, 17, 15, 13, 11, 9, 7, 5, 3, 1);
    for (int i = 0; i < 8; i++)
        b[i] = _mm512_add_ps(_mm512_permutex2var_ps(a[2 * i], i0, a[2 * i + 1]),
                             _mm512_permutex2var_ps(a[2 * i], i1, a[2 * i + 1]));
    for (int i = 0; i < 4; i++)
        c[i] = _mm512_add_ps(_mm512_permutex2var_ps(b[2 * i], j0, b[2 * i + 1]),
                             _mm512_permutex2var_ps(b[2 * i], j1, b[2 * i + 1]));
    for (int i = 0; i < 2; i++)
        d[i] = _mm512_add_ps(_mm512_permutex2var_ps(c[2 * i], k0, c[2 * i + 1]),
                             _mm512_permutex2var_ps(c[2 * i], k1, c[2 * i + 1]));
    return _mm512_add_ps(_mm512_permutex2var_ps(d[0], l0, d[1]), _mm512_permutex2var_ps(d[0], l1, d[1]));
}

static inline float load_x(const void *x, int bf16, size_t i) {
    if (!bf16) return ((const float *)x)[i];
    uint32_t u = ((uint32_t)((const uint16_t *)x)[i]) << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

/* x [M, K] -> y [M, N], both fp32 (bf16 = 0) or both bf16 (bf16 = 1). w_u8 [ceil(N / 16), Kp / 64, 16, 64] (int8 weights + 128),
 * w_scale [N] fp32, bias [N] fp32 or NULL. */
int mlakit_int8_gemv(int M, int N, int K, int Kp, const void *x, const uint8_t *w_u8, const float *w_scale,
                     const float *bias, void *y, int bf16, int n_threads) {
    if (M > MAX_ROWS || Kp % 64 != 0) return 2;
    int nb = Kp / 64;
    int8_t *xq = (int8_t *)aligned_alloc(64, (size_t)M * Kp);
    float *xs = (float *)malloc(sizeof(float) * M * nb);
    float *corr = (float *)malloc(sizeof(float) * M);
    if (!xq || !xs || !corr) {
        free(xq);
        free(xs);
        free(corr);
        return 1;
    }
    for (int m = 0; m < M; m++) { /* quantize activations: blocks of 64, symmetric */
        corr[m] = 0.f;
        for (int b = 0; b < nb; b++) {
            float amax = 0.f;
            for (int k = b * 64; k < b * 64 + 64 && k < K; k++) {
                float v = fabsf(load_x(x, bf16, (size_t)m * K + k));
                amax = v > amax ? v : amax;
            }
            float s = amax / 127.f, inv = amax > 0.f ? 127.f / amax : 0.f;
            int sum = 0;
            for (int k = b * 64; k < b * 64 + 64; k++) {
                int q = k < K ? (int)lrintf(load_x(x, bf16, (size_t)m * K + k) * inv) : 0;
                xq[(size_t)m * Kp + k] = (int8_t)q;
                sum += q;
            }
            xs[m * nb + b] = s;
            corr[m] += 128.f * s * (float)sum;
        }
    }
#pragma omp parallel for num_threads(n_threads) schedule(static)
    for (int n0 = 0; n0 < N; n0 += 16) {
        for (int m = 0; m < M; m++) {
            __m512 acc[16];
            for (int j = 0; j < 16; j++) acc[j] = _mm512_setzero_ps();
            const int8_t *xr = xq + (size_t)m * Kp;
            const uint8_t *tile = w_u8 + (size_t)n0 * Kp; /* [nb, 16, 64] */
            for (int b = 0; b < nb; b++) {
                __m512i xv = _mm512_load_si512((const void *)(xr + b * 64));
                __m512 sx = _mm512_set1_ps(xs[m * nb + b]);
                for (int j = 0; j < 16; j++) {
                    __m512i wv = _mm512_loadu_si512((const void *)(tile + ((size_t)b * 16 + j) * 64));
                    __m512i dot = _mm512_dpbusd_epi32(_mm512_setzero_si512(), wv, xv);
                    acc[j] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), sx, acc[j]);
                }
            }
            __m512 sums = _mm512_sub_ps(reduce16_ps(acc), _mm512_set1_ps(corr[m]));
            /* the last tile of N % 16 rows: its padding rows are computed and not stored */
            __mmask16 live = N - n0 >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (N - n0)) - 1);
            __m512 out = _mm512_mul_ps(sums, _mm512_maskz_loadu_ps(live, w_scale + n0));
            if (bias) out = _mm512_add_ps(out, _mm512_maskz_loadu_ps(live, bias + n0));
            if (bf16)
                _mm256_mask_storeu_epi16((uint16_t *)y + (size_t)m * N + n0, live, (__m256i)_mm512_cvtneps_pbh(out));
            else
                _mm512_mask_storeu_ps((float *)y + (size_t)m * N + n0, live, out);
        }
    }
    free(xq);
    free(xs);
    free(corr);
    return 0;
}
#else
int mlakit_int8_gemv_available(void) { return 0; }

int mlakit_int8_gemv(int M, int N, int K, int Kp, const void *x, const uint8_t *w_u8, const float *w_scale,
                     const float *bias, void *y, int bf16, int n_threads) {
    (void)M, (void)N, (void)K, (void)Kp, (void)x, (void)w_u8, (void)w_scale, (void)bias, (void)y, (void)bf16;
    (void)n_threads;
    return 3; /* built without AVX512-VNNI: the caller uses PyTorch's kernel */
}
#endif
