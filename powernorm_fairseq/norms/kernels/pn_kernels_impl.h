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
            T ss = 0;
#pragma omp simd reduction(+:ss)
            for (int64_t j = 0; j < Cg; ++j) ss += xr[j] * xr[j];
            T r = (T)(1.0 / sqrt((double)ss / (double)Cg + eps));
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
            T s = 0;
#pragma omp simd reduction(+:s)
            for (int64_t j = 0; j < Cg; ++j) s += gr[j] * xr[j];
            T r = rstd[n * G + g];
            T coef = (T)((double)s / (double)Cg * (double)r * (double)r * (double)r);
#pragma omp simd
            for (int64_t j = 0; j < Cg; ++j) out[j] = gr[j] * r - xr[j] * coef;
        }
    }
    return 0;
}

/* The released PN's GroupScaling fused with its statistics (reference variant).
 * Pass 1: r[n, g] = 1 / sqrt(mean_j x[n, g, j]^2 + eps), z = x r, and the column sums
 * s2 += k z^2, s2all += z^2 (s2all nullable); z itself is not stored. */
int NAME(pn_grms_colstats)(const T *x, const T *keep, int64_t N, int64_t C, int64_t G,
                           double eps, T *rstd, T *s2, T *s2all, int nt)
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
            for (int64_t g = 0; g < G; ++g) {
                const T *xr = x + n * C + g * Cg;
                T ss = 0;
#pragma omp simd reduction(+:ss)
                for (int64_t j = 0; j < Cg; ++j) ss += xr[j] * xr[j];
                T r = (T)(1.0 / sqrt((double)ss / (double)Cg + eps));
                rstd[n * G + g] = r;
                T r2 = r * r, *q2g = q2 + g * Cg, *qag = qa + g * Cg;
                if (real) {
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
            if ((n - lo) % BLOCK_ROWS == BLOCK_ROWS - 1 || n == hi - 1) flush(q, p, 2 * C);
        }
    }
    NAME(scratch_finish)(&sc, nt, 2, C, (T *[]){s2, s2all});
    return 0;
}

/* Pass 2: y = x r[n, g] * scale + bias. */
int NAME(pn_grms_affine)(const T *x, const T *rstd, const T *scale, const T *bias, int64_t N,
                         int64_t C, int64_t G, T *y, int nt)
{
    int64_t Cg = C / G;
#pragma omp parallel for num_threads(nt) schedule(static)
    for (int64_t n = 0; n < N; ++n) {
        for (int64_t g = 0; g < G; ++g) {
            const T *xr = x + n * C + g * Cg, *sc = scale + g * Cg, *bi = bias + g * Cg;
            T *yr = y + n * C + g * Cg;
            T r = rstd[n * G + g];
#pragma omp simd
            for (int64_t j = 0; j < Cg; ++j) yr[j] = xr[j] * r * sc[j] + bi[j];
        }
    }
    return 0;
}

/* Backward of both: with z = x r, gz = gy a - z b (the PN step), then the GroupScaling gradient
 * gx = gz r - x r^3 mean_j(gz x) per row and group; in the same pass sgy += gy and
 * sgz += gy z over all rows (outputs nullable). gz lives only in a per-thread row buffer. */
int NAME(pn_grms_bwd)(const T *gy, const T *x, const T *rstd, const T *a, const T *b, int64_t N,
                      int64_t C, int64_t G, T *gx, T *sgy, T *sgz, int nt)
{
    int64_t Cg = C / G;
    NAME(scratch_t) sc;  /* 2C block sums + a C row buffer per thread */
    if (NAME(scratch_alloc)(&sc, nt, 2 * C, C)) return -1;
#pragma omp parallel num_threads(nt)
    {
        int tid = omp_get_thread_num(), nth = omp_get_num_threads();
        double *p = sc.part + (size_t)tid * 2 * C;
        T *q = sc.qall + (size_t)tid * 3 * C, *qg = q, *qz = q + C, *gz = q + 2 * C;
        int64_t lo = N * tid / nth, hi = N * (tid + 1) / nth;
        for (int64_t n = lo; n < hi; ++n) {
            for (int64_t g = 0; g < G; ++g) {
                int64_t o = n * C + g * Cg;
                const T *gr = gy + o, *xr = x + o, *ag = a + g * Cg, *bg = b + g * Cg;
                T *out = gx + o, *gzg = gz + g * Cg, *qgg = qg + g * Cg, *qzg = qz + g * Cg;
                T r = rstd[n * G + g], dot = 0;
#pragma omp simd reduction(+:dot)
                for (int64_t j = 0; j < Cg; ++j) {
                    T gv = gr[j], zv = xr[j] * r;
                    T gzv = gv * ag[j] - zv * bg[j];
                    gzg[j] = gzv;
                    qgg[j] += gv; qzg[j] += gv * zv;
                    dot += gzv * xr[j];
                }
                T coef = (T)((double)dot / (double)Cg * (double)r * (double)r * (double)r);
#pragma omp simd
                for (int64_t j = 0; j < Cg; ++j) out[j] = gzg[j] * r - xr[j] * coef;
            }
            if ((n - lo) % BLOCK_ROWS == BLOCK_ROWS - 1 || n == hi - 1) flush(q, p, 2 * C);
        }
    }
    NAME(scratch_finish)(&sc, nt, 2, C, (T *[]){sgy, sgz});
    return 0;
}
