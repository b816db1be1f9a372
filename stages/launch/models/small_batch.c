/* Linears for a few rows (1 to 8: decode steps), y = x W^T (+ b), read straight from oneDNN's pre-packed weight.
 *
 * Built and loaded by small_batch.py (see its docstring for when and why); it checks each weight's layout before
 * it uses these functions on it. bfloat16 rows are taken four at a time, float32 rows eight; each row's sums are
 * formed in the same order whatever the number of rows, so a sequence gets the same logits alone as in a batch.
 * Work is split over output blocks among the threads of the OpenMP runtime torch itself uses (the library is
 * linked against it), so no second thread pool competes for the cores.
 *
 * bfloat16: oneDNN's AB16b64a2b layout. Blocks of 64 outputs; inside a block, for each pair of inputs (k, k+1),
 * the 64 outputs' two weights side by side: 128 bfloat16, four 512-bit vectors of 16 outputs x 2 inputs. Outputs
 * are padded to a multiple of 64 and inputs to `kpad` (a multiple of 32) with zeros. One vdpbf16ps multiplies a
 * vector by an input pair (broadcast) and adds both products to 16 float32 sums. The bias is added in float32 and
 * each sum rounded to bfloat16 once (round to nearest even), as oneDNN does.
 *
 * float32: oneDNN's plain [n, k] layout (or the dense weight itself, where oneDNN's packing would be that copy).
 * Tiles of 4 outputs x up to 8 rows, 16 inputs per step (FMA), each sum reduced across its 16 lanes at the end,
 * then the bias added.
 */
#include <immintrin.h>
#include <stdint.h>
#include <string.h>

int prestage_small_batch_abi(void) { return 2; }

/* ---- bfloat16 ------------------------------------------------------------------------------------------- */

static inline __m512bh input_pair(const uint16_t *x, int64_t j)
{
    uint32_t two; /* x[2j], x[2j + 1] (unaligned when a row has an odd length) */
    memcpy(&two, x + 2 * j, sizeof two);
    return (__m512bh)_mm512_set1_epi32((int)two);
}

/* rows x[0..R) (row stride k) against one block of 64 outputs starting at o0; y rows have stride ldy */
static inline void bf16_block(const __m512i *wb, const uint16_t *x, int64_t k, const int R, const float *bias,
                              uint16_t *y, int64_t ldy, int64_t n, int64_t o0)
{
    __m512 acc[4][4];
    for (int r = 0; r < 4; r++)
        for (int g = 0; g < 4; g++)
            acc[r][g] = _mm512_setzero_ps();
    const int64_t pairs = k / 2;
    for (int64_t j = 0; j < pairs; j++) {
        const __m512i *wj = wb + 4 * j;
        const __m512bh w0 = (__m512bh)_mm512_load_si512(wj), w1 = (__m512bh)_mm512_load_si512(wj + 1);
        const __m512bh w2 = (__m512bh)_mm512_load_si512(wj + 2), w3 = (__m512bh)_mm512_load_si512(wj + 3);
        for (int r = 0; r < R; r++) {
            const __m512bh xv = input_pair(x + r * k, j);
            acc[r][0] = _mm512_dpbf16_ps(acc[r][0], w0, xv);
            acc[r][1] = _mm512_dpbf16_ps(acc[r][1], w1, xv);
            acc[r][2] = _mm512_dpbf16_ps(acc[r][2], w2, xv);
            acc[r][3] = _mm512_dpbf16_ps(acc[r][3], w3, xv);
        }
    }
    if (k & 1) { /* the last input, paired with zero (its weights' partners are zero padding) */
        const __m512i *wj = wb + 4 * pairs;
        for (int r = 0; r < R; r++) {
            const __m512bh xv = (__m512bh)_mm512_set1_epi32((int)(uint32_t)x[r * k + k - 1]);
            for (int g = 0; g < 4; g++)
                acc[r][g] = _mm512_dpbf16_ps(acc[r][g], (__m512bh)_mm512_load_si512(wj + g), xv);
        }
    }
    for (int g = 0; g < 4; g++) {
        const int64_t o = o0 + g * 16; /* first output of this vector */
        if (o >= n)
            break;
        const __mmask16 m = (n - o >= 16) ? (__mmask16)0xffff : (__mmask16)((1u << (n - o)) - 1);
        const __m512 b = bias ? _mm512_maskz_loadu_ps(m, bias + o) : _mm512_setzero_ps();
        for (int r = 0; r < R; r++)
            _mm256_mask_storeu_epi16(y + r * ldy + o, m, (__m256i)_mm512_cvtneps_pbh(_mm512_add_ps(acc[r][g], b)));
    }
}

/* w: packed weight; x: [rows, k] bfloat16; bias: [n] float32 or NULL; y: [rows, ldy] bfloat16, columns [0, n) */
void prestage_linear_bf16(const uint16_t *w, const uint16_t *x, const float *bias, uint16_t *y, int64_t rows,
                          int64_t ldy, int64_t n, int64_t k, int64_t kpad, int threads)
{
    const int64_t blocks = (n + 63) / 64;
    const int64_t block_vectors = kpad / 2 * 4; /* 512-bit vectors per block of 64 outputs */
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t b = 0; b < blocks; b++) {
        const __m512i *wb = (const __m512i *)w + b * block_vectors;
        for (int64_t r0 = 0; r0 < rows; r0 += 4) { /* the block stays in cache for the next four rows */
            const uint16_t *xr = x + r0 * k;
            uint16_t *yr = y + r0 * ldy;
            switch (rows - r0 >= 4 ? 4 : rows - r0) { /* a constant row count for the compiler to unroll */
            case 1:
                bf16_block(wb, xr, k, 1, bias, yr, ldy, n, b * 64);
                break;
            case 2:
                bf16_block(wb, xr, k, 2, bias, yr, ldy, n, b * 64);
                break;
            case 3:
                bf16_block(wb, xr, k, 3, bias, yr, ldy, n, b * 64);
                break;
            default:
                bf16_block(wb, xr, k, 4, bias, yr, ldy, n, b * 64);
            }
        }
    }
}

/* ---- float32 -------------------------------------------------------------------------------------------- */

/* outputs [o0, o0 + O) of w [n, k] against rows x[0..R) (row stride k); y rows have stride ldy. Up to 4 rows, the
 * rows' 16 inputs are loaded once per step (4 + 16 registers); 5 to 8 rows keep up to 32 sums (at 8 rows gcc keeps
 * 30 of them in registers and two on the stack) and take the inputs from memory (L1) in each multiply-add, so the
 * tile's weights are read once for all 8 rows. Each sum's order of additions is the same in both. Always inlined: each constant tile shape gets its own unrolled code (as a
 * plain inline function, gcc left the eight shapes as one generic call, 10-20% slower). */
static inline __attribute__((always_inline)) void f32_tile(const float *w, const float *x, int64_t k, const int O,
                                                            const int R, const float *bias, float *y, int64_t ldy,
                                                            int64_t o0)
{
    __m512 acc[4][8];
    for (int o = 0; o < 4; o++)
        for (int r = 0; r < 8; r++)
            acc[o][r] = _mm512_setzero_ps();
    int64_t c = 0;
    for (; c + 16 <= k; c += 16) {
        if (R <= 4) {
            __m512 xv[4];
            for (int r = 0; r < R; r++)
                xv[r] = _mm512_loadu_ps(x + r * k + c);
            for (int o = 0; o < O; o++) {
                const __m512 wv = _mm512_loadu_ps(w + (o0 + o) * k + c);
                for (int r = 0; r < R; r++)
                    acc[o][r] = _mm512_fmadd_ps(wv, xv[r], acc[o][r]);
            }
        } else {
            for (int o = 0; o < O; o++) {
                const __m512 wv = _mm512_loadu_ps(w + (o0 + o) * k + c);
                for (int r = 0; r < R; r++)
                    acc[o][r] = _mm512_fmadd_ps(wv, _mm512_loadu_ps(x + r * k + c), acc[o][r]);
            }
        }
    }
    if (c < k) { /* the last k % 16 inputs */
        const __mmask16 m = (__mmask16)((1u << (k - c)) - 1);
        for (int o = 0; o < O; o++) {
            const __m512 wv = _mm512_maskz_loadu_ps(m, w + (o0 + o) * k + c);
            for (int r = 0; r < R; r++)
                acc[o][r] = _mm512_fmadd_ps(wv, _mm512_maskz_loadu_ps(m, x + r * k + c), acc[o][r]);
        }
    }
    for (int o = 0; o < O; o++)
        for (int r = 0; r < R; r++)
            y[r * ldy + o0 + o] = _mm512_reduce_add_ps(acc[o][r]) + (bias ? bias[o0 + o] : 0.0f);
}

/* rows r0.. (at most 8) of one tile of 4 outputs, with constant tile shapes for the compiler to unroll */
static inline void f32_rows(const float *w, const float *x, int64_t k, int R, const float *bias, float *y,
                            int64_t ldy, int64_t o0)
{
    switch (R) {
    case 1:
        f32_tile(w, x, k, 4, 1, bias, y, ldy, o0);
        break;
    case 2:
        f32_tile(w, x, k, 4, 2, bias, y, ldy, o0);
        break;
    case 3:
        f32_tile(w, x, k, 4, 3, bias, y, ldy, o0);
        break;
    case 4:
        f32_tile(w, x, k, 4, 4, bias, y, ldy, o0);
        break;
    case 5:
        f32_tile(w, x, k, 4, 5, bias, y, ldy, o0);
        break;
    case 6:
        f32_tile(w, x, k, 4, 6, bias, y, ldy, o0);
        break;
    case 7:
        f32_tile(w, x, k, 4, 7, bias, y, ldy, o0);
        break;
    default:
        f32_tile(w, x, k, 4, 8, bias, y, ldy, o0);
    }
}

/* w: [n, k] float32; x: [rows, k]; bias: [n] or NULL; y: [rows, ldy], columns [0, n) */
void prestage_linear_f32(const float *w, const float *x, const float *bias, float *y, int64_t rows, int64_t ldy,
                         int64_t n, int64_t k, int threads)
{
    const int64_t tiles = (n + 3) / 4;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t t = 0; t < tiles; t++) {
        const int64_t o0 = 4 * t;
        for (int64_t r0 = 0; r0 < rows; r0 += 8) {
            const float *xr = x + r0 * k;
            float *yr = y + r0 * ldy;
            const int R = rows - r0 >= 8 ? 8 : (int)(rows - r0);
            if (n - o0 < 4) { /* the last outputs */
                f32_tile(w, xr, k, (int)(n - o0), R, bias, yr, ldy, o0);
                continue;
            }
            f32_rows(w, xr, k, R, bias, yr, ldy, o0);
        }
    }
}
