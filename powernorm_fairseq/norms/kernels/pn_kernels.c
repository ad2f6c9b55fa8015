/* Fused CPU kernels for powernorm_fairseq.norms (built on first use by ../fused.py, loaded with
 * ctypes; the eager torch code is the fallback and the specification).
 *
 * Conventions: row-major contiguous (N, C) operands (row n = token, column c = channel), (C,)
 * per-channel vectors, keep (N,) with 1 = real token and 0 = pad (NULL: every row is real),
 * column sums written as (C,) arrays of the input's type (accumulated in double; NULL: not
 * wanted), nt = number of OpenMP threads.
 * Functions return 0, or -1 when scratch memory could not be allocated.
 *
 * Why C and not torch ops: each eager op is one memory pass, and a norm's forward+backward in
 * eager torch takes about eight passes over (N, C) where torch's fused LayerNorm takes three.
 * These kernels do the same arithmetic in the minimum number of passes.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <omp.h>

static double *alloc_partials(int nt, int64_t width)
{
    return (double *)calloc((size_t)nt * (size_t)width, sizeof(double));
}

/* g * x with 0 * anything = 0: the backward sums include pad rows, where the upstream gradient
 * g is 0 but x may be inf or NaN (IEEE 0 * inf = NaN would reach every real token). */
#define SAFE_MUL(g, x) ((g) == 0 ? (g) : (g) * (x))

/* The per-group kernels run their row bodies (PN_INLINE functions of the group width) through
 * PN_BY_WIDTH(Cg, W, call): `call` with W a constant for the common widths 16, 32, 64 and 128,
 * else with W = Cg. With a constant width the loops over a group's channels have no prologue or
 * remainder, which cost more than their arithmetic at 16-32 channels a group (the released PN's
 * forward took a third less time at d 64 with 4 groups). The arithmetic, and so every bit of
 * the results, is the same for either. */
#define PN_INLINE __attribute__((always_inline))
#define PN_BY_WIDTH(Cg, W, call)                                  \
    do {                                                          \
        if ((Cg) == 16) { const int64_t W = 16; call; }           \
        else if ((Cg) == 32) { const int64_t W = 32; call; }      \
        else if ((Cg) == 64) { const int64_t W = 64; call; }      \
        else if ((Cg) == 128) { const int64_t W = 128; call; }    \
        else { const int64_t W = (Cg); call; }                    \
    } while (0)

/* Rows summed in T before a flush into the double accumulators. */
#define BLOCK_ROWS 16

static void flush_f32(float *q, double *p, int64_t n)
{
    for (int64_t i = 0; i < n; ++i) { p[i] += (double)q[i]; q[i] = 0.0f; }
}

static void flush_f64(double *q, double *p, int64_t n)
{
    for (int64_t i = 0; i < n; ++i) { p[i] += q[i]; q[i] = 0.0; }
}

int pn_abi_version(void) { return 9; }

/* The (C,) epilogues of PN (pn_paper_fwd, pn_paper_bwd) replace eager torch operations on
 * per-channel vectors and must round as each of them does: one rounding per operation, no
 * fused multiply-add (-march=native would otherwise contract a * b + c). */
#define PN_EXACT __attribute__((optimize("fp-contract=off")))

#define CAT_(a, b) a##_##b
#define CAT(a, b) CAT_(a, b)

#define T float
#define NAME(fn) CAT(fn, f32)
#define flush flush_f32
#define SQRT sqrtf
#define FMA fmaf
#include "pn_kernels_impl.h"
#undef T
#undef NAME
#undef flush
#undef SQRT
#undef FMA

#define T double
#define NAME(fn) CAT(fn, f64)
#define flush flush_f64
#define SQRT sqrt
#define FMA fma
#include "pn_kernels_impl.h"
#undef T
#undef NAME
#undef flush
#undef SQRT
#undef FMA

/* Dynamic Tanh's forward in float32 (no double version: the float64 path stays torch's tanh). */

/* e^x for x in [0, 20] (larger x is taken as 20; NaN stays NaN): Cephes expf's range reduction
 * and polynomial, the 2^n scale built from its bits; arithmetic only, so that loops vectorize
 * (libm's expf and floorf do not, without -ffast-math). */
static inline float exp_pos_f32(float x)
{
    x = x > 20.0f ? 20.0f : x;
    float fx = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f; /* round to nearest */
    float r = x - fx * 0.693359375f;
    r = r + fx * 2.12194440e-4f;
    float z = r * r;
    float y = (((((1.9875691500e-4f * r + 1.3981999507e-3f) * r + 8.3334519073e-3f) * r
                 + 4.1665795894e-2f) * r + 1.6666665459e-1f) * r + 5.0000001201e-1f) * z + r + 1.0f;
    union { int32_t i; float f; } scale;
    scale.i = ((int32_t)fx + 127) << 23;
    return y * scale.f;
}

/* tanh(v): Cephes tanhf's odd polynomial below |v| = 0.625, else 1 - 2 / (e^{2|v|} + 1) with
 * v's sign; within 1.3 ulp of the exact tanh over [-12, 12] (a dense grid), exact signs of
 * zero, +-1 for +-inf, NaN for NaN. */
static inline float tanh_f32(float v)
{
    float a = fabsf(v), z = v * v;
    float small = v * (1.0f + ((((-5.70498872745e-3f * z + 2.06390887954e-2f) * z
                                 - 5.37397155531e-2f) * z + 1.33314422036e-1f) * z
                               - 3.33332819422e-1f) * z);
    float large = copysignf(1.0f - 2.0f / (exp_pos_f32(2.0f * a) + 1.0f), v);
    return a < 0.625f ? small : large;
}

/* t = tanh(alpha x) and y = t weight + bias (one fused multiply-add, as torch.addcmul rounds on
 * CPU), (N, C) row-major, in one pass. */
int pn_dyt_fwd_f32(const float *x, const float *alpha, const float *weight, const float *bias,
                   int64_t N, int64_t C, float *y, float *t, int nt)
{
    const float a = *alpha;
#pragma omp parallel for num_threads(nt) schedule(static)
    for (int64_t n = 0; n < N; ++n) {
        const float *xr = x + n * C;
        float *yr = y + n * C, *tr = t + n * C;
#pragma omp simd
        for (int64_t c = 0; c < C; ++c) {
            float tv = tanh_f32(a * xr[c]);
            tr[c] = tv;
            yr[c] = fmaf(tv, weight[c], bias[c]);
        }
    }
    return 0;
}
