/* Dense fp32 GEMM for the CPU path: y[M, N] = x[M, K] @ W^T, with W repacked once at load as
 * [ceil(N / 32)][K][32] (panels of 32 output columns, K-major, zero-padded past N).
 *
 * Why not oneDNN's blocked layout (what cpu_dense.py used before): at decode sizes the GEMM only streams the
 * weights, and a panel read front to back with one broadcast of x per k streams them near the machine's read
 * bandwidth (28-30 GB/s on the 2-vCPU EPYC VM, where oneDNN reaches 17-24). Each output is one thread's
 * k-ordered sum, so results do not depend on the thread count. Written with GCC vector extensions, so the
 * same source builds for AVX-512 (one register per 16 floats) or AVX2 (two) under -march=native. */
#include <stdint.h>
#include <string.h>

typedef float v16 __attribute__((vector_size(64)));

#define NR 32 /* output columns per panel: two 16-float vectors */
#define MR 8  /* rows of x per tile: 16 accumulators + 2 weight vectors fit AVX-512's 32 registers */

static inline v16 load16(const float *p) { v16 v; memcpy(&v, p, sizeof v); return v; }
static inline void store16(float *p, v16 v) { memcpy(p, &v, sizeof v); }

/* rows x[0..mr) times one panel; writes the first `cols` columns of y's rows */
static void tile(const float *x, int64_t k_len, int mr, const float *panel, float *y, int64_t ldy, int cols) {
    v16 lo[MR], hi[MR];
    for (int m = 0; m < MR; m++) { lo[m] = (v16){0}; hi[m] = (v16){0}; }
    if (mr == MR) { /* the full tile, unrolled over its rows */
        for (int64_t k = 0; k < k_len; k++) {
            v16 w0 = load16(panel + k * NR), w1 = load16(panel + k * NR + 16);
#pragma GCC unroll 8
            for (int m = 0; m < MR; m++) { float s = x[m * k_len + k]; lo[m] += s * w0; hi[m] += s * w1; }
        }
    } else {
        for (int64_t k = 0; k < k_len; k++) {
            v16 w0 = load16(panel + k * NR), w1 = load16(panel + k * NR + 16);
            for (int m = 0; m < mr; m++) { float s = x[m * k_len + k]; lo[m] += s * w0; hi[m] += s * w1; }
        }
    }
    for (int m = 0; m < mr; m++) {
        float row[NR];
        store16(row, lo[m]);
        store16(row + 16, hi[m]);
        memcpy(y + m * ldy, row, (size_t)cols * sizeof(float));
    }
}

void tpdeploy_gemm_f32(const float *x, int64_t m_len, int64_t k_len, const float *w, float *y, int64_t n_len,
                       int threads) {
    int64_t panels = (n_len + NR - 1) / NR;
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t p = 0; p < panels; p++) {
        int cols = (int)(n_len - p * NR < NR ? n_len - p * NR : NR);
        for (int64_t m0 = 0; m0 < m_len; m0 += MR) {
            int mr = (int)(m_len - m0 < MR ? m_len - m0 : MR);
            tile(x + m0 * k_len, k_len, mr, w + p * k_len * NR, y + m0 * n_len + p * NR, n_len, cols);
        }
    }
}

int tpdeploy_gemm_panel_width(void) { return NR; }
