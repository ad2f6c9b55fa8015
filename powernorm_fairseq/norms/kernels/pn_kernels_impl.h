/* One-pass CPU kernels of the masked norms, instantiated for T = float and T = double by
 * pn_kernels.c (which defines T and NAME(fn)). See pn_kernels.c for the conventions.
 *
 * Every kernel reads each (N, C) operand once. Column sums are accumulated in double, per thread,
 * over a static split of the rows, and reduced in thread order afterwards: the result depends on
 * the thread count but not on scheduling. Rows with keep[n] == 0 (pads) are skipped by masked
 * sums, so a non-finite pad value cannot poison a statistic.
 */

/* s1 += k (x - shift), s2 += k (x - shift)^2, s2all += (x - shift)^2 (each output nullable) */
int NAME(pn_colstats)(const T *x, const T *keep, const T *shift, int64_t N, int64_t C,
                      double *s1, double *s2, double *s2all, int nt)
{
    double *part = alloc_partials(nt, 3 * C);
    if (!part) return -1;
#pragma omp parallel num_threads(nt)
    {
        int tid = omp_get_thread_num(), nth = omp_get_num_threads();
        double *p1 = part + (size_t)tid * 3 * C, *p2 = p1 + C, *pa = p2 + C;
        int64_t lo = N * tid / nth, hi = N * (tid + 1) / nth;
        for (int64_t n = lo; n < hi; ++n) {
            const T *xr = x + n * C;
            int real = keep == NULL || keep[n] != 0;
            if (real && s2all) {
#pragma omp simd
                for (int64_t c = 0; c < C; ++c) {
                    double d = (double)(xr[c] - shift[c]);
                    p1[c] += d; p2[c] += d * d; pa[c] += d * d;
                }
            } else if (real) {
#pragma omp simd
                for (int64_t c = 0; c < C; ++c) {
                    double d = (double)(xr[c] - shift[c]);
                    p1[c] += d; p2[c] += d * d;
                }
            } else if (s2all) {
#pragma omp simd
                for (int64_t c = 0; c < C; ++c) {
                    double d = (double)(xr[c] - shift[c]);
                    pa[c] += d * d;
                }
            }
        }
    }
    reduce_partials(part, nt, 3, C, (double *[]){s1, s2, s2all});
    free(part);
    return 0;
}

/* y = x * scale + bias; s2 += k x^2, s2all += x^2 (s2all nullable) */
int NAME(pn_affine_colstats)(const T *x, const T *keep, const T *scale, const T *bias,
                             int64_t N, int64_t C, T *y, double *s2, double *s2all, int nt)
{
    double *part = alloc_partials(nt, 2 * C);
    if (!part) return -1;
#pragma omp parallel num_threads(nt)
    {
        int tid = omp_get_thread_num(), nth = omp_get_num_threads();
        double *p2 = part + (size_t)tid * 2 * C, *pa = p2 + C;
        int64_t lo = N * tid / nth, hi = N * (tid + 1) / nth;
        for (int64_t n = lo; n < hi; ++n) {
            const T *xr = x + n * C;
            T *yr = y + n * C;
            int real = keep == NULL || keep[n] != 0;
            if (real) {
#pragma omp simd
                for (int64_t c = 0; c < C; ++c) {
                    T v = xr[c];
                    double d = (double)v;
                    yr[c] = v * scale[c] + bias[c];
                    p2[c] += d * d; pa[c] += d * d;
                }
            } else {
#pragma omp simd
                for (int64_t c = 0; c < C; ++c) {
                    T v = xr[c];
                    double d = (double)v;
                    yr[c] = v * scale[c] + bias[c];
                    pa[c] += d * d;
                }
            }
        }
    }
    reduce_partials(part, nt, 2, C, (double *[]){s2, s2all});
    free(part);
    return 0;
}

/* sgy += gy, sgyx += gy x (over all rows), msgyx += k gy x (each output nullable) */
int NAME(pn_bwd_sums)(const T *gy, const T *x, const T *keep, int64_t N, int64_t C,
                      double *sgy, double *sgyx, double *msgyx, int nt)
{
    double *part = alloc_partials(nt, 3 * C);
    if (!part) return -1;
#pragma omp parallel num_threads(nt)
    {
        int tid = omp_get_thread_num(), nth = omp_get_num_threads();
        double *pg = part + (size_t)tid * 3 * C, *pgx = pg + C, *pm = pgx + C;
        int64_t lo = N * tid / nth, hi = N * (tid + 1) / nth;
        for (int64_t n = lo; n < hi; ++n) {
            const T *gr = gy + n * C, *xr = x + n * C;
            if (keep != NULL && keep[n] != 0) {
#pragma omp simd
                for (int64_t c = 0; c < C; ++c) {
                    double g = (double)gr[c], gx = g * (double)xr[c];
                    pg[c] += g; pgx[c] += gx; pm[c] += gx;
                }
            } else {
#pragma omp simd
                for (int64_t c = 0; c < C; ++c) {
                    double g = (double)gr[c];
                    pg[c] += g; pgx[c] += g * (double)xr[c];
                }
            }
        }
    }
    if (keep == NULL && msgyx) {  /* every row is real: the masked sum is the plain one */
        for (int t = 0; t < nt; ++t)
            memcpy(part + (size_t)t * 3 * C + 2 * C, part + (size_t)t * 3 * C + C,
                   C * sizeof(double));
    }
    reduce_partials(part, nt, 3, C, (double *[]){sgy, sgyx, msgyx});
    free(part);
    return 0;
}

/* gx = gy * a - m_n (x * b + c), m_n = corr_keep[n] (or 1); in the same pass (outputs nullable)
 * sgy += gy, sgyx += gy x over all rows and msgyx += sum_keep[n] gy x. */
int NAME(pn_bwd_apply)(const T *gy, const T *x, const T *a, const T *b, const T *cc,
                       const T *corr_keep, const T *sum_keep, int64_t N, int64_t C, T *gx,
                       double *sgy, double *sgyx, double *msgyx, int nt)
{
    int sums = sgy || sgyx || msgyx;
    double *part = sums ? alloc_partials(nt, 3 * C) : NULL;
    if (sums && !part) return -1;
#pragma omp parallel num_threads(nt)
    {
        int tid = omp_get_thread_num(), nth = omp_get_num_threads();
        double *pg = sums ? part + (size_t)tid * 3 * C : NULL;
        double *pgx = sums ? pg + C : NULL, *pm = sums ? pgx + C : NULL;
        int64_t lo = N * tid / nth, hi = N * (tid + 1) / nth;
        for (int64_t n = lo; n < hi; ++n) {
            const T *gr = gy + n * C, *xr = x + n * C;
            T *out = gx + n * C;
            T m = corr_keep ? corr_keep[n] : (T)1;
            if (m != 0) {
#pragma omp simd
                for (int64_t c = 0; c < C; ++c) out[c] = gr[c] * a[c] - m * (xr[c] * b[c] + cc[c]);
            } else {
#pragma omp simd
                for (int64_t c = 0; c < C; ++c) out[c] = gr[c] * a[c];
            }
            if (!sums) continue;
            if (sum_keep == NULL || sum_keep[n] != 0) {
#pragma omp simd
                for (int64_t c = 0; c < C; ++c) {
                    double g = (double)gr[c], gxv = g * (double)xr[c];
                    pg[c] += g; pgx[c] += gxv; pm[c] += gxv;
                }
            } else {
#pragma omp simd
                for (int64_t c = 0; c < C; ++c) {
                    double g = (double)gr[c];
                    pg[c] += g; pgx[c] += g * (double)xr[c];
                }
            }
        }
    }
    if (sums) {
        reduce_partials(part, nt, 3, C, (double *[]){sgy, sgyx, msgyx});
        free(part);
    }
    return 0;
}

/* Per-row, per-group RMS scaling: r[n, g] = 1 / sqrt(mean_j x[n, g, j]^2 + eps), y = x r. */
int NAME(pn_group_rms_fwd)(const T *x, int64_t N, int64_t C, int64_t G, double eps, T *y,
                           T *rstd, int nt)
{
    int64_t Cg = C / G;
#pragma omp parallel for num_threads(nt) schedule(static)
    for (int64_t n = 0; n < N; ++n) {
        for (int64_t g = 0; g < G; ++g) {
            const T *xr = x + n * C + g * Cg;
            T *yr = y + n * C + g * Cg;
            double ss = 0;
#pragma omp simd reduction(+:ss)
            for (int64_t j = 0; j < Cg; ++j) ss += (double)xr[j] * (double)xr[j];
            T r = (T)(1.0 / sqrt(ss / (double)Cg + eps));
            rstd[n * G + g] = r;
#pragma omp simd
            for (int64_t j = 0; j < Cg; ++j) yr[j] = xr[j] * r;
        }
    }
    return 0;
}

/* Its gradient: gx = gy r - x r^3 mean_j(gy x) per row and group. */
int NAME(pn_group_rms_bwd)(const T *gy, const T *x, const T *rstd, int64_t N, int64_t C,
                           int64_t G, T *gx, int nt)
{
    int64_t Cg = C / G;
#pragma omp parallel for num_threads(nt) schedule(static)
    for (int64_t n = 0; n < N; ++n) {
        for (int64_t g = 0; g < G; ++g) {
            const T *gr = gy + n * C + g * Cg, *xr = x + n * C + g * Cg;
            T *out = gx + n * C + g * Cg;
            double s = 0;
#pragma omp simd reduction(+:s)
            for (int64_t j = 0; j < Cg; ++j) s += (double)gr[j] * (double)xr[j];
            T r = rstd[n * G + g];
            T coef = (T)(s / (double)Cg * (double)r * (double)r * (double)r);
#pragma omp simd
            for (int64_t j = 0; j < Cg; ++j) out[j] = gr[j] * r - xr[j] * coef;
        }
    }
    return 0;
}
