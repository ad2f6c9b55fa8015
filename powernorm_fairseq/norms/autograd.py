"""The pieces of the batch-statistic norms shared by BN, PN-V and PN.

Masked batch moments (:func:`batch_moments`), the autograd Function with batch statistics and
their exact gradient (:class:`BatchStatNormFunction`: BN, PN-V, and PN during its warmup), PN's
backward-statistic update (:func:`update_nu_`), the pre-scaling eps and the argument checks of
the PN variants. Functions here take the tensors they read and return the statistics they
compute; no module state.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from . import fused
from .distributed import maybe_all_reduce
from .functional import (
    column_sum,
    column_sums,
    grad_times_x,
    token_count,
    zero_pads_,
)

#: eps of the per-token RMS pre-scaling (the released code's LayerScaling1D / GroupScaling1D).
PRESCALE_EPS = 1e-5


def _first_real_row(x2d: Tensor, keep: Tensor | None, count: Tensor) -> Tensor:
    """Row ``(C,)`` of the first real token (0 if there is none), without a host sync."""
    if x2d.shape[0] == 0:
        return x2d.new_zeros(x2d.shape[1])
    index = torch.zeros(1, dtype=torch.long, device=x2d.device) if keep is None \
        else keep.argmax().reshape(1)  # argmax returns the first maximum
    row = x2d.index_select(0, index)[0]
    return torch.where(count > 0, row, torch.zeros_like(row))


def batch_moments(x2d: Tensor, keep: Tensor | None, scratch: Tensor, *, center: bool,
                  shift: Tensor | None = None, sync: bool = False, process_group=None):
    """Per-channel statistics over the real tokens, all-reduced in one collective when ``sync``.

    With ``center``: mean and biased variance from the sums of ``d = x - K`` over the real
    tokens, ``mean = K + sum(d)/n``, ``var = sum(d^2)/n - (sum(d)/n)^2`` (the shifted-data
    algorithm). Its float32 cancellation grows with ``((mean - K) / std)^2``, so ``K`` must be
    close to the batch mean: ``shift`` if given, else the first real token of the batch (one
    sample, so ``|mean - K|`` is of the order of ``std``; and ``x - K`` is exact in floating
    point for ``x`` within a factor 2 of ``K``). A running mean is not a good ``K``: far from the
    batch mean on the first steps and after a shift of the data (float32 BN then collapsed its
    variance at mean/std = 1e3, issue #13). Under ``sync`` with the local ``K`` (different on
    every rank) the sums are moved to ``K = 0`` in float64 before the one all-reduce, where the
    cancellation costs ~1e-16 relative. Without ``center``: the quadratic mean
    ``psi_B^2 = mean(x^2)`` (returned as ``var``) and ``mean = None``.

    Pads never enter a statistic, also when they hold inf or NaN (see :func:`zero_pads_`).

    Args:
        x2d: ``(N, C)``; no gradient flows through the statistics here.
        keep: ``(N,)`` 1 = real token, or None.
        scratch: ``(N, C)`` buffer overwritten with temporaries (the caller reuses it).
        shift: ``(C,)`` the ``K`` above, the same on every rank; None = the first real token.

    Returns:
        ``(mean (C,) or None, var (C,), count ())``; ``count`` may be 0 (then var is 0, not NaN).
    """
    count = token_count(x2d, keep).reshape(1)
    local_shift = center and shift is None
    if local_shift:
        shift = _first_real_row(x2d, keep, count[0])
    if fused.usable(x2d, keep, shift):  # one read of x2d, no temporaries; pad rows skipped
        s1, s2, _ = fused.colstats(x2d, keep, shift if center else None, s1=center)
    elif center:
        zero_pads_(torch.sub(x2d, shift, out=scratch), keep)
        s1 = column_sum(scratch, None)
        scratch.mul_(scratch)
        s2 = column_sum(scratch, None)
    else:
        s1, s2 = None, column_sum(zero_pads_(torch.mul(x2d, x2d, out=scratch), keep), None)
    if center and sync and local_shift:
        f64 = torch.float64
        k, a, c = shift.to(f64), s1.to(f64), count.to(f64)
        # sum x = sum d + n K, sum x^2 = sum d^2 + K (2 sum d + n K)
        sx, sxx, c = maybe_all_reduce([a + c * k, s2.to(f64) + k * (2 * a + c * k), c], sync,
                                      process_group)
        n = c.clamp(min=1)
        mean = sx / n
        var = (sxx / n - mean * mean).clamp_min(0)
        return mean.to(x2d.dtype), var.to(x2d.dtype), c[0].to(x2d.dtype)
    if center:
        s1, s2, count = maybe_all_reduce([s1, s2, count], sync, process_group)
        n = count.clamp(min=1)
        d = s1 / n
        return shift + d, (s2 / n - d * d).clamp_min(0), count[0]
    s2, count = maybe_all_reduce([s2, count], sync, process_group)
    return None, s2 / count.clamp(min=1), count[0]


def update_nu_(nu: Tensor, weight: Tensor, rstd: Tensor, gamma: Tensor, count: Tensor,
               masked_sum_gyx: Tensor, alpha_bkw: float, safeguard: bool) -> None:
    r"""Advance PN's backward statistic ``nu`` in place (Algorithm 2, with the safeguard).

    .. math::
        \Lambda = \frac{w\, r}{n} \sum_j k_j \frac{\partial L}{\partial y_j} x_j, \quad
        \nu \leftarrow \nu + (1 - \alpha_{bkw}) (\Lambda - \nu\, \Gamma)

    with ``w`` the weight, ``r`` the forward's ``rstd`` and ``Gamma = gamma = psi_B^2 r^2``. With
    ``safeguard`` the step is scaled by ``1 / ((1 - alpha_bkw) Gamma)`` in the channels where that
    is ``>= 2`` (the recurrence would not contract there). Skipped for a batch without real
    tokens or a non-finite step.

    A backward cannot return a statistic to the module, so it writes into the buffer it was
    given (as ``F.batch_norm`` writes the running statistics it is given).

    Shape: nu, weight, rstd, gamma, masked_sum_gyx ``(C,)``; count ``()``.
    """
    one_minus_a = 1.0 - alpha_bkw
    with torch.no_grad():
        nu_c = nu.to(gamma.dtype)
        lam = weight * rstd * masked_sum_gyx / count.clamp(min=1)
        step = one_minus_a * (lam - nu_c * gamma)
        if safeguard:  # only where the recurrence would not contract
            w = one_minus_a * gamma
            step = step * torch.where(w >= 2, 1.0 / w, torch.ones_like(w))
        ok = (count > 0) & torch.isfinite(step)
        nu.copy_(torch.where(ok, nu_c + step, nu_c).to(nu.dtype))


def ema_running_(running: tuple[Tensor, ...], mean: Tensor | None, var: Tensor, count: Tensor,
                 ema: tuple[float, float]) -> None:
    r"""Advance running statistics in place from a batch's, per channel, where ``count > 0``:

    .. math:: s \leftarrow w_{keep}\, s + w_{add}\, s_B

    with ``ema = (w_keep, w_add)`` (BN and PN-V: ``(1 - momentum, momentum)``, the form of
    ``torch.nn.BatchNorm``; PN: ``(alpha_fwd, 1 - alpha_fwd)``). ``running = (mean, var)`` (BN)
    takes ``mean`` and the unbiased ``var * n / max(n - 1, 1)``; ``running = (psi2,)`` (PN-V,
    PN) takes ``var`` (the batch ``psi_B^2``) in the channels where it is finite. The fused
    forward (``pn_batch_fwd_stats``) does the same arithmetic, rounding as these operations.

    Shape: each buffer, mean, var ``(C,)``; count ``()``.
    """
    keep_w, add_w = ema
    with torch.no_grad():
        ok = count > 0
        if len(running) == 2:
            stats = (mean, var * (count / (count - 1).clamp(min=1)))
        else:
            stats, ok = (var,), ok & torch.isfinite(var)
        for buf, stat in zip(running, stats, strict=True):
            buf.copy_(torch.where(ok, keep_w * buf + add_w * stat.to(buf.dtype), buf))


class BatchStat(NamedTuple):
    """The non-differentiable arguments of :class:`BatchStatNormFunction`, in one object: autograd
    inspects every argument of ``Function.apply`` and every output it returns, which cost more per
    call than the arithmetic on small batches. See the Function for each field."""

    center: bool
    eps: float
    sync: bool = False
    process_group: object = None
    shift: Tensor | None = None
    nu: Tensor | None = None
    alpha_bkw: float = 0.0
    safeguard: bool = False
    running: tuple[Tensor, ...] = ()
    ema: tuple[float, float] = (1.0, 0.0)
    stats: list | None = None


class BatchStatNormFunction(torch.autograd.Function):
    r"""``y = (x - mean) * rstd * weight + bias`` with batch statistics and their exact gradient:
    ``BatchStatNormFunction.apply(x, weight, bias, keep, cfg)`` with ``cfg`` a :class:`BatchStat`.

    The forward computes ``mean`` (only with ``cfg.center``; PN-V has none) and ``var`` over the
    ``count`` real tokens (:func:`batch_moments`), ``rstd = 1/sqrt(var + eps)``, and writes ``y``
    into the statistics' scratch buffer. It returns ``y``; with a list ``cfg.stats`` it also
    appends the batch statistics ``(mean or None, var, count)`` to it. Pads are normalized too but
    do not enter the statistics. With ``g = weight * dL/dy`` and ``x_hat = (x - mean) * rstd`` the
    exact input gradient is

    .. math::
        \frac{\partial L}{\partial x_j} = r\,g_j - k_j \frac{r}{n}
            \Big(\sum_i g_i + \hat x_j \sum_i g_i \hat x_i\Big)

    (the first sum only with centering), ``k_j`` = 1 for real tokens, sums over ALL positions (pad
    outputs also depend on the statistics). With ``cfg.sync`` the correction sums are all-reduced
    in one collective over ``cfg.process_group``; parameter gradients stay local (DDP reduces them).

    ``cfg.nu`` (PN's warmup, without ``center``): the backward also computes the (synced) masked
    sum ``sum_j k_j dL/dy_j x_j`` ``(C,)`` and advances ``nu`` in place with :func:`update_nu_`
    (``cfg.alpha_bkw``, ``cfg.safeguard``), so PN's backward statistic is warm when PN takes over.

    ``cfg.running`` (the module's buffers, ``(mean, var)`` with ``center``, ``(psi2,)`` without, or
    empty): the forward advances them in place with :func:`ema_running_` (``cfg.ema``), as
    ``F.batch_norm`` writes the running statistics it is given; the fused kernel does it in the
    same call.

    Shape: x ``(N, C)``; weight, bias ``(C,)``; keep ``(N,)`` or None; ``cfg.shift`` ``(C,)`` or
    None (see :func:`batch_moments`); ``cfg.nu`` ``(C,)`` or None. Statistics: mean, var ``(C,)``,
    count ``()``.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, keep, cfg: BatchStat):
        ctx.cfg = cfg
        center, eps, running, ema = cfg.center, cfg.eps, cfg.running, cfg.ema
        if not cfg.sync and cfg.shift is None and fused.usable(x, keep, weight, bias):
            # the statistics, every (C,) step and the running update in one call, rounding as
            # the code below
            in_c = all(b.dtype == x.dtype and b.is_contiguous() for b in running)
            y, mean, var, rstd, ctx.gamma, count = fused.batch_forward_stats(
                x, keep, center, eps, weight, bias, gamma=cfg.nu is not None,
                running=running if in_c else (), ema=ema)
            if running and not in_c:
                ema_running_(running, mean, var, count, ema)
            ctx.save_for_backward(x, weight, keep, mean, rstd, count)
            if cfg.stats is not None:
                cfg.stats.extend((mean, var, count))
            return y
        y = torch.empty_like(x)
        mean, var, count = batch_moments(x, keep, y, center=center, shift=cfg.shift, sync=cfg.sync,
                                         process_group=cfg.process_group)
        rstd = torch.rsqrt(var + eps)
        if cfg.nu is not None:
            ctx.gamma = var * rstd * rstd  # Gamma = mean(x_hat^2) over the real tokens
        ctx.save_for_backward(x, weight, keep, mean, rstd, count)
        scale = rstd * weight
        torch.addcmul(bias if mean is None else bias - mean * scale, x, scale, out=y)
        if running:
            ema_running_(running, mean, var, count, ema)
        if cfg.stats is not None:
            cfg.stats.extend((mean, var, count))
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_y):
        x, weight, keep, mean, rstd, count = ctx.saved_tensors
        cfg = ctx.cfg
        nu = cfg.nu
        track_nu = nu is not None
        need = ctx.needs_input_grad
        if not cfg.sync and fused.usable(x, grad_y, keep, weight, rstd, count, nu):
            grad_x, grad_w, grad_b = fused.batch_backward(  # one call, rounding as below
                grad_y, x, keep, weight, mean, rstd, count, ctx.gamma if track_nu else None,
                nu, cfg.alpha_bkw, cfg.safeguard, need_bias=need[2])
            return grad_x, grad_w if need[1] else None, grad_b, None, None
        fast = fused.usable(x, grad_y, keep)
        if fast:  # the three sums in one read of grad_y and x
            sum_gy, sum_gyx, masked_gyx = fused.bwd_sums(grad_y, x, keep, masked=track_nu)
        else:
            sum_gy = column_sum(grad_y, None)
            # scratch for the sums first, then the gradient
            grad_x = grad_times_x(grad_y, x, keep, torch.empty_like(x))
            masked_gyx, sum_gyx = column_sums(grad_x, keep if track_nu else None)
        sums = [sum_gyx] if mean is None else [sum_gy, sum_gyx]
        if track_nu:
            sums.append(masked_gyx)
        sums = maybe_all_reduce(sums, cfg.sync, cfg.process_group)

        # sum_i dL/dy_i x_hat_i: locally (weight grad) and over all ranks (input grad)
        local_gyxhat = rstd * (sum_gyx if mean is None else sum_gyx - mean * sum_gy)
        g_xhat = weight * rstd * (sums[0] if mean is None else sums[1] - mean * sums[0])
        rn = rstd / count.clamp(min=1)
        coef_x = rn * rstd * g_xhat
        coef_0 = None if mean is None else rn * weight * sums[0] - coef_x * mean
        if fast:  # grad_x = dL/dy (weight rstd) - k (x coef_x + coef_0) in one pass
            grad_x = fused.bwd_apply(grad_y, x, weight * rstd, coef_x, coef_0, corr_keep=keep)[0]
        else:
            torch.mul(grad_y, weight * rstd, out=grad_x)
            if keep is None:
                grad_x.addcmul_(x, coef_x, value=-1)
                if coef_0 is not None:
                    grad_x.sub_(coef_0)
            else:
                correction = x * coef_x if coef_0 is None else torch.addcmul(coef_0, x, coef_x)
                grad_x.sub_(zero_pads_(correction, keep))  # not * keep: a pad x may be inf
        if track_nu:
            update_nu_(nu, weight, rstd, ctx.gamma, count, sums[-1], cfg.alpha_bkw,
                       cfg.safeguard)
        return grad_x, local_gyxhat if need[1] else None, sum_gy if need[2] else None, None, None


def check_alpha(name: str, value: float) -> None:
    """Raise ValueError naming ``name`` unless the EMA factor ``value`` is in [0, 1)."""
    if not 0.0 <= value < 1.0:
        raise ValueError(f"{name} must be in [0, 1), got {value}")


def check_group_num(num_features: int, group_num: int) -> None:
    """Raise ValueError unless ``group_num`` is an int >= 0 dividing ``num_features``."""
    if not isinstance(group_num, int) or group_num < 0:
        raise ValueError(f"group_num must be an int >= 0 (0 = no group scaling), got {group_num!r}")
    if group_num and num_features % group_num:
        raise ValueError(f"num_features={num_features} is not divisible by group_num={group_num}; "
                         "use a divisor of the channel count (e.g. the number of attention heads)")
