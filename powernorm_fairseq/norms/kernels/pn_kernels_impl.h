/* One-pass CPU kernels of the masked norms, instantiated for T = float and T = double by
 * pn_kernels.c (which defines T and NAME(fn)). See pn_kernels.c for the conventions.
 *
 * Every kernel reads each (N, C) operand once. Column sums are accumulated per thread, over a
 * static split of the rows: in T over blocks of BLOCK_ROWS rows (vectorizes at full width),
 * flushed into double after each block (so the error does not grow with N), and reduced in
 * thread order afterwards: the result depends on the thread count but not on scheduling. Rows with keep[n] == 0 (pads) are skipped by masked
 * sums, so a non-finite pad value cannot poison a statistic.
 */

/* out[i][c] = (T) sum over threads t of part[t][i][c], in thread order (deterministic). */
static void NAME(reduce_partials)(const double *part, int nt, int k, int64_t C, T *out[])
{
    for (int i = 0; i < k; ++i) {
        if (!out[i]) continue;
        for (int64_t c = 0; c < C; ++c) {
            double acc = 0.0;
            for (int t = 0; t < nt; ++t) acc += part[((size_t)t * k + i) * C + c];
            out[i][c] = (T)acc;
        }
    }
}

/* Scratch of a column-sum kernel: double partials (nt x width) and block sums in T
 * (nt x (width + extra); extra = a per-thread row buffer where a kernel needs one). */
typedef struct { double *part; T *qall; } NAME(scratch_t);

static int NAME(scratch_alloc)(NAME(scratch_t) *s, int nt, int64_t width, int64_t extra)
{
    s->part = alloc_partials(nt, width);
    s->qall = (T *)calloc((size_t)nt * (size_t)(width + extra), sizeof(T));
    if (s->part && s->qall) return 0;
    free(s->part);
    free(s->qall);
    return -1;
}

/* Reduce the partials into out[0..k) (see reduce_partials) and free the scratch. */
static void NAME(scratch_finish)(NAME(scratch_t) *s, int nt, int k, int64_t C, T *out[])
{
    NAME(reduce_partials)(s->part, nt, k, C, out);
    free(s->part);
    free(s->qall);
}

/* s1 += k (x - shift), s2 += k (x - shift)^2, s2all += (x - shift)^2 (each output nullable) */
int NAME(pn_colstats)(const T *x, const T *keep, const T *shift, int64_t N, int64_t C,
                      T *s1, T *s2, T *s2all, int nt)
{
    NAME(scratch_t) sc;
    if (NAME(scratch_alloc)(&sc, nt, 3 * C, 0)) return -1;
#pragma omp parallel num_threads(nt)
    {
        int tid = omp_get_thread_num(), nth = omp_get_num_threads();
        double *p = sc.part + (size_t)tid * 3 * C;
        T *q = sc.qall + (size_t)tid * 3 * C, *q1 = q, *q2 = q + C, *qa = q + 2 * C;
        int64_t lo = N * tid / nth, hi = N * (tid + 1) / nth;
        for (int64_t n = lo; n < hi; ++n) {
            const T *xr = x + n * C;
            int real = keep == NULL || keep[n] != 0;
            if (real && s2all) {
#pragma omp simd
                for (int64_t c = 0; c < C; ++c) {
                    T d = xr[c] - shift[c];
                    q1[c] += d; q2[c] += d * d; qa[c] += d * d;
                }
            } else if (real) {
#pragma omp simd
                for (int64_t c = 0; c < C; ++c) {
                    T d = xr[c] - shift[c];
                    q1[c] += d; q2[c] += d * d;
                }
            } else if (s2all) {
#pragma omp simd
                for (int64_t c = 0; c < C; ++c) {
                    T d = xr[c] - shift[c];
                    qa[c] += d * d;
                }
            }
            if ((n - lo) % BLOCK_ROWS == BLOCK_ROWS - 1 || n == hi - 1) flush(q, p, 3 * C);
        }
    }
    NAME(scratch_finish)(&sc, nt, 3, C, (T *[]){s1, s2, s2all});
    return 0;
}

/* y = x * scale + bias; s2 += k x^2 */
int NAME(pn_affine_colstats)(const T *x, const T *keep, const T *scale, const T *bias,
                             int64_t N, int64_t C, T *y, T *s2, int nt)
{
    NAME(scratch_t) sc;
    if (NAME(scratch_alloc)(&sc, nt, C, 0)) return -1;
#pragma omp parallel num_threads(nt)
    {
        int tid = omp_get_thread_num(), nth = omp_get_num_threads();
        double *p = sc.part + (size_t)tid * C;
        T *q2 = sc.qall + (size_t)tid * C;
        int64_t lo = N * tid / nth, hi = N * (tid + 1) / nth;
        for (int64_t n = lo; n < hi; ++n) {
            const T *xr = x + n * C;
            T *yr = y + n * C;
            int real = keep == NULL || keep[n] != 0;
            if (real) {
#pragma omp simd
                for (int64_t c = 0; c < C; ++c) {
                    T v = xr[c];
                    yr[c] = v * scale[c] + bias[c];
                    q2[c] += v * v;
                }
            } else {
#pragma omp simd
                for (int64_t c = 0; c < C; ++c) yr[c] = xr[c] * scale[c] + bias[c];
            }
            if ((n - lo) % BLOCK_ROWS == BLOCK_ROWS - 1 || n == hi - 1) flush(q2, p, C);
        }
    }
    NAME(scratch_finish)(&sc, nt, 1, C, (T *[]){s2});
    return 0;
}

/* sgy += gy, sgyx += gy x (over all rows), msgyx += k gy x (each output nullable); at pad rows
 * gy x is taken as 0 where gy = 0 (pads' upstream gradient), also for x = inf or NaN. */
int NAME(pn_bwd_sums)(const T *gy, const T *x, const T *keep, int64_t N, int64_t C,
                      T *sgy, T *sgyx, T *msgyx, int nt)
{
    NAME(scratch_t) sc;
    if (NAME(scratch_alloc)(&sc, nt, 3 * C, 0)) return -1;
#pragma omp parallel num_threads(nt)
    {
        int tid = omp_get_thread_num(), nth = omp_get_num_threads();
        double *p = sc.part + (size_t)tid * 3 * C;
        T *q = sc.qall + (size_t)tid * 3 * C, *qg = q, *qgx = q + C, *qm = q + 2 * C;
        int64_t lo = N * tid / nth, hi = N * (tid + 1) / nth;
        for (int64_t n = lo; n < hi; ++n) {
            const T *gr = gy + n * C, *xr = x + n * C;
            if (keep != NULL && keep[n] != 0) {
#pragma omp simd
                for (int64_t c = 0; c < C; ++c) {
                    T g = gr[c], gxv = g * xr[c];
                    qg[c] += g; qgx[c] += gxv; qm[c] += gxv;
                }
            } else if (keep != NULL) {  /* pad: 0 * x = 0 even for x = inf or NaN */
#pragma omp simd
                for (int64_t c = 0; c < C; ++c) {
                    T g = gr[c];
                    qg[c] += g; qgx[c] += SAFE_MUL(g, xr[c]);
                }
            } else {
#pragma omp simd
                for (int64_t c = 0; c < C; ++c) {
                    T g = gr[c];
                    qg[c] += g; qgx[c] += g * xr[c];
                }
            }
            if ((n - lo) % BLOCK_ROWS == BLOCK_ROWS - 1 || n == hi - 1) flush(q, p, 3 * C);
        }
    }
    if (keep == NULL && msgyx) {  /* every row is real: the masked sum is the plain one */
        for (int t = 0; t < nt; ++t)
            memcpy(sc.part + (size_t)t * 3 * C + 2 * C, sc.part + (size_t)t * 3 * C + C,
                   C * sizeof(double));
    }
    NAME(scratch_finish)(&sc, nt, 3, C, (T *[]){sgy, sgyx, msgyx});
    return 0;
}

/* gx = gy * a - m_n (x * b + c), m_n = corr_keep[n] (or 1); in the same pass (outputs nullable)
 * sgy += gy, sgyx += gy x over all rows and msgyx += sum_keep[n] gy x. Pad rows (m_n = 0 or
 * sum_keep[n] = 0) take gy x as 0 where gy = 0, and gx = gy a where m_n = 0, so a non-finite
 * pad x reaches neither the sums nor (with corr_keep) any gradient. */
int NAME(pn_bwd_apply)(const T *gy, const T *x, const T *a, const T *b, const T *cc,
                       const T *corr_keep, const T *sum_keep, int64_t N, int64_t C, T *gx,
                       T *sgy, T *sgyx, T *msgyx, int nt)
{
    int sums = sgy || sgyx || msgyx;
    NAME(scratch_t) sc = {NULL, NULL};
    if (sums && NAME(scratch_alloc)(&sc, nt, 3 * C, 0)) return -1;
#pragma omp parallel num_threads(nt)
    {
        int tid = omp_get_thread_num(), nth = omp_get_num_threads();
        double *p = sums ? sc.part + (size_t)tid * 3 * C : NULL;
        T *q = sums ? sc.qall + (size_t)tid * 3 * C : NULL;
        T *qg = q, *qgx = sums ? q + C : NULL, *qm = sums ? q + 2 * C : NULL;
        int64_t lo = N * tid / nth, hi = N * (tid + 1) / nth;
        for (int64_t n = lo; n < hi; ++n) {
            const T *gr = gy + n * C, *xr = x + n * C;
            T *out = gx + n * C;
            T m = corr_keep ? corr_keep[n] : (T)1;
            int counted = sum_keep == NULL || sum_keep[n] != 0;
            if (m == 0 || !counted) {  /* a pad: its x (maybe inf or NaN) must not reach the
                                        * sums or, without a correction, its gradient */
#pragma omp simd
                for (int64_t c = 0; c < C; ++c) {
                    T g = gr[c], xv = xr[c];
                    out[c] = m == 0 ? g * a[c] : g * a[c] - m * (xv * b[c] + cc[c]);
                    if (sums) {
                        qg[c] += g;
                        T gxv = SAFE_MUL(g, xv);
                        qgx[c] += gxv;
                        if (counted) qm[c] += gxv;
                    }
                }
            } else if (!sums) {
#pragma omp simd
                for (int64_t c = 0; c < C; ++c) out[c] = gr[c] * a[c] - m * (xr[c] * b[c] + cc[c]);
                continue;
            } else {
#pragma omp simd
                for (int64_t c = 0; c < C; ++c) {
                    T g = gr[c], xv = xr[c], gxv = g * xv;
                    out[c] = g * a[c] - m * (xv * b[c] + cc[c]);
                    qg[c] += g; qgx[c] += gxv; qm[c] += gxv;
                }
            }
            if (sums && ((n - lo) % BLOCK_ROWS == BLOCK_ROWS - 1 || n == hi - 1))
                flush(q, p, 3 * C);
        }
    }
    if (sums) {
        NAME(scratch_finish)(&sc, nt, 3, C, (T *[]){sgy, sgyx, msgyx});
    }
    return 0;
}

/* r = 1 / sqrt(mean_j x[j]^2 + eps) over one group of Cg channels. Every kernel takes the group
 * RMS from here, so that all round alike. */
static inline PN_INLINE T NAME(group_rstd)(const T *xr, int64_t Cg, double eps)
{
    T ss = 0;
#pragma omp simd reduction(+:ss)
    for (int64_t j = 0; j < Cg; ++j) ss += xr[j] * xr[j];
    return (T)(1.0 / sqrt((double)ss / (double)Cg + eps));
}

/* Per-row, per-group RMS scaling: r[n, g] = 1 / sqrt(mean_j x[n, g, j]^2 + eps), y = x r. */
static inline PN_INLINE void NAME(group_rms_row)(const T *xn, int64_t G, int64_t Cg, double eps,
                                                  T *yn, T *rn)
{
    for (int64_t g = 0; g < G; ++g) rn[g] = NAME(group_rstd)(xn + g * Cg, Cg, eps);
    for (int64_t g = 0; g < G; ++g) {
        const T *xr = xn + g * Cg;
        T *yr = yn + g * Cg, r = rn[g];
#pragma omp simd
        for (int64_t j = 0; j < Cg; ++j) yr[j] = xr[j] * r;
    }
}

int NAME(pn_group_rms_fwd)(const T *x, int64_t N, int64_t C, int64_t G, double eps, T *y,
                           T *rstd, int nt)
{
    int64_t Cg = C / G;
#pragma omp parallel for num_threads(nt) schedule(static)
    for (int64_t n = 0; n < N; ++n)
        PN_BY_WIDTH(Cg, W, NAME(group_rms_row)(x + n * C, G, W, eps, y + n * C, rstd + n * G));
    return 0;
}

/* Its gradient: gx = gy r - x r^3 mean_j(gy x) per row and group. */
static inline PN_INLINE void NAME(group_rms_bwd_row)(const T *gn, const T *xn, const T *rn,
                                                      int64_t G, int64_t Cg, T *outn)
{
    for (int64_t g = 0; g < G; ++g) {
        const T *gr = gn + g * Cg, *xr = xn + g * Cg;
        T *out = outn + g * Cg;
        T s = 0;
#pragma omp simd reduction(+:s)
        for (int64_t j = 0; j < Cg; ++j) s += gr[j] * xr[j];
        T r = rn[g];
        T coef = (T)((double)s / (double)Cg * (double)r * (double)r * (double)r);
#pragma omp simd
        for (int64_t j = 0; j < Cg; ++j) out[j] = gr[j] * r - xr[j] * coef;
    }
}

int NAME(pn_group_rms_bwd)(const T *gy, const T *x, const T *rstd, int64_t N, int64_t C,
                           int64_t G, T *gx, int nt)
{
    int64_t Cg = C / G;
#pragma omp parallel for num_threads(nt) schedule(static)
    for (int64_t n = 0; n < N; ++n)
        PN_BY_WIDTH(Cg, W, NAME(group_rms_bwd_row)(gy + n * C, x + n * C, rstd + n * G, G, W,
                                                   gx + n * C));
    return 0;
}

/* One row of NAME(grms_pass). */
static inline PN_INLINE void NAME(grms_row)(
    const T *xn, int real, int64_t G, int64_t Cg, double eps, const T *scale, const T *bias, T *yn,
    T *rn, T *q2, T *qa)
{
    /* every group's r first: their square roots do not wait on each other */
    for (int64_t g = 0; g < G; ++g) rn[g] = NAME(group_rstd)(xn + g * Cg, Cg, eps);
    for (int64_t g = 0; g < G; ++g) {
        const T *xr = xn + g * Cg;
        T r = rn[g], r2 = r * r, *q2g = q2 + g * Cg, *qag = qa + g * Cg;
        if (yn) {  /* statistics and output from one load of x */
            const T *scg = scale + g * Cg, *bi = bias + g * Cg;
            T *yr = yn + g * Cg;
            if (real) {
#pragma omp simd
                for (int64_t j = 0; j < Cg; ++j) {
                    T v = xr[j] * xr[j] * r2;
                    q2g[j] += v; qag[j] += v;
                    yr[j] = xr[j] * r * scg[j] + bi[j];
                }
            } else {
#pragma omp simd
                for (int64_t j = 0; j < Cg; ++j) {
                    qag[j] += xr[j] * xr[j] * r2;
                    yr[j] = xr[j] * r * scg[j] + bi[j];
                }
            }
        } else if (real) {
#pragma omp simd
            for (int64_t j = 0; j < Cg; ++j) {
                T v = xr[j] * xr[j] * r2;
                q2g[j] += v; qag[j] += v;
            }
        } else {
#pragma omp simd
            for (int64_t j = 0; j < Cg; ++j) qag[j] += xr[j] * xr[j] * r2;
        }
    }
}

/* The group RMS scaling's statistics without storing z = x r, and (y not NULL) the output
 * y = z scale + bias of a scale known before the batch (pn_grms_affine) in the same pass: per row
 * and group r = 1/sqrt(mean_group(x^2) + eps) (rstd), the column sums of z^2 over the real rows
 * (s2) and all rows (s2all). */
static int NAME(grms_pass)(const T *x, const T *keep, int64_t N, int64_t C, int64_t G, double eps,
                           const T *scale, const T *bias, T *y, T *rstd, T *s2, T *s2all, int nt)
{
    int64_t Cg = C / G;
    NAME(scratch_t) sc;
    if (NAME(scratch_alloc)(&sc, nt, 2 * C, 0)) return -1;
#pragma omp parallel num_threads(nt)
    {
        int tid = omp_get_thread_num(), nth = omp_get_num_threads();
        double *p = sc.part + (size_t)tid * 2 * C;
        T *q = sc.qall + (size_t)tid * 2 * C, *q2 = q, *qa = q + C;
        int64_t lo = N * tid / nth, hi = N * (tid + 1) / nth;
        for (int64_t n = lo; n < hi; ++n) {
            int real = keep == NULL || keep[n] != 0;
            const T *xn = x + n * C;
            T *yn = y ? y + n * C : NULL, *rn = rstd + n * G;
            PN_BY_WIDTH(Cg, W, NAME(grms_row)(xn, real, G, W, eps, scale, bias, yn, rn, q2, qa));
            if ((n - lo) % BLOCK_ROWS == BLOCK_ROWS - 1 || n == hi - 1) flush(q, p, 2 * C);
        }
    }
    NAME(scratch_finish)(&sc, nt, 2, C, (T *[]){s2, s2all});
    return 0;
}

int NAME(pn_grms_colstats)(const T *x, const T *keep, int64_t N, int64_t C, int64_t G,
                           double eps, T *rstd, T *s2, T *s2all, int nt)
{
    return NAME(grms_pass)(x, keep, N, C, G, eps, NULL, NULL, NULL, rstd, s2, s2all, nt);
}

/* Pass 2: y = x r[n, g] * scale + bias. */
static inline PN_INLINE void NAME(grms_affine_row)(const T *xn, const T *rn, const T *scale,
                                                    const T *bias, int64_t G, int64_t Cg, T *yn)
{
    for (int64_t g = 0; g < G; ++g) {
        const T *xr = xn + g * Cg, *sc = scale + g * Cg, *bi = bias + g * Cg;
        T *yr = yn + g * Cg, r = rn[g];
#pragma omp simd
        for (int64_t j = 0; j < Cg; ++j) yr[j] = xr[j] * r * sc[j] + bi[j];
    }
}

int NAME(pn_grms_affine)(const T *x, const T *rstd, const T *scale, const T *bias, int64_t N,
                         int64_t C, int64_t G, T *y, int nt)
{
    int64_t Cg = C / G;
#pragma omp parallel for num_threads(nt) schedule(static)
    for (int64_t n = 0; n < N; ++n)
        PN_BY_WIDTH(Cg, W, NAME(grms_affine_row)(x + n * C, rstd + n * G, scale, bias, G, W,
                                                 y + n * C));
    return 0;
}

/* One row of NAME(pn_grms_bwd); gz and coef are the thread's row buffers. */
static inline PN_INLINE void NAME(grms_bwd_row)(const T *gn, const T *xn, const T *rn, const T *a,
                                                const T *b, int64_t G, int64_t Cg, T *outn,
                                                T *qg, T *qz, T *gz, T *coef)
{
    for (int64_t g = 0; g < G; ++g) {
        const T *gr = gn + g * Cg, *xr = xn + g * Cg, *ag = a + g * Cg, *bg = b + g * Cg;
        T *gzg = gz + g * Cg, *qgg = qg + g * Cg, *qzg = qz + g * Cg;
        T r = rn[g], dot = 0;
#pragma omp simd reduction(+:dot)
        for (int64_t j = 0; j < Cg; ++j) {
            T gv = gr[j], zv = xr[j] * r;
            T gzv = gv * ag[j] - zv * bg[j];
            gzg[j] = gzv;
            qgg[j] += gv; qzg[j] += gv * zv;
            dot += gzv * xr[j];
        }
        coef[g] = dot;
    }
    /* every group's coefficient, then the gradient: no pass waits on its own dot */
    for (int64_t g = 0; g < G; ++g) {
        double r = (double)rn[g];
        coef[g] = (T)((double)coef[g] / (double)Cg * r * r * r);
    }
    for (int64_t g = 0; g < G; ++g) {
        const T *xr = xn + g * Cg, *gzg = gz + g * Cg;
        T *out = outn + g * Cg, r = rn[g], cg = coef[g];
#pragma omp simd
        for (int64_t j = 0; j < Cg; ++j) out[j] = gzg[j] * r - xr[j] * cg;
    }
}

/* Backward of both: with z = x r, gz = gy a - z b (the PN step), then the GroupScaling gradient
 * gx = gz r - x r^3 mean_j(gz x) per row and group; in the same pass sgy += gy and
 * sgz += gy z over all rows (outputs nullable). gz lives only in a per-thread row buffer. */
int NAME(pn_grms_bwd)(const T *gy, const T *x, const T *rstd, const T *a, const T *b, int64_t N,
                      int64_t C, int64_t G, T *gx, T *sgy, T *sgz, int nt)
{
    int64_t Cg = C / G;
    NAME(scratch_t) sc;  /* 2C block sums + a C row buffer and G dot products per thread */
    if (NAME(scratch_alloc)(&sc, nt, 2 * C, C + G)) return -1;
#pragma omp parallel num_threads(nt)
    {
        int tid = omp_get_thread_num(), nth = omp_get_num_threads();
        double *p = sc.part + (size_t)tid * 2 * C;
        T *q = sc.qall + (size_t)tid * (3 * C + G), *qg = q, *qz = q + C, *gz = q + 2 * C;
        T *coef = q + 3 * C;
        int64_t lo = N * tid / nth, hi = N * (tid + 1) / nth;
        for (int64_t n = lo; n < hi; ++n) {
            PN_BY_WIDTH(Cg, W, NAME(grms_bwd_row)(gy + n * C, x + n * C, rstd + n * G, a, b, G, W,
                                                  gx + n * C, qg, qz, gz, coef));
            if ((n - lo) % BLOCK_ROWS == BLOCK_ROWS - 1 || n == hi - 1) flush(q, p, 2 * C);
        }
    }
    NAME(scratch_finish)(&sc, nt, 2, C, (T *[]){sgy, sgz});
    return 0;
}

/* PN (Algorithm 2) past its warmup, a whole training forward (no cross-rank sync):
 * rstd = 1 / sqrt(psi2 + eps), y = x (rstd weight) + bias, count = sum keep (N without keep),
 * psi2_b = sum_real x^2 / max(count, 1), gamma = psi2_b rstd rstd, and the running psi2 in place,
 * psi2 = alpha psi2 + one_minus_alpha psi2_b where count > 0 and psi2_b is finite (per channel).
 * The (C,) steps round as the eager torch operations they stand for (PN_EXACT); alpha,
 * one_minus_alpha and eps arrive as the Python floats and are rounded to T as torch does. */
PN_EXACT int NAME(pn_paper_fwd)(const T *x, const T *keep, const T *weight, const T *bias,
                                T *psi2, int64_t N, int64_t C, double eps, double alpha,
                                double one_minus_alpha, T *y, T *rstd, T *psi2_b, T *gamma,
                                T *count, int nt)
{
    T *scale = (T *)malloc((size_t)C * sizeof(T));
    if (!scale) return -1;
    const T e = (T)eps, a = (T)alpha, b = (T)one_minus_alpha;
    for (int64_t c = 0; c < C; ++c) {
        rstd[c] = (T)1 / SQRT(psi2[c] + e);
        scale[c] = rstd[c] * weight[c];
    }
    int rc = NAME(pn_affine_colstats)(x, keep, scale, bias, N, C, y, psi2_b, nt);
    free(scale);
    if (rc) return rc;
    double n = (double)N;
    if (keep) {  /* 0/1 values: the sum is exact in any order */
        n = 0.0;
        for (int64_t i = 0; i < N; ++i) n += (double)keep[i];
    }
    const T cnt = (T)n, div = cnt < (T)1 ? (T)1 : cnt;
    *count = cnt;
    for (int64_t c = 0; c < C; ++c) {
        T pb = psi2_b[c] / div;
        psi2_b[c] = pb;
        gamma[c] = pb * rstd[c] * rstd[c];
        if (cnt > 0 && isfinite(pb)) {
            T kept = a * psi2[c], added = b * pb;
            psi2[c] = kept + added;
        }
    }
    return 0;
}

/* PN's backward statistic in place (update_nu_ in autograd.py, operation for operation):
 * lambda = weight rstd msgyx / max(count, 1), step = one_minus_a (lambda - nu gamma), with
 * safeguard step /= w where w = one_minus_a gamma >= 2; nu += step where count > 0 and the step
 * is finite (per channel). */
PN_EXACT static void NAME(pn_nu_step)(T *nu, const T *weight, const T *rstd, const T *gamma,
                                      const T *msgyx, T cnt, int64_t C, double one_minus_a,
                                      int safeguard)
{
    const T b = (T)one_minus_a, div = cnt < (T)1 ? (T)1 : cnt;
    for (int64_t c = 0; c < C; ++c) {
        T lam = weight[c] * rstd[c] * msgyx[c] / div;
        T drift = nu[c] * gamma[c];
        T step = (lam - drift) * b;
        if (safeguard) {
            T w = gamma[c] * b;
            if (w >= (T)2) step = step * ((T)1 / w);
        }
        if (cnt > 0 && isfinite(step)) nu[c] = nu[c] + step;
    }
}

/* Its backward (no cross-rank sync): gx = gy (weight rstd) - k x (nu rstd rstd) with the sums
 * of pn_bwd_apply, gweight = rstd sum gy x, gbias = sum gy (nullable), and nu in place
 * (pn_nu_step, from the masked sum sum_real(gy x)). Rounds as the eager update_nu_ (PN_EXACT). */
PN_EXACT int NAME(pn_paper_bwd)(const T *gy, const T *x, const T *keep, const T *weight,
                                const T *rstd, const T *gamma, T *nu, const T *count,
                                int64_t N, int64_t C, double one_minus_a, int safeguard, T *gx,
                                T *gweight, T *gbias, int nt)
{
    T *buf = (T *)calloc((size_t)C * 6, sizeof(T));
    if (!buf) return -1;
    T *coef_a = buf, *coef_x = buf + C, *zero = buf + 2 * C;
    T *sgy = buf + 3 * C, *sgyx = buf + 4 * C, *msgyx = buf + 5 * C;
    for (int64_t c = 0; c < C; ++c) {
        coef_a[c] = weight[c] * rstd[c];
        coef_x[c] = nu[c] * rstd[c] * rstd[c];
    }
    int rc = NAME(pn_bwd_apply)(gy, x, coef_a, coef_x, zero, keep, keep, N, C, gx, sgy, sgyx,
                                msgyx, nt);
    if (rc) { free(buf); return rc; }
    for (int64_t c = 0; c < C; ++c) {
        if (gweight) gweight[c] = rstd[c] * sgyx[c];
        if (gbias) gbias[c] = sgy[c];
    }
    NAME(pn_nu_step)(nu, weight, rstd, gamma, msgyx, *count, C, one_minus_a, safeguard);
    free(buf);
    return 0;
}

/* The released PN's forward statistics step (D1, D3) from the column sums of the (group-scaled)
 * input squared over the real rows (s2) and all N rows (s2all), no cross-rank sync:
 * count = sum keep (N without keep), psi2_b = s2 / max(count, 1), t = iters + 1, w = t (clock < 0)
 * or clock; rstd_bwd = 1/sqrt(psi2_b + eps); rstd_fwd = rstd_bwd while w <= warmup, else
 * 1/sqrt(phi + eps); phi <- alpha cum + one_minus_alpha psi2_b (where count > 0) with
 * cum = phi (t - 1) / t + psi2_b / t while w < warmup, else phi; iters <- t. Also
 * scale = rstd_fwd weight and num_all = N. Rounds as reference_running_step (PN_EXACT). */
PN_EXACT int NAME(pn_ref_fwd_stats)(const T *s2, const T *keep, int64_t N, int64_t C,
                                    const T *weight, T *phi, int64_t *iters, int64_t clock,
                                    int64_t warmup, double eps, double alpha,
                                    double one_minus_alpha, T *rstd_fwd, T *rstd_bwd, T *scale,
                                    T *count, T *num_all)
{
    double n = (double)N;
    if (keep) {  /* 0/1 values: the sum is exact in any order */
        n = 0.0;
        for (int64_t i = 0; i < N; ++i) n += (double)keep[i];
    }
    const T cnt = (T)n, div = cnt < (T)1 ? (T)1 : cnt, e = (T)eps;
    const T a = (T)alpha, b = (T)one_minus_alpha, wu = (T)warmup;
    const int64_t it = *iters + 1;
    const T t = (T)it, w = clock < 0 ? t : (T)clock;
    *count = cnt;
    *num_all = (T)N;
    for (int64_t c = 0; c < C; ++c) {
        T pb = s2[c] / div, ph = phi[c];
        T rb = (T)1 / SQRT(pb + e);
        T rf = w <= wu ? rb : (T)1 / SQRT(ph + e);
        rstd_bwd[c] = rb;
        rstd_fwd[c] = rf;
        scale[c] = rf * weight[c];
        T cum = ph;
        if (w < wu) {
            T old = ph * (t - (T)1) / t, add = pb / t;
            cum = old + add;
        }
        if (cnt > 0) {
            T kept = a * cum, added = b * pb;
            phi[c] = kept + added;
        }
    }
    *iters = it;
    return 0;
}

/* The released PN with GroupScaling (G groups, eps geps), a whole training forward without
 * cross-rank sync: y from the group-scaled x, the statistics step of pn_ref_fwd_stats (which
 * advances phi and iters) and the group rstd (N, G) the backward needs. Past the warmup
 * (w > warmup, w as in pn_ref_fwd_stats) rstd_fwd = 1/sqrt(phi + eps) is known before the
 * batch and one pass does it all (grms_pass with y); in the warmup the sums come first
 * (pn_grms_colstats), then the step, then y (pn_grms_affine). s2, s2all: the column sums. */
PN_EXACT int NAME(pn_ref_grms_fwd)(const T *x, const T *keep, int64_t N, int64_t C, int64_t G,
                                   double geps, const T *weight, const T *bias, T *phi,
                                   int64_t *iters, int64_t clock, int64_t warmup, double eps,
                                   double alpha, double one_minus_alpha, T *y, T *rstd_g,
                                   T *rstd_fwd, T *rstd_bwd, T *scale, T *s2, T *s2all,
                                   T *count, T *num_all, int nt)
{
    const T t = (T)(*iters + 1), w = clock < 0 ? t : (T)clock;
    int rc;
    if (w > (T)warmup) {
        const T e = (T)eps;
        for (int64_t c = 0; c < C; ++c) {  /* as pn_ref_fwd_stats rounds them */
            T rf = (T)1 / SQRT(phi[c] + e);
            scale[c] = rf * weight[c];
        }
        rc = NAME(grms_pass)(x, keep, N, C, G, geps, scale, bias, y, rstd_g, s2, s2all, nt);
        if (rc) return rc;
        return NAME(pn_ref_fwd_stats)(s2, keep, N, C, weight, phi, iters, clock, warmup, eps,
                                      alpha, one_minus_alpha, rstd_fwd, rstd_bwd, scale, count,
                                      num_all);
    }
    rc = NAME(pn_grms_colstats)(x, keep, N, C, G, geps, rstd_g, s2, s2all, nt);
    if (rc) return rc;
    NAME(pn_ref_fwd_stats)(s2, keep, N, C, weight, phi, iters, clock, warmup, eps, alpha,
                           one_minus_alpha, rstd_fwd, rstd_bwd, scale, count, num_all);
    return NAME(pn_grms_affine)(x, rstd_g, scale, bias, N, C, G, y, nt);
}

/* The released backward's per-channel coefficients: a = weight rstd_bwd and
 * coef_x = (one_minus_a ema) rstd_fwd rstd_bwd (as _ema_coef, PN_EXACT). */
PN_EXACT int NAME(pn_ref_bwd_coef)(const T *weight, const T *ema, const T *rstd_fwd,
                                   const T *rstd_bwd, int64_t C, double one_minus_a, T *a,
                                   T *coef_x)
{
    const T b = (T)one_minus_a;
    for (int64_t c = 0; c < C; ++c) {
        a[c] = weight[c] * rstd_bwd[c];
        coef_x[c] = ema[c] * b * rstd_fwd[c] * rstd_bwd[c];
    }
    return 0;
}

/* The end of the released backward (D5, no cross-rank sync), from sgyx = sum gy x over all
 * rows: gamma_all = rstd_fwd rstd_fwd s2all / max(num_all, 1),
 * ema <- ema + weight rstd_fwd sgyx / max(num_all, 1) - one_minus_a ema gamma_all (where
 * count > 0), num_unstable += 1 when count > 0 and (one_minus_a gamma_all >= 2 in some channel
 * or the new ema is not finite in some channel), gweight = rstd_fwd sgyx. Rounds as
 * _reference_backward_finish (PN_EXACT). */
PN_EXACT int NAME(pn_ref_bwd_finish)(const T *sgyx, const T *weight, const T *rstd_fwd,
                                     const T *s2all, const T *count, const T *num_all,
                                     int64_t C, double one_minus_a, T *ema,
                                     int64_t *num_unstable, T *gweight)
{
    const T b = (T)one_minus_a, na = *num_all, div = na < (T)1 ? (T)1 : na, cnt = *count;
    int big = 0, nonfinite = 0;
    for (int64_t c = 0; c < C; ++c) {
        T e = ema[c];
        T gamma_all = rstd_fwd[c] * rstd_fwd[c] * s2all[c] / div;
        T lam = weight[c] * rstd_fwd[c] * sgyx[c] / div;
        T drift = e * b * gamma_all;
        T grown = e + lam;
        T updated = grown - drift;
        if (gamma_all * b >= (T)2) big = 1;
        if (!isfinite(updated)) nonfinite = 1;
        if (cnt > 0) ema[c] = updated;
        if (gweight) gweight[c] = rstd_fwd[c] * sgyx[c];
    }
    if (cnt > 0 && (big || nonfinite)) *num_unstable += 1;
    return 0;
}

/* The released PN's whole backward with GroupScaling (no cross-rank sync): pn_ref_bwd_coef,
 * pn_grms_bwd and pn_ref_bwd_finish in turn, rounding as they do. Advances ema and
 * num_unstable in place; gx (N, C), gweight and gbias (C,) (gbias nullable). */
int NAME(pn_ref_grms_backward)(const T *gy, const T *x, const T *rstd_g, const T *weight,
                               T *ema, const T *rstd_fwd, const T *rstd_bwd, const T *s2all,
                               const T *count, const T *num_all, int64_t N, int64_t C, int64_t G,
                               double one_minus_a, T *gx, T *gweight, T *gbias,
                               int64_t *num_unstable, int nt)
{
    T *buf = (T *)malloc((size_t)C * 3 * sizeof(T));
    if (!buf) return -1;
    T *a = buf, *b = buf + C, *sgz = buf + 2 * C;
    NAME(pn_ref_bwd_coef)(weight, ema, rstd_fwd, rstd_bwd, C, one_minus_a, a, b);
    int rc = NAME(pn_grms_bwd)(gy, x, rstd_g, a, b, N, C, G, gx, gbias, sgz, nt);
    if (!rc)
        NAME(pn_ref_bwd_finish)(sgz, weight, rstd_fwd, s2all, count, num_all, C, one_minus_a, ema,
                                num_unstable, gweight);
    free(buf);
    return rc;
}

/* Dynamic Tanh's backward from t = tanh(alpha x) (saved by the forward), in one pass:
 * gu = gy weight (1 - t t), gx = gu alpha, and the sums gweight = sum gy t, gbias = sum gy (per
 * channel) and galpha = sum gu x (over all elements; per channel first, then over channels in
 * double). gbias nullable. */
int NAME(pn_dyt_bwd)(const T *gy, const T *x, const T *t, const T *alpha, const T *weight,
                     int64_t N, int64_t C, T *gx, T *gweight, T *gbias, T *galpha, int nt)
{
    NAME(scratch_t) sc;
    if (NAME(scratch_alloc)(&sc, nt, 3 * C, 0)) return -1;
    const T a = *alpha;
#pragma omp parallel num_threads(nt)
    {
        int tid = omp_get_thread_num(), nth = omp_get_num_threads();
        double *p = sc.part + (size_t)tid * 3 * C;
        T *q = sc.qall + (size_t)tid * 3 * C, *qw = q, *qb = q + C, *qa = q + 2 * C;
        int64_t lo = N * tid / nth, hi = N * (tid + 1) / nth;
        for (int64_t n = lo; n < hi; ++n) {
            const T *gr = gy + n * C, *xr = x + n * C, *tr = t + n * C;
            T *out = gx + n * C;
#pragma omp simd
            for (int64_t c = 0; c < C; ++c) {
                T g = gr[c], tv = tr[c];
                T gu = g * weight[c] * ((T)1 - tv * tv);
                out[c] = gu * a;
                qw[c] += g * tv; qb[c] += g; qa[c] += gu * xr[c];
            }
            if ((n - lo) % BLOCK_ROWS == BLOCK_ROWS - 1 || n == hi - 1) flush(q, p, 3 * C);
        }
    }
    double total = 0.0;
    for (int t_ = 0; t_ < nt; ++t_)
        for (int64_t c = 0; c < C; ++c) total += sc.part[((size_t)t_ * 3 + 2) * C + c];
    *galpha = (T)total;
    NAME(scratch_finish)(&sc, nt, 3, C, (T *[]){gweight, gbias, NULL});
    return 0;
}

/* y = shift + x scale per row, rounding as torch.addcmul(shift, x, scale) does on CPU: one
 * fused multiply-add (one rounding). */
PN_EXACT static void NAME(pn_affine_exact)(const T *x, const T *scale, const T *shift, int64_t N,
                                           int64_t C, T *y, int nt)
{
#pragma omp parallel for num_threads(nt) schedule(static)
    for (int64_t n = 0; n < N; ++n) {
        const T *xr = x + n * C;
        T *yr = y + n * C;
#pragma omp simd
        for (int64_t c = 0; c < C; ++c) {
            yr[c] = FMA(xr[c], scale[c], shift[c]);
        }
    }
}

/* The masked batch statistics of BN (center) and PN-V (no center) without cross-rank sync,
 * after one read of x (pn_colstats): count = sum keep (N without keep); with center, the shift
 * K = the first real row (0 without real rows), d = s1 / max(count, 1), mean = K + d,
 * var = max(s2 / max(count, 1) - d d, 0); without, var = s2 / max(count, 1). Then
 * rstd = 1/sqrt(var + eps), scale = rstd weight, shift_y = bias - mean scale (bias without
 * center), gamma = var rstd rstd, and (y not NULL) y = shift_y + x scale. With run_a (not NULL)
 * the running statistics advance in place as ema_running_ in autograd.py, where count > 0:
 * with center run_a (mean) and run_b (variance) take mean and the unbiased var
 * cnt / max(cnt - 1, 1) var, without center run_a takes var in each channel where var is finite;
 * each as run = keep_w run + add_w stat. Rounds as batch_moments, BatchStatNormFunction and
 * ema_running_ (PN_EXACT). mean (with center), gamma, y, run_a (run_b without center) nullable. */
PN_EXACT int NAME(pn_batch_fwd_stats)(const T *x, const T *keep, int64_t N, int64_t C,
                                      int center, double eps, const T *weight, const T *bias,
                                      T *mean, T *var, T *rstd, T *scale, T *shift_y, T *gamma,
                                      T *count, T *y, T *run_a, T *run_b, double keep_w,
                                      double add_w, int nt)
{
    double n = (double)N;
    int64_t first = N > 0 ? 0 : -1;
    if (keep) {  /* 0/1 values: the sum is exact in any order */
        n = 0.0;
        first = -1;
        for (int64_t i = 0; i < N; ++i) {
            n += (double)keep[i];
            if (first < 0 && keep[i] != 0) first = i;
        }
    }
    T *buf = (T *)calloc((size_t)C * 3, sizeof(T));
    if (!buf) return -1;
    T *shift = buf, *s1 = buf + C, *s2 = buf + 2 * C;
    if (center && first >= 0) memcpy(shift, x + first * C, (size_t)C * sizeof(T));
    int rc = NAME(pn_colstats)(x, keep, shift, N, C, center ? s1 : NULL, s2, NULL, nt);
    if (rc) { free(buf); return rc; }
    const T cnt = (T)n, div = cnt < (T)1 ? (T)1 : cnt, e = (T)eps;
    *count = cnt;
    for (int64_t c = 0; c < C; ++c) {
        T v, m = 0;
        if (center) {
            T d = s1[c] / div, sq = s2[c] / div, dd = d * d;
            m = shift[c] + d;
            v = sq - dd;
            v = v < (T)0 ? (T)0 : v;
            mean[c] = m;
        } else {
            v = s2[c] / div;
        }
        T r = (T)1 / SQRT(v + e);
        var[c] = v;
        rstd[c] = r;
        scale[c] = r * weight[c];
        if (center) {
            T ms = m * scale[c];
            shift_y[c] = bias[c] - ms;
        } else {
            shift_y[c] = bias[c];
        }
        if (gamma) gamma[c] = v * r * r;
    }
    free(buf);
    if (run_a && cnt > 0) {
        const T kw = (T)keep_w, aw = (T)add_w;
        T den = cnt - (T)1;
        den = den < (T)1 ? (T)1 : den;
        const T unbias = cnt / den;
        for (int64_t c = 0; c < C; ++c) {
            if (center) {
                T kept = kw * run_a[c], added = aw * mean[c];
                run_a[c] = kept + added;
                T ub = var[c] * unbias;
                kept = kw * run_b[c];
                added = aw * ub;
                run_b[c] = kept + added;
            } else if (isfinite(var[c])) {
                T kept = kw * run_a[c], added = aw * var[c];
                run_a[c] = kept + added;
            }
        }
    }
    if (y) NAME(pn_affine_exact)(x, scale, shift_y, N, C, y, nt);
    return 0;
}

/* Its exact backward without cross-rank sync: the sums of pn_bwd_sums, then
 * inner = sum gy x - mean sum gy (sum gy x without mean), gweight = rstd inner,
 * g_xhat = weight rstd inner, rn = rstd / max(count, 1), coef_x = rn rstd g_xhat,
 * coef_0 = rn weight sum gy - coef_x mean (0 without mean), and
 * gx = gy (weight rstd) - k (x coef_x + coef_0) (pn_bwd_apply); gbias = sum gy. With nu (PN's
 * warmup) nu advances as in pn_paper_bwd from the masked sum. Rounds as BatchStatNormFunction's
 * backward and update_nu_ (PN_EXACT). mean, gamma, nu, gbias are nullable. */
PN_EXACT int NAME(pn_batch_bwd)(const T *gy, const T *x, const T *keep, const T *weight,
                                const T *mean, const T *rstd, const T *count, const T *gamma,
                                T *nu, int64_t N, int64_t C, double one_minus_a, int safeguard,
                                T *gx, T *gweight, T *gbias, int nt)
{
    T *buf = (T *)calloc((size_t)C * 6, sizeof(T));
    if (!buf) return -1;
    T *sgy = buf, *sgyx = buf + C, *msgyx = buf + 2 * C;
    T *coef_a = buf + 3 * C, *coef_x = buf + 4 * C, *coef_0 = buf + 5 * C;
    int rc = NAME(pn_bwd_sums)(gy, x, keep, N, C, sgy, sgyx, nu ? msgyx : NULL, nt);
    if (rc) { free(buf); return rc; }
    const T cnt = *count, div = cnt < (T)1 ? (T)1 : cnt;
    for (int64_t c = 0; c < C; ++c) {
        T inner = sgyx[c];
        if (mean) {
            T ms = mean[c] * sgy[c];
            inner = sgyx[c] - ms;
        }
        gweight[c] = rstd[c] * inner;
        T wr = weight[c] * rstd[c];
        T g_xhat = wr * inner;
        T rn = rstd[c] / div;
        T cx = rn * rstd[c] * g_xhat;
        coef_a[c] = wr;
        coef_x[c] = cx;
        if (mean) {
            T t1 = rn * weight[c] * sgy[c], t2 = cx * mean[c];
            coef_0[c] = t1 - t2;
        }
        if (gbias) gbias[c] = sgy[c];
    }
    rc = NAME(pn_bwd_apply)(gy, x, coef_a, coef_x, coef_0, keep, NULL, N, C, gx, NULL, NULL,
                            NULL, nt);
    if (rc) { free(buf); return rc; }
    if (nu) NAME(pn_nu_step)(nu, weight, rstd, gamma, msgyx, cnt, C, one_minus_a, safeguard);
    free(buf);
    return 0;
}
