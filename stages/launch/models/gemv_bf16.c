/* Batch-1 bfloat16 linear, y = W x (+ b), read straight from oneDNN's pre-packed weight.
 *
 * Built and loaded by cpu_gemv.py (see its docstring for when and why). The weight is the buffer oneDNN's
 * `_reorder_linear_weight` made: blocks of 64 outputs, and inside each block, for every pair of inputs
 * (k, k+1), the 64 outputs' two weights side by side: 128 bfloat16 = four 512-bit vectors of 16 outputs x 2
 * inputs. Outputs are padded to a multiple of 64 and inputs to `kpad` (a multiple of 32) with zeros.
 * cpu_gemv.py checks that layout on a probe before it uses this kernel for a shape.
 *
 * One vdpbf16ps per vector multiplies the 16 x 2 weights by the input pair (broadcast) and adds both products to
 * 16 float32 sums, so each 64-output block is four independent float32 accumulators over the inputs, in input
 * order. The bias is added in float32 and the sum rounded to bfloat16 once (round to nearest even), as oneDNN
 * does. Blocks are shared among the threads of the OpenMP runtime torch itself uses (the library is linked
 * against it), so no second thread pool competes for the cores.
 */
#include <immintrin.h>
#include <stdint.h>

int prestage_gemv_abi(void) { return 1; }

static inline __m512bh input_pair(uint32_t two_bf16) { return (__m512bh)_mm512_set1_epi32((int)two_bf16); }

/* acc[g] += the 16 x 2 weights of vector g of this input pair, times the pair */
static inline void accumulate(__m512 acc[4], const __m512i *wj, __m512bh xv)
{
    acc[0] = _mm512_dpbf16_ps(acc[0], (__m512bh)_mm512_load_si512(wj), xv);
    acc[1] = _mm512_dpbf16_ps(acc[1], (__m512bh)_mm512_load_si512(wj + 1), xv);
    acc[2] = _mm512_dpbf16_ps(acc[2], (__m512bh)_mm512_load_si512(wj + 2), xv);
    acc[3] = _mm512_dpbf16_ps(acc[3], (__m512bh)_mm512_load_si512(wj + 3), xv);
}

/* w: packed weight; x: [k] bfloat16; bias: [n] float32 or NULL; y: [n] bfloat16 (written) */
void prestage_gemv_bf16(const uint16_t *w, const uint16_t *x, const float *bias, uint16_t *y, int64_t n, int64_t k,
                        int64_t kpad, int threads)
{
    const int64_t blocks = (n + 63) / 64;
    const int64_t block_vectors = kpad / 2 * 4; /* 512-bit vectors per block of 64 outputs */
    const int64_t pairs = k / 2;
    const uint32_t *x_pairs = (const uint32_t *)x;
    const uint32_t odd_tail = (k & 1) ? (uint32_t)x[k - 1] : 0; /* the last input, paired with zero */

#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t b = 0; b < blocks; b++) {
        const __m512i *wb = (const __m512i *)w + b * block_vectors;
        __m512 acc[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
        int64_t j = 0;
        for (; j < pairs; j++)
            accumulate(acc, wb + 4 * j, input_pair(x_pairs[j]));
        if (k & 1)
            accumulate(acc, wb + 4 * j, input_pair(odd_tail));
        for (int g = 0; g < 4; g++) {
            const int64_t o = b * 64 + g * 16; /* first output of this vector */
            if (o >= n)
                break;
            const __mmask16 m = (n - o >= 16) ? (__mmask16)0xffff : (__mmask16)((1u << (n - o)) - 1);
            __m512 s = acc[g];
            if (bias)
                s = _mm512_add_ps(s, _mm512_maskz_loadu_ps(m, bias + o));
            _mm256_mask_storeu_epi16(y + o, m, (__m256i)_mm512_cvtneps_pbh(s));
        }
    }
}
