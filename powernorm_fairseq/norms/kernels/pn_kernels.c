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

int pn_abi_version(void) { return 7; }

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
