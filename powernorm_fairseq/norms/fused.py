"""Optional fused CPU kernels for the masked norms (C, OpenMP, loaded with ctypes).

The norms' autograd Functions compute the same quantities with eager torch ops (the
specification, and the path on GPU, for half precision and wherever these kernels are not
available). On CPU with float32/float64 tensors they call these one-pass kernels instead:

- forward statistics without temporaries (:func:`colstats`), or the output together with the
  statistics when the scale is known before the batch (PN after warmup, :func:`affine_colstats`);
- the backward's column sums (:func:`bwd_sums`), or the input gradient together with them when
  its coefficients are known in advance (PN, :func:`bwd_apply`);
- the per-token group RMS scaling of the released code and its gradient
  (:func:`group_rms_forward`), alone or fused with the reference PN's statistics, output and
  gradient (:func:`grms_colstats`, :func:`grms_affine`, :func:`grms_backward`), so that the
  scaled input is never stored.

The C source (``kernels/pn_kernels.c``) is compiled on first use with the system C compiler
(``$CC``, else ``cc``; about one second; ``-march=native`` where the compiler accepts it) into
``$PN_KERNEL_CACHE`` (default ``~/.cache/powernorm-fairseq/kernels``), keyed by a hash of the
source and of the CPU's feature flags, and written atomically.
``PN_FUSED_KERNELS=0`` turns the kernels off; :func:`set_enabled` does the same in-process
(tests run both paths). Without a compiler the norms warn once and run eagerly.

Column sums are accumulated per thread in the input's dtype over blocks of 16 rows, then in
double, reduced in thread order and returned in the input's dtype, so results are deterministic
for a given ``torch.get_num_threads()``; they agree with the eager path to float rounding (closer
to float64 than the eager float32 GEMM sums). The kernels link the OpenMP runtime torch already
loaded (``libgomp.so.1``), so they share torch's thread pool instead of starting a second one.
"""

from __future__ import annotations

import torch
from torch import Tensor

# available, cache_dir, set_enabled and usable are re-exported: the norms, tests and benchmarks
# ask and switch the kernels here
from .kernel_lib import (  # noqa: F401
    _c,
    _check,
    _fn,
    _outputs,
    _ptr,
    _sums,
    available,
    cache_dir,
    set_enabled,
    usable,
)


def colstats(x: Tensor, keep: Tensor | None, shift: Tensor | None = None, *, s1: bool = False,
             s2all: bool = False):
    """Column sums over the real rows of ``d = x - shift`` in one read of ``x: (N, C)``.

    Returns ``(sum_real d or None, sum_real d^2, sum_all d^2 or None)``, each ``(C,)`` in
    ``x.dtype``. ``shift`` ``(C,)`` defaults to 0.
    """
    x, keep = _c(x), _c(keep)
    n, c = x.shape
    shift = x.new_zeros(c) if shift is None else shift.contiguous()
    o1, o2, oa = _sums(c, s1, x), _sums(c, True, x), _sums(c, s2all, x)
    _check(_fn("pn_colstats", x.dtype)(x.data_ptr(), _ptr(keep), shift.data_ptr(), n, c, _ptr(o1),
                                        _ptr(o2), _ptr(oa), torch.get_num_threads()))
    return o1, o2, oa


def affine_colstats(x: Tensor, keep: Tensor | None, scale: Tensor, bias: Tensor):
    """``y = x * scale + bias`` and the column sums of ``x^2`` over the real rows in one pass.
    Returns ``(y (N, C), sum_real x^2 (C,))``."""
    x, keep, scale, bias = _c(x), _c(keep), scale.contiguous(), bias.contiguous()
    n, c = x.shape
    y = torch.empty_like(x)
    o2 = _sums(c, True, x)
    _check(_fn("pn_affine_colstats", x.dtype)(x.data_ptr(), _ptr(keep), scale.data_ptr(),
                                               bias.data_ptr(), n, c, y.data_ptr(), o2.data_ptr(),
                                               torch.get_num_threads()))
    return y, o2


def bwd_sums(grad_y: Tensor, x: Tensor, keep: Tensor | None, *, masked: bool = False):
    """``(sum dL/dy, sum dL/dy * x, sum_real dL/dy * x or None)`` ``(C,)`` in one pass."""
    grad_y, x, keep = _c(grad_y), _c(x), _c(keep)
    n, c = x.shape
    og, ogx, om = _sums(c, True, x), _sums(c, True, x), _sums(c, masked, x)
    _check(_fn("pn_bwd_sums", x.dtype)(grad_y.data_ptr(), x.data_ptr(), _ptr(keep), n, c,
                                        og.data_ptr(), ogx.data_ptr(), _ptr(om),
                                        torch.get_num_threads()))
    return og, ogx, om


def bwd_apply(grad_y: Tensor, x: Tensor, a: Tensor, b: Tensor, c: Tensor | None = None, *,
              corr_keep: Tensor | None = None, sum_keep: Tensor | None = None,
              sums: bool = False):
    """``grad_x = dL/dy * a - m * (x * b + c)`` with ``m = corr_keep`` per row (1 if None).

    With ``sums`` the same pass also returns ``sum dL/dy``, ``sum dL/dy * x`` (all rows) and
    ``sum_{sum_keep} dL/dy * x`` (all rows if ``sum_keep`` is None). Returns
    ``(grad_x, sum_gy, sum_gyx, masked_sum_gyx)`` (the sums None without ``sums``).
    """
    grad_y, x = _c(grad_y), _c(x)
    corr_keep, sum_keep = _c(corr_keep), _c(sum_keep)
    n, ch = x.shape
    a, b = a.contiguous(), b.contiguous()
    c = x.new_zeros(ch) if c is None else c.contiguous()
    gx = torch.empty_like(x)
    og, ogx, om = (_sums(ch, sums, x) for _ in range(3))
    _check(_fn("pn_bwd_apply", x.dtype)(grad_y.data_ptr(), x.data_ptr(), a.data_ptr(),
                                         b.data_ptr(), c.data_ptr(), _ptr(corr_keep),
                                         _ptr(sum_keep), n, ch, gx.data_ptr(), _ptr(og),
                                         _ptr(ogx), _ptr(om), torch.get_num_threads()))
    return gx, og, ogx, om


def group_rms_forward(x: Tensor, group_num: int, eps: float) -> tuple[Tensor, Tensor]:
    """``y = x / sqrt(mean_group(x^2) + eps)`` per row; returns ``(y (N, C), rstd (N, G))``."""
    x = x.contiguous()
    n, c = x.shape
    y = torch.empty_like(x)
    rstd = x.new_empty(n, group_num)
    _check(_fn("pn_group_rms_fwd", x.dtype)(x.data_ptr(), n, c, group_num, float(eps),
                                             y.data_ptr(), rstd.data_ptr(),
                                             torch.get_num_threads()))
    return y, rstd


def group_rms_backward(grad_y: Tensor, x: Tensor, rstd: Tensor) -> Tensor:
    """Gradient of :func:`group_rms_forward`: ``gx = gy r - x r^3 mean_group(gy x)``."""
    grad_y, x = grad_y.contiguous(), x.contiguous()
    n, c = x.shape
    gx = torch.empty_like(x)
    _check(_fn("pn_group_rms_bwd", x.dtype)(grad_y.data_ptr(), x.data_ptr(), rstd.data_ptr(), n,
                                             c, rstd.shape[1], gx.data_ptr(),
                                             torch.get_num_threads()))
    return gx


def grms_colstats(x: Tensor, keep: Tensor | None, group_num: int, eps: float):
    """Group RMS scaling statistics without storing ``z = x * r``: returns
    ``(r (N, G), sum_real z^2 (C,), sum_all z^2 (C,))`` from one read of ``x: (N, C)``."""
    x, keep = _c(x), _c(keep)
    n, c = x.shape
    rstd = x.new_empty(n, group_num)
    o2, oa = _sums(c, True, x), _sums(c, True, x)
    _check(_fn("pn_grms_colstats", x.dtype)(x.data_ptr(), _ptr(keep), n, c, group_num,
                                             float(eps), rstd.data_ptr(), o2.data_ptr(),
                                             oa.data_ptr(), torch.get_num_threads()))
    return rstd, o2, oa


def grms_affine(x: Tensor, rstd: Tensor, scale: Tensor, bias: Tensor) -> Tensor:
    """``y = x * r[n, g] * scale + bias`` (one pass)."""
    x, rstd, scale, bias = x.contiguous(), rstd.contiguous(), scale.contiguous(), bias.contiguous()
    n, c = x.shape
    y = torch.empty_like(x)
    _check(_fn("pn_grms_affine", x.dtype)(x.data_ptr(), rstd.data_ptr(), scale.data_ptr(),
                                           bias.data_ptr(), n, c, rstd.shape[1], y.data_ptr(),
                                           torch.get_num_threads()))
    return y


def grms_backward(grad_y: Tensor, x: Tensor, rstd: Tensor, a: Tensor, b: Tensor):
    """Gradient through ``y = f(z)``, ``z = x * r`` with ``dL/dz = dL/dy * a - z * b`` and the
    group RMS scaling's exact gradient; returns ``(grad_x, sum dL/dy, sum dL/dy * z)``."""
    grad_y, x, rstd = grad_y.contiguous(), x.contiguous(), rstd.contiguous()
    a, b = a.contiguous(), b.contiguous()
    n, c = x.shape
    gx = torch.empty_like(x)
    og, oz = _sums(c, True, x), _sums(c, True, x)
    _check(_fn("pn_grms_bwd", x.dtype)(grad_y.data_ptr(), x.data_ptr(), rstd.data_ptr(),
                                        a.data_ptr(), b.data_ptr(), n, c, rstd.shape[1],
                                        gx.data_ptr(), og.data_ptr(), oz.data_ptr(),
                                        torch.get_num_threads()))
    return gx, og, oz


def paper_forward(x: Tensor, keep: Tensor | None, weight: Tensor, bias: Tensor, psi2: Tensor,
                  eps: float, alpha: float):
    """PN (Algorithm 2) past warmup, one training forward without sync, in one call: returns
    ``(y (N, C), rstd (C,), gamma (C,), count ())`` and advances the running ``psi2`` ``(C,)`` in
    place (``pn_paper_fwd`` in the C source states the arithmetic; it rounds as the eager path)."""
    x, keep = _c(x), _c(keep)
    n, c = x.shape
    y = torch.empty_like(x)
    (rstd, _, gamma, count), at = _outputs(x, c, c, c, 1)  # rstd, psi2_b, gamma, count
    _check(_fn("pn_paper_fwd", x.dtype)(x.data_ptr(), _ptr(keep), weight.data_ptr(), bias.data_ptr(),
                                         psi2.data_ptr(), n, c, float(eps), float(alpha),
                                         1.0 - float(alpha), y.data_ptr(), *at,
                                         torch.get_num_threads()))
    return y, rstd, gamma, count[0]


def paper_backward(grad_y: Tensor, x: Tensor, keep: Tensor | None, weight: Tensor, rstd: Tensor,
                   gamma: Tensor, nu: Tensor, count: Tensor, alpha_bkw: float, safeguard: bool,
                   need_bias: bool = True):
    """The backward of :func:`paper_forward` in one call: returns ``(grad_x, grad_weight,
    grad_bias or None)`` and advances ``nu`` ``(C,)`` in place (``pn_paper_bwd``)."""
    grad_y, x, keep = _c(grad_y), _c(x), _c(keep)
    n, c = x.shape
    gx = torch.empty_like(x)
    (gw, gb), at = _outputs(x, c, c)
    _check(_fn("pn_paper_bwd", x.dtype)(grad_y.data_ptr(), x.data_ptr(), _ptr(keep),
                                         weight.data_ptr(), rstd.data_ptr(), gamma.data_ptr(),
                                         nu.data_ptr(), count.data_ptr(), n, c,
                                         1.0 - float(alpha_bkw), int(bool(safeguard)),
                                         gx.data_ptr(), at[0], at[1] if need_bias else None,
                                         torch.get_num_threads()))
    return gx, gw, gb if need_bias else None


def reference_forward_stats(sum_sq: Tensor, keep: Tensor | None, n: int, weight: Tensor,
                            phi: Tensor, iters: Tensor, clock: int | None, warmup: int, eps: float,
                            alpha: float):
    """The released PN's forward statistics step without sync (``pn_ref_fwd_stats``; rounds as
    ``reference_running_step``): advances ``phi`` ``(C,)`` and ``iters`` ``(1,)`` long in place and
    returns ``(rstd_fwd, rstd_bwd, scale = rstd_fwd * weight, count (), num_all ())``."""
    c = sum_sq.shape[0]
    (rstd_fwd, rstd_bwd, scale, count, num_all), at = _outputs(sum_sq, c, c, c, 1, 1)
    _check(_fn("pn_ref_fwd_stats", sum_sq.dtype)(
        sum_sq.data_ptr(), _ptr(_c(keep)), n, c, weight.data_ptr(), phi.data_ptr(), iters.data_ptr(),
        -1 if clock is None else int(clock), int(warmup), float(eps), float(alpha),
        1.0 - float(alpha), *at))
    return rstd_fwd, rstd_bwd, scale, count[0], num_all[0]


def reference_group_forward(x: Tensor, keep: Tensor | None, group_num: int, group_eps: float,
                            weight: Tensor, bias: Tensor, phi: Tensor, iters: Tensor,
                            clock: int | None, warmup: int, eps: float, alpha: float):
    """``grms_colstats``, ``reference_forward_stats`` and ``grms_affine`` in one call without sync
    (``pn_ref_grms_fwd``; one pass over ``x`` past the warmup): advances ``phi`` and ``iters``,
    returns ``(y, group rstd (N, G), rstd_fwd, rstd_bwd, sum_all z^2, count, num_all)``."""
    x, keep = _c(x), _c(keep)
    n, c = x.shape
    y, rstd_g = torch.empty_like(x), x.new_empty(n, group_num)
    (rstd_fwd, rstd_bwd, _, _, s2all, count, num_all), at = _outputs(x, c, c, c, c, c, 1, 1)
    _check(_fn("pn_ref_grms_fwd", x.dtype)(
        x.data_ptr(), _ptr(keep), n, c, group_num, float(group_eps), weight.data_ptr(),
        bias.data_ptr(), phi.data_ptr(), iters.data_ptr(), -1 if clock is None else int(clock),
        int(warmup), float(eps), float(alpha), 1.0 - float(alpha), y.data_ptr(), rstd_g.data_ptr(),
        *at, torch.get_num_threads()))
    return y, rstd_g, rstd_fwd, rstd_bwd, s2all, count[0], num_all[0]


def reference_backward_coef(weight: Tensor, ema: Tensor, rstd_fwd: Tensor, rstd_bwd: Tensor,
                            alpha_bkw: float) -> tuple[Tensor, Tensor]:
    """``(weight * rstd_bwd, (1 - alpha_bkw) ema rstd_fwd rstd_bwd)`` ``(C,)`` in one call
    (``pn_ref_bwd_coef``; rounds as the eager ``_ema_coef``)."""
    c = weight.shape[0]
    (coef_a, coef_x), at = _outputs(weight, c, c)
    _check(_fn("pn_ref_bwd_coef", weight.dtype)(weight.data_ptr(), ema.data_ptr(),
                                                 rstd_fwd.data_ptr(), rstd_bwd.data_ptr(), c,
                                                 1.0 - float(alpha_bkw), *at))
    return coef_a, coef_x


def reference_backward_finish(sum_gyx: Tensor, weight: Tensor, rstd_fwd: Tensor, sum_sq_all: Tensor,
                              count: Tensor, num_all: Tensor, alpha_bkw: float, ema: Tensor,
                              num_unstable: Tensor) -> Tensor:
    """The released backward's end without sync (``pn_ref_bwd_finish``; rounds as the eager
    path): advances ``ema`` ``(C,)`` and ``num_unstable`` ``(1,)`` long in place, returns the weight
    gradient ``rstd_fwd * sum_gyx``."""
    c = sum_gyx.shape[0]
    grad_w = sum_gyx.new_empty(c)
    _check(_fn("pn_ref_bwd_finish", sum_gyx.dtype)(
        sum_gyx.data_ptr(), weight.data_ptr(), rstd_fwd.data_ptr(), sum_sq_all.data_ptr(),
        count.data_ptr(), num_all.data_ptr(), c, 1.0 - float(alpha_bkw), ema.data_ptr(),
        num_unstable.data_ptr(), grad_w.data_ptr()))
    return grad_w


def reference_group_backward(grad_y: Tensor, x: Tensor, rstd_g: Tensor, weight: Tensor, ema: Tensor,
                             rstd_fwd: Tensor, rstd_bwd: Tensor, sum_sq_all: Tensor, count: Tensor,
                             num_all: Tensor, alpha_bkw: float, num_unstable: Tensor):
    """The released PN's whole backward with GroupScaling, without sync, in one call
    (``pn_ref_grms_backward``: :func:`reference_backward_coef`, :func:`grms_backward` and
    :func:`reference_backward_finish` in turn, rounding as they do): advances ``ema`` and
    ``num_unstable`` in place, returns ``(grad_x, grad_weight, grad_bias)``."""
    grad_y, x = _c(grad_y), _c(x)
    n, c = x.shape
    gx = torch.empty_like(x)
    (gw, gb), at = _outputs(x, c, c)
    _check(_fn("pn_ref_grms_backward", x.dtype)(
        grad_y.data_ptr(), x.data_ptr(), rstd_g.data_ptr(), weight.data_ptr(), ema.data_ptr(),
        rstd_fwd.data_ptr(), rstd_bwd.data_ptr(), sum_sq_all.data_ptr(), count.data_ptr(),
        num_all.data_ptr(), n, c, rstd_g.shape[1], 1.0 - float(alpha_bkw), gx.data_ptr(), at[0],
        at[1], num_unstable.data_ptr(), torch.get_num_threads()))
    return gx, gw, gb


def dyt_forward(x: Tensor, alpha: Tensor, weight: Tensor, bias: Tensor) -> tuple[Tensor, Tensor]:
    """Dynamic Tanh's float32 forward in one pass (``pn_dyt_fwd``, its own vectorized tanh,
    within 1.3 ulp of the exact one): returns ``(y, t = tanh(alpha x))``, both ``(N, C)``."""
    x = _c(x)
    n, c = x.shape
    y, t = torch.empty_like(x), torch.empty_like(x)
    _check(_fn("pn_dyt_fwd", x.dtype)(x.data_ptr(), alpha.data_ptr(), weight.data_ptr(), bias.data_ptr(),
                                       n, c, y.data_ptr(), t.data_ptr(), torch.get_num_threads()))
    return y, t


def dyt_backward(grad_y: Tensor, x: Tensor, t: Tensor, alpha: Tensor, weight: Tensor):
    """Dynamic Tanh's backward in one pass (``pn_dyt_bwd``) from ``t = tanh(alpha x)``: returns
    ``(grad_x, grad_weight, grad_bias, grad_alpha (1,))``."""
    grad_y, x, t = _c(grad_y), _c(x), _c(t)
    n, c = x.shape
    gx = torch.empty_like(x)
    (gw, gb, ga), at = _outputs(x, c, c, 1)
    _check(_fn("pn_dyt_bwd", x.dtype)(grad_y.data_ptr(), x.data_ptr(), t.data_ptr(), alpha.data_ptr(),
                                       weight.data_ptr(), n, c, gx.data_ptr(), *at,
                                       torch.get_num_threads()))
    return gx, gw, gb, ga


def batch_forward_stats(x: Tensor, keep: Tensor | None, center: bool, eps: float, weight: Tensor,
                        bias: Tensor, gamma: bool, running: tuple[Tensor, ...] = (),
                        ema: tuple[float, float] = (1.0, 0.0)):
    """BN's (``center``) or PN-V's batch statistics without sync in one call
    (``pn_batch_fwd_stats``; rounds as ``batch_moments`` with the first real row as shift):
    returns ``(y (N, C), mean or None, var, rstd, gamma or None, count ())``, the vectors ``(C,)``,
    with ``y = shift_y + x * scale`` rounded as ``torch.addcmul``. With ``running`` (``(mean,
    var)`` with ``center``, ``(psi2,)`` without; contiguous, ``x``'s dtype) they advance in place
    as ``autograd.ema_running_`` with ``ema = (keep_w, add_w)``."""
    x, keep = _c(x), _c(keep)
    n, c = x.shape
    y = torch.empty_like(x)
    # mean, var, rstd, scale and shift_y (the kernel's, not returned), gamma, count
    (mean, var, rstd, _, _, gam, count), at = _outputs(x, c, c, c, c, c, c, 1)
    run_a, run_b = ([_ptr(t) for t in running] + [None, None])[:2]
    _check(_fn("pn_batch_fwd_stats", x.dtype)(
        x.data_ptr(), _ptr(keep), n, c, int(bool(center)), float(eps), weight.data_ptr(),
        bias.data_ptr(), at[0] if center else None, at[1], at[2], at[3], at[4],
        at[5] if gamma else None, at[6], y.data_ptr(), run_a, run_b, float(ema[0]), float(ema[1]),
        torch.get_num_threads()))
    return y, mean if center else None, var, rstd, gam if gamma else None, count[0]


def batch_backward(grad_y: Tensor, x: Tensor, keep: Tensor | None, weight: Tensor,
                   mean: Tensor | None, rstd: Tensor, count: Tensor, gamma: Tensor | None,
                   nu: Tensor | None, alpha_bkw: float, safeguard: bool, need_bias: bool = True):
    """The exact backward of :func:`batch_forward_stats` in one call (``pn_batch_bwd``):
    returns ``(grad_x, grad_weight, grad_bias or None)``; with ``nu`` (PN's warmup) advances it
    in place as ``update_nu_``."""
    grad_y, x, keep = _c(grad_y), _c(x), _c(keep)
    n, c = x.shape
    gx = torch.empty_like(x)
    (gw, gb), at = _outputs(x, c, c)
    _check(_fn("pn_batch_bwd", x.dtype)(
        grad_y.data_ptr(), x.data_ptr(), _ptr(keep), weight.data_ptr(), _ptr(mean),
        rstd.data_ptr(), count.data_ptr(), _ptr(gamma), _ptr(nu), n, c, 1.0 - float(alpha_bkw),
        int(bool(safeguard)), gx.data_ptr(), at[0], at[1] if need_bias else None,
        torch.get_num_threads()))
    return gx, gw, gb if need_bias else None
