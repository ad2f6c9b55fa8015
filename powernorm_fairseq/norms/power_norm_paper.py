"""PN as in Algorithm 2 of the paper (``variant="paper"``).

Notation (per channel, docs/SPEC.md sections 1-3): ``psi_B^2 = mean(x^2)`` over the real tokens of
the batch, ``x_hat`` the normalized input, ``g = weight * dL/dy``,
``Gamma = mean(x_hat^2)`` and ``Lambda = mean(g * x_hat)`` over the real tokens.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from . import fused
from .autograd import (
    PRESCALE_EPS,
    BatchStat,
    BatchStatNormFunction,
    check_alpha,
    check_group_num,
    ema_running_,
    update_nu_,
)
from .base import MaskedNorm, group_num_option
from .defaults import (
    ALPHA_BKW,
    ALPHA_FWD,
    EPS,
    PAPER_GROUP_NUM,
    SAFEGUARD,
    WARMUP_UNIT,
    WARMUP_UNITS,
    WARMUP_UPDATES,
)
from .distributed import maybe_all_reduce
from .functional import (
    column_sum,
    column_sums,
    grad_times_x,
    group_rms_scale,
    token_count,
    zero_pads_,
)
from .registry import register_norm


def check_power_arguments(num_features: int, alpha_fwd: float, alpha_bkw: float, warmup_updates: int,
                          group_num: int, warmup_unit: str) -> None:
    """The arguments both PowerNorm variants take, checked once: a ``ValueError`` naming a bad one."""
    check_alpha("alpha_fwd", alpha_fwd)
    check_alpha("alpha_bkw", alpha_bkw)
    check_group_num(num_features, group_num)
    if warmup_updates < 0:
        raise ValueError(f"warmup_updates must be >= 0, got {warmup_updates}")
    if warmup_unit not in WARMUP_UNITS:
        raise ValueError(f"warmup_unit must be one of {', '.join(WARMUP_UNITS)}, got {warmup_unit!r}")


def power_options(options, num_heads: int, final: bool, auto_groups: int) -> dict:
    """The PowerNorm keywords both variants read: ``alpha_fwd`` / ``alpha_bkw``
    (``pn_alpha_fwd`` / ``pn_alpha_bkw``), ``warmup_updates`` (``pn_warmup_updates``, or
    ``pn_final_warmup_updates`` >= 0 at an output norm), ``warmup_unit`` (``pn_warmup_unit``),
    ``group_num`` (``pn_group_num``; -1 =
    ``auto_groups``, -2 = the heads)."""
    kwargs = {}
    for key, option, kind in (("alpha_fwd", "pn_alpha_fwd", float), ("alpha_bkw", "pn_alpha_bkw", float),
                              ("warmup_updates", "pn_warmup_updates", int), ("warmup_unit", "pn_warmup_unit", str)):
        if getattr(options, option, None) is not None:
            kwargs[key] = kind(getattr(options, option))
    final_warmup = getattr(options, "pn_final_warmup_updates", None)
    if final and final_warmup is not None and int(final_warmup) >= 0:
        kwargs["warmup_updates"] = int(final_warmup)
    if (groups := group_num_option(options, num_heads, auto_groups)) is not None:
        kwargs["group_num"] = groups
    return kwargs


class RunningPower(NamedTuple):
    """The non-differentiable arguments of :class:`RunningPowerFunction` in one object (autograd
    inspects every argument of ``Function.apply``): the module's ``psi2`` and ``nu`` buffers, its
    settings and the sync."""

    psi2: Tensor
    nu: Tensor
    eps: float
    alpha_fwd: float
    alpha_bkw: float
    safeguard: bool
    sync: bool = False
    process_group: object = None


class RunningPowerFunction(torch.autograd.Function):
    r"""PN (Algorithm 2) step with a running statistic: forward ``y = weight * x * rstd + bias``
    with ``rstd = 1/sqrt(psi^2_{t-1} + eps)`` from the running ``psi2`` it is given
    (``RunningPowerFunction.apply(x, weight, bias, keep, cfg)``, ``cfg`` a :class:`RunningPower`;
    the names below are its fields).

    The forward also computes the batch ``psi_B^2`` over the real tokens (all-reduced when
    ``sync``) and advances ``psi2`` in place (:func:`~.autograd.ema_running_` with ``alpha_fwd``), as
    ``F.batch_norm`` writes the running statistics it is given. Backward with ``nu_{t-1}`` = the
    ``nu`` tensor given (the module's buffer) at backward time:

    .. math::
        \tilde x = g - \nu_{t-1} \hat x, \quad
        \frac{\partial L}{\partial x} = \tilde x \cdot r, \quad
        \frac{\partial L}{\partial \gamma} = \sum \frac{\partial L}{\partial y} \hat x, \quad
        \frac{\partial L}{\partial \beta} = \sum \frac{\partial L}{\partial y}

    computed as ``grad_x = dL/dy * (weight r) - k * x * (nu r^2)`` with ``k`` = 1 for real tokens
    and 0 for pads: the ``nu`` correction stands for the gradient through the statistic, which
    pads do not enter, so a pad's input gradient is its own ``dL/dy * weight * r`` (exactly 0 when
    the loss does not depend on the pad's output). The masked sum ``sum_j k_j dL/dy_j x_j``
    ``(C,)`` (all-reduced when ``sync``) then advances ``nu`` in place
    (:func:`~powernorm_fairseq.norms.autograd.update_nu_` with ``alpha_bkw``, ``safeguard``).

    Without ``sync``, on the fused CPU kernels, each direction is one call
    (:func:`~powernorm_fairseq.norms.fused.paper_forward`, ``paper_backward``) that rounds as the
    eager operations below.

    Shape: x ``(N, C)``; weight, bias, psi2, nu ``(C,)``; keep ``(N,)`` or None.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, keep, cfg: RunningPower):
        ctx.cfg = cfg
        psi2, eps, sync, alpha_fwd = cfg.psi2, cfg.eps, cfg.sync, cfg.alpha_fwd
        if not sync and fused.usable(x, keep, weight, bias, psi2):  # one call, no (C,) ops
            y, rstd, ctx.gamma, count = fused.paper_forward(x, keep, weight, bias, psi2, eps,
                                                            alpha_fwd)
            ctx.save_for_backward(x, weight, keep, rstd, count)
            return y
        rstd = torch.rsqrt(psi2.to(x.dtype) + eps)
        count = token_count(x, keep).reshape(1)
        if fused.usable(x, keep, weight, bias, rstd):  # output and statistic in one pass
            y, sum_sq = fused.affine_colstats(x, keep, rstd * weight, bias)
        else:
            y = torch.mul(x, x)  # scratch for the statistic first, then the output
            sum_sq = column_sum(zero_pads_(y, keep), None)
            torch.addcmul(bias, x, rstd * weight, out=y)
        sum_sq, count = maybe_all_reduce([sum_sq, count], sync, cfg.process_group)
        count = count[0]
        psi2_b = sum_sq / count.clamp(min=1)
        ctx.gamma = psi2_b * rstd * rstd  # Gamma = mean(x_hat^2) over the real tokens
        ema_running_((psi2,), None, psi2_b, count, (alpha_fwd, 1.0 - alpha_fwd))
        ctx.save_for_backward(x, weight, keep, rstd, count)
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_y):
        x, weight, keep, rstd, count = ctx.saved_tensors
        cfg, need = ctx.cfg, ctx.needs_input_grad
        if not cfg.sync and fused.usable(x, grad_y, keep, weight, cfg.nu, count):  # one call
            grad_x, grad_w, grad_b = fused.paper_backward(
                grad_y, x, keep, weight, rstd, ctx.gamma, cfg.nu, count, cfg.alpha_bkw,
                cfg.safeguard, need_bias=need[2])
            return grad_x, grad_w if need[1] else None, grad_b, None, None
        coef_x = cfg.nu.to(x.dtype) * rstd * rstd
        if fused.usable(x, grad_y, keep, weight):  # gradient and its sums in one pass
            grad_x, sum_gy, sum_gyx, masked_gyx = fused.bwd_apply(
                grad_y, x, weight * rstd, coef_x, corr_keep=keep, sum_keep=keep, sums=True)
        else:
            # scratch for the sums first, then the gradient
            grad_x = grad_times_x(grad_y, x, keep, torch.empty_like(x))
            masked_gyx, sum_gyx = column_sums(grad_x, keep)
            torch.mul(grad_y, weight * rstd, out=grad_x)
            if keep is None:
                grad_x.addcmul_(x, coef_x, value=-1)
            else:  # pads get no correction (their loss gradient is 0; x there may be non-finite)
                grad_x.sub_(zero_pads_(x * coef_x, keep))
            sum_gy = column_sum(grad_y, None) if need[2] else None
        update_nu_(cfg.nu, weight, rstd, ctx.gamma, count,
                   maybe_all_reduce([masked_gyx], cfg.sync, cfg.process_group)[0],
                   cfg.alpha_bkw, cfg.safeguard)
        return (grad_x, rstd * sum_gyx if need[1] else None, sum_gy if need[2] else None,
                None, None)


@register_norm("power", variant="paper", default=True, variant_option="pn_variant")
class PowerNormPaper(MaskedNorm):
    r"""PN as in Algorithm 2 of the paper (``variant="paper"``), per channel.

    Training step ``t`` (running ``psi^2`` init 1, ``nu`` init 0; ``n`` real tokens):

    - forward: ``x_hat = x / sqrt(psi^2_{t-1} + eps)``, ``y = weight * x_hat + bias``, then
      ``psi^2_t = alpha_fwd psi^2_{t-1} + (1 - alpha_fwd) psi_B^2`` with ``psi_B^2 = mean(x^2)``
      over the real tokens.
    - backward: ``g = weight * dL/dy``, ``x_tilde = g - nu_{t-1} x_hat`` at real tokens and
      ``x_tilde = g`` at pads (pads do not enter ``psi_B^2``, so no statistic's gradient reaches
      them: with the loss independent of pads their input gradient is exactly 0),
      ``dL/dx = x_tilde / sqrt(psi^2_{t-1} + eps)``, and
      ``nu_t = nu_{t-1} + (1 - alpha_bkw) mean(x_tilde * x_hat)`` (mean over the real tokens),
      i.e. ``nu_t = nu_{t-1} (1 - w) + (1 - alpha_bkw) Lambda`` with ``w = (1 - alpha_bkw) Gamma``.
      ``dL/dweight = sum(dL/dy * x_hat)``, ``dL/dbias = sum(dL/dy)`` over all positions.

    Eval: ``y = weight * x / sqrt(psi^2 + eps) + bias`` (:meth:`eval_affine`).

    Warmup: while ``num_updates < warmup_updates`` the layer runs PN-V (batch ``psi_B^2`` forward,
    exact gradient, :class:`PowerNormV`); ``psi^2`` is still updated by the EMA above and ``nu`` by
    the same recurrence (with the batch ``x_hat``), so both are warm when PN takes over. Warmup is
    counted in optimizer updates as told by :meth:`set_num_updates`, which fairseq calls on every
    module, so gradient accumulation does not shorten it. Plain-torch users with
    ``warmup_updates > 0`` call ``powernorm_fairseq.norms.set_num_updates(model, step)`` after each
    optimizer step (a norm never told one warns once after 100 training forwards), or build with
    ``warmup_unit="forwards"``: then every training forward call counts, the released code's unit.

    Safeguard (a deviation that acts only where Algorithm 2 would break down): the ``nu``
    recurrence contracts while ``|1 - w| < 1``, i.e. ``0 < w < 2``, and amplifies ``nu`` for
    ``w >= 2``. With ``safeguard=True`` (default), in a step and channel with ``w >= 2`` (and only
    there) the increment is scaled by ``1/w``, so that ``nu_t = Lambda / Gamma``, the fixed point
    of the recurrence; every step with ``w < 2`` is Algorithm 2's. ``safeguard=False`` never
    changes the step. Independently of ``safeguard``, an update of ``psi^2`` or ``nu`` with a
    non-finite batch statistic, or from a batch without real tokens, is skipped (the buffer
    keeps its value).

    Args:
        num_features: ``C``.
        eps: Default: 1e-5.
        alpha_fwd: EMA factor of ``psi^2``. Default: 0.9.
        alpha_bkw: EMA factor of ``nu``. Default: 0.9.
        warmup_updates: optimizer updates (``warmup_unit``) of PN-V before PN. Default: 0.
        warmup_unit: ``"updates"`` (told by :meth:`set_num_updates`) or ``"forwards"`` (training
            forward calls, the released code's count). Default: ``"updates"``.
        group_num: per-token RMS pre-scaling in ``group_num`` channel groups (the released code's
            GroupScaling, eps 1e-5, also at eval); 0 = off. Default: 0.
        safeguard: scale the ``nu`` step by ``1/w`` where ``w >= 2``, as described above.
            Default: True.
        affine, sync_stats, process_group, device, dtype: see
            :class:`~powernorm_fairseq.norms.base.MaskedNorm`. With ``sync_stats`` the forward
            ``psi_B^2`` and the backward ``Lambda`` are all-reduced (one collective each).

    Buffers: ``running_psi2`` ``(C,)``, ``nu`` ``(C,)``, ``num_updates`` ``(1,)`` long.

    Shape:
        - x: ``(T, B, C)`` or ``(N, C)``; padding_mask: ``(B, T)`` bool, True = pad, or None.
        - output: same as ``x``.

    Example::

        >>> norm = PowerNormPaper(512, warmup_updates=100)
        >>> for step in range(3):
        ...     norm.set_num_updates(step)
        ...     norm(torch.randn(7, 3, 512)).sum().backward()
    """

    _host_state = ("_num_updates_host",)

    def __init__(self, num_features: int, eps: float = EPS, alpha_fwd: float = ALPHA_FWD,
                 alpha_bkw: float = ALPHA_BKW, warmup_updates: int = WARMUP_UPDATES,
                 group_num: int = PAPER_GROUP_NUM, safeguard: bool = SAFEGUARD, affine: bool = True, sync_stats: bool = False,
                 process_group=None, device=None, dtype=None, batch_first: bool = False, warmup_unit: str = WARMUP_UNIT):
        super().__init__(num_features, eps, affine, sync_stats, process_group, device, dtype,
                         batch_first=batch_first)
        check_power_arguments(num_features, alpha_fwd, alpha_bkw, warmup_updates, group_num, warmup_unit)
        self.alpha_fwd, self.alpha_bkw = alpha_fwd, alpha_bkw
        self.warmup_updates, self.group_num, self.safeguard = warmup_updates, group_num, safeguard
        self.warmup_unit = warmup_unit
        factory = {"device": device, "dtype": dtype}
        self.register_buffer("running_psi2", torch.ones(num_features, **factory))
        self.register_buffer("nu", torch.zeros(num_features, **factory))
        self.register_buffer("num_updates", torch.zeros(1, dtype=torch.long, device=device))
        # host copy of num_updates: choosing warmup vs PN must not sync with the device
        self._num_updates_host = 0
        self.reset_parameters()

    @classmethod
    def from_options(cls, options, *, num_heads: int = 1, final: bool = False) -> dict:
        """:func:`power_options` (no GroupScaling unless ``pn_group_num`` asks) and ``sync_stats``."""
        return {**super().from_options(options, num_heads=num_heads, final=final),
                **power_options(options, num_heads, final, auto_groups=PAPER_GROUP_NUM)}

    def prescale_groups(self) -> int:
        return self.group_num

    def running_statistics(self) -> dict[str, Tensor]:
        return {"psi2": self.running_psi2.detach()}

    def backward_nu(self) -> Tensor:
        return self.nu.detach().reshape(-1).float()

    def reset_running_stats(self) -> None:
        self.running_psi2.fill_(1.0)
        self.nu.zero_()
        self.num_updates.zero_()
        self._num_updates_host = 0

    def set_num_updates(self, num_updates: int) -> None:
        self._told = True
        if self.warmup_unit == "updates":  # with "forwards" the layer counts its own calls
            self.num_updates.fill_(num_updates)
            self._num_updates_host = int(num_updates)

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}, variant=paper, alpha_fwd={self.alpha_fwd}, "
                f"alpha_bkw={self.alpha_bkw}, warmup_updates={self.warmup_updates}, "
                f"group_num={self.group_num}, safeguard={self.safeguard}"
                + (f", warmup_unit={self.warmup_unit}" if self.warmup_unit != WARMUP_UNIT else ""))

    @torch.no_grad()
    def eval_affine(self) -> tuple[Tensor, Tensor]:
        weight, bias = self._affine_or_identity(self.running_psi2.dtype)
        return weight * torch.rsqrt(self.running_psi2 + self.eps), bias.clone()

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        self._num_updates_host = int(self.num_updates[0])

    def _normalize(self, x2d: Tensor, keep: Tensor | None) -> Tensor:
        if self.group_num:
            x2d = group_rms_scale(x2d, self.group_num, PRESCALE_EPS)
        weight, bias = self._affine_or_identity(x2d.dtype)
        if not self.training:
            psi2 = self.running_psi2.to(x2d.dtype)
            return torch.addcmul(bias, x2d, weight * torch.rsqrt(psi2 + self.eps))
        sync = self._sync()
        warming = self._num_updates_host < self.warmup_updates
        if self.warmup_unit == "forwards":  # this call counts (the recomputation restores it)
            self._num_updates_host += 1
            self.num_updates.fill_(self._num_updates_host)
        elif warming:
            self._check_warmup_clock()
        if not warming:  # the Function advances running_psi2 itself
            return RunningPowerFunction.apply(x2d, weight, bias, keep, RunningPower(
                self.running_psi2, self.nu, self.eps, self.alpha_fwd, self.alpha_bkw,
                self.safeguard, sync, self.process_group))
        return BatchStatNormFunction.apply(  # advances running_psi2 too (ema_running_)
            x2d, weight, bias, keep, BatchStat(
                False, self.eps, sync, self.process_group, nu=self.nu, alpha_bkw=self.alpha_bkw,
                safeguard=self.safeguard, running=(self.running_psi2,),
                ema=(self.alpha_fwd, 1.0 - self.alpha_fwd)))
