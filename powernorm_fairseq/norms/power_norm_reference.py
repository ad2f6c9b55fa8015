"""PN as in the released code's ``MaskPowerNorm`` (``variant="reference"``), number for number.

Notation as in :mod:`~powernorm_fairseq.norms.power_norm_paper`; the deviations D1-D7 from
Algorithm 2 are listed in :class:`PowerNormReference` (docs/SPEC.md section 3).
"""

from __future__ import annotations

import warnings
from typing import NamedTuple

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from . import fused
from .autograd import PRESCALE_EPS
from .base import MaskedNorm
from .defaults import (
    ALPHA_BKW,
    ALPHA_FWD,
    EPS,
    REFERENCE_GROUP_NUM,
    WARMUP_UNIT,
    WARMUP_UPDATES,
)
from .distributed import maybe_all_reduce
from .functional import column_sum, group_rms_scale, token_count, zero_pads_
from .power_norm_paper import check_power_arguments, power_options
from .registry import register_norm


class ReferenceConfig(NamedTuple):
    """The hyperparameters of one released PN step (see :class:`PowerNormReference`)."""

    eps: float
    alpha_fwd: float
    alpha_bkw: float
    warmup_updates: int
    group_num: int
    #: the warmup's clock: None = the forward calls (``t``, released), else the optimizer update
    #: being computed (``num_updates + 1``, told by ``set_num_updates``)
    clock: int | None = None


class ReferenceStep(NamedTuple):
    """Everything but the tensors autograd differentiates that one released PN step takes, in one
    object (autograd inspects every argument of ``Function.apply``): the hyperparameters, the
    module's buffers the step advances in place (``phi`` ``(C,)``, ``iters`` and ``num_unstable``
    ``(1,)`` long, ``ema_gz`` ``C`` elements) and the sync."""

    cfg: ReferenceConfig
    phi: Tensor
    iters: Tensor
    ema_gz: Tensor
    num_unstable: Tensor
    sync: bool = False
    process_group: object = None


def reference_running_step(phi: Tensor, iters: Tensor, psi2_b: Tensor, count: Tensor,
                           cfg: ReferenceConfig) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    r"""One released forward statistics step (D1, D3), as tensor ops (no host sync).

    With ``t = iters + 1`` and the warmup clock ``w = t`` (``cfg.clock`` when the warmup counts
    optimizer updates): ``rstd_bwd = 1/sqrt(psi_B^2 + eps)``, ``rstd_fwd = rstd_bwd`` while
    ``w <= warmup_updates``, else ``1/sqrt(phi + eps)``; the new running statistic is
    ``alpha_fwd phi' + (1 - alpha_fwd) psi_B^2`` with ``phi' = phi (t-1)/t + psi_B^2/t`` while
    ``w < warmup_updates``, else ``phi' = phi`` (unchanged for a batch without real tokens).

    Shape: phi, psi2_b ``(C,)``; iters ``(1,)`` long; count ``()``.

    Returns:
        ``(rstd_fwd, rstd_bwd, new_phi, new_iters)``: the divisors ``(C,)`` in ``psi2_b``'s dtype
        and the advanced ``phi`` (``phi``'s dtype) and ``iters``, for the module to store.
    """
    new_iters = iters + 1
    phi_c = phi.to(psi2_b.dtype)
    t = new_iters.to(psi2_b.dtype)
    rstd_bwd = torch.rsqrt(psi2_b + cfg.eps)
    w = t if cfg.clock is None else torch.full_like(t, cfg.clock)
    rstd_fwd = torch.where(w <= cfg.warmup_updates, rstd_bwd, torch.rsqrt(phi_c + cfg.eps))
    cumulative = torch.where(w < cfg.warmup_updates, phi_c * (t - 1) / t + psi2_b / t, phi_c)
    new = cfg.alpha_fwd * cumulative + (1.0 - cfg.alpha_fwd) * psi2_b
    new_phi = torch.where(count > 0, new, phi_c).to(phi.dtype)
    return rstd_fwd, rstd_bwd, new_phi, new_iters


def _keep_for_backward(ctx, step: ReferenceStep) -> None:
    ctx.ema_gz, ctx.num_unstable, ctx.alpha_bkw = step.ema_gz, step.num_unstable, step.cfg.alpha_bkw
    ctx.sync, ctx.process_group = step.sync, step.process_group


def _reference_forward_stats(ctx, x, keep, sum_sq, sum_sq_all, weight, step: ReferenceStep):
    """The released forward statistics from the column sums of the (scaled) input squared over
    the real tokens (``sum_sq``) and over all positions (``sum_sq_all``), all-reduced with the
    counts when ``sync``: advances ``phi`` and ``iters`` in place (:func:`reference_running_step`,
    as ``F.batch_norm`` writes the running statistics it is given) and keeps on ``ctx`` what the
    backward needs besides the saved tensors. Without ``sync``, on the fused CPU kernels, one
    call that rounds as the eager path. Returns
    ``(rstd_fwd, rstd_bwd, scale = rstd_fwd * weight, sum_sq_all, num_all, count)``."""
    _keep_for_backward(ctx, step)
    cfg, phi, iters, sync = step.cfg, step.phi, step.iters, step.sync
    if not sync and fused.usable(sum_sq, keep, weight, phi):
        rstd_fwd, rstd_bwd, scale, count, num_all = fused.reference_forward_stats(
            sum_sq, keep, x.shape[0], weight, phi, iters, cfg.clock, cfg.warmup_updates, cfg.eps,
            cfg.alpha_fwd)
        return rstd_fwd, rstd_bwd, scale, sum_sq_all, num_all, count
    count = token_count(x, keep).reshape(1)
    num_all = torch.full((1,), x.shape[0], dtype=x.dtype, device=x.device)
    sum_sq, sum_sq_all, count, num_all = maybe_all_reduce(
        [sum_sq, sum_sq_all, count, num_all], sync, step.process_group)
    count, num_all = count[0], num_all[0]
    rstd_fwd, rstd_bwd, new_phi, new_iters = reference_running_step(
        phi, iters, sum_sq / count.clamp(min=1), count, cfg)
    with torch.no_grad():
        phi.copy_(new_phi)
        iters.copy_(new_iters)
    return rstd_fwd, rstd_bwd, rstd_fwd * weight, sum_sq_all, num_all, count


def _reference_backward_coef(ctx, weight: Tensor, rstd_fwd: Tensor, rstd_bwd: Tensor):
    """The released backward's coefficients ``(weight rstd_bwd, (1 - alpha_bkw) ema_gz rstd_fwd
    rstd_bwd)`` ``(C,)``: ``dL/dz = dL/dy * a - z * coef_x`` (one fused call where it applies)."""
    ema = ctx.ema_gz.view(-1)
    if fused.usable(weight, ema, rstd_fwd, rstd_bwd):
        return fused.reference_backward_coef(weight, ema, rstd_fwd, rstd_bwd, ctx.alpha_bkw)
    ema = ema.to(rstd_fwd.dtype)
    return weight * rstd_bwd, (1.0 - ctx.alpha_bkw) * ema * rstd_fwd * rstd_bwd


def _reference_backward_finish(ctx, grad_x, sum_gy, sum_gyx, weight, rstd_fwd, sum_sq_all,
                               num_all, count):
    """Shared end of the released backward: the ``ema_gz`` update (mean over all positions, D5)
    from ``sum_gyx = sum dL/dy * x`` (all-reduced when ``sync``; ``x`` the PN input) and the
    instability count, both in place in the buffers the forward was given (a backward cannot
    return them to the module), and the gradients to return."""
    need = ctx.needs_input_grad
    ema = ctx.ema_gz.view(-1)
    if not ctx.sync and fused.usable(sum_gyx, weight, rstd_fwd, sum_sq_all, ema, count):
        grad_w = fused.reference_backward_finish(sum_gyx, weight, rstd_fwd, sum_sq_all, count,
                                                 num_all, ctx.alpha_bkw, ema, ctx.num_unstable)
        return grad_x, grad_w if need[1] else None, sum_gy if need[2] else None, None, None
    (total_gyx,) = maybe_all_reduce([sum_gyx], ctx.sync, ctx.process_group)
    c = 1.0 - ctx.alpha_bkw
    ema_c = ema.to(total_gyx.dtype)
    n_all = num_all.clamp(min=1)
    gamma_all = rstd_fwd * rstd_fwd * sum_sq_all / n_all
    new = ema_c + weight * rstd_fwd * total_gyx / n_all - c * ema_c * gamma_all
    ema.copy_(torch.where(count > 0, new, ema_c).to(ema.dtype))
    unstable = (count > 0) & ((c * gamma_all >= 2).any() | ~torch.isfinite(new).all())
    ctx.num_unstable.add_(unstable.to(ctx.num_unstable.dtype))
    return grad_x, rstd_fwd * sum_gyx if need[1] else None, sum_gy if need[2] else None, None, None


class ReferencePowerFunction(torch.autograd.Function):
    r"""The released ``PowerFunction`` step: ``y = weight * x * rstd_fwd + bias``.

    Backward (docs/SPEC.md section 3, L85-94), with ``z = x * rstd_fwd``, ``c = 1 - alpha_bkw`` and
    ``E`` the ``ema_gz`` buffer:

    - ``approx = g - c E z``; ``dL/dx = approx * rstd_bwd`` with ``rstd_bwd`` the BATCH statistic
      (D2); computed as ``dL/dy * (weight rstd_bwd) - x * (c E rstd_fwd rstd_bwd)``.
    - ``E += mean(approx * z)`` over ALL ``T*B`` positions, pads included (D5):
      ``(weight rstd_fwd sum(dL/dy x) - c E rstd_fwd^2 sum(x^2)) / (T*B)``; skipped when the batch
      has no real token. So an inf or NaN at a pad makes ``E`` (and the later gradients)
      non-finite, as in the released code; ``running_phi`` (real tokens only) stays clean.
      ``num_unstable += 1`` when ``c * mean(z^2) >= 2`` for some channel (the recurrence then
      amplifies ``E``; below 2 it contracts, as in the paper variant) or ``E`` became non-finite
      (batches without real tokens are not counted); no safeguard otherwise. Both are updated
      in place in the ``ema_gz`` and ``num_unstable`` tensors given.
    - ``dL/dweight = sum(dL/dy z)``, ``dL/dbias = sum(dL/dy)``.

    The forward computes ``psi_B^2`` over the real tokens and ``sum(x^2)`` over all positions
    from one read of ``x^2`` (all-reduced with the counts when ``sync``), takes the divisors
    ``(rstd_fwd, rstd_bwd)`` from :func:`reference_running_step` on ``phi`` and ``iters``,
    advances both in place (D1, D3) and returns ``y``.

    Called as ``apply(x, weight, bias, keep, step)`` with ``step`` a :class:`ReferenceStep` (the
    configuration ``cfg``, the buffers ``phi``, ``iters``, ``ema_gz``, ``num_unstable``, and
    ``sync``, ``process_group``). Shape: x ``(N, C)``; weight, bias, phi ``(C,)``; keep ``(N,)``
    or None; iters, num_unstable ``(1,)`` long; ema_gz ``C`` elements.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, keep, step: ReferenceStep):
        if fused.usable(x, keep):  # both sums from one read of x, no temporary
            _, sum_sq, sum_sq_all = fused.colstats(x, keep, s2all=True)
        else:  # pads enter sum_sq_all (D5), not sum_sq, also when they are inf or NaN
            sq = torch.mul(x, x)
            sum_sq_all = column_sum(sq, None)
            sum_sq = sum_sq_all if keep is None else column_sum(zero_pads_(sq, keep), None)
        rstd_fwd, rstd_bwd, scale, sum_sq_all, num_all, count = _reference_forward_stats(
            ctx, x, keep, sum_sq, sum_sq_all, weight, step)
        ctx.save_for_backward(x, weight, rstd_fwd, rstd_bwd, sum_sq_all, num_all, count)
        return torch.addcmul(bias, x, scale)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_y):
        x, weight, rstd_fwd, rstd_bwd, sum_sq_all, num_all, count = ctx.saved_tensors
        coef_a, coef_x = _reference_backward_coef(ctx, weight, rstd_fwd, rstd_bwd)
        if fused.usable(x, grad_y, weight):  # gradient and its sums in one pass
            grad_x, sum_gy, sum_gyx, _ = fused.bwd_apply(grad_y, x, coef_a, coef_x, sums=True)
        else:
            grad_x = torch.mul(grad_y, x)  # scratch for the sum first, then the gradient
            sum_gyx = column_sum(grad_x, None)
            torch.mul(grad_y, coef_a, out=grad_x)
            grad_x.addcmul_(x, coef_x, value=-1)
            sum_gy = column_sum(grad_y, None) if ctx.needs_input_grad[2] else None
        return _reference_backward_finish(ctx, grad_x, sum_gy, sum_gyx, weight, rstd_fwd,
                                          sum_sq_all, num_all, count)


class ReferenceGroupPowerFunction(torch.autograd.Function):
    r""":class:`ReferencePowerFunction` applied to the group-RMS-scaled input
    ``z = x * r``, ``r = 1/sqrt(mean_group(x^2) + 1e-5)`` per token and ``cfg.group_num``
    groups, as one Function on the fused CPU kernels (``fused.grms_*``): ``z`` is never stored
    (recomputed from ``x`` and ``r`` in the backward). The backward takes one pass over
    ``(N, C)``; so does the forward past the warmup, where the divisor comes from ``phi`` before
    the batch (without ``sync``: :func:`~.fused.reference_group_forward`, one call), two in the
    warmup. Same arithmetic, arguments and outputs as
    ``ReferencePowerFunction.apply(group_rms_scale(x), ...)``, which is the path wherever the
    kernels are unavailable.

    Shape: as :class:`ReferencePowerFunction`.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, keep, step: ReferenceStep):
        cfg = step.cfg
        if not step.sync and fused.usable(x, keep, weight, bias, step.phi):
            _keep_for_backward(ctx, step)
            y, rstd_g, rstd_fwd, rstd_bwd, sum_sq_all, count, num_all = fused.reference_group_forward(
                x, keep, cfg.group_num, PRESCALE_EPS, weight, bias, step.phi, step.iters,
                cfg.clock, cfg.warmup_updates, cfg.eps, cfg.alpha_fwd)
            ctx.save_for_backward(x, rstd_g, weight, rstd_fwd, rstd_bwd, sum_sq_all, num_all, count)
            return y
        rstd_g, sum_sq, sum_sq_all = fused.grms_colstats(x, keep, cfg.group_num, PRESCALE_EPS)
        rstd_fwd, rstd_bwd, scale, sum_sq_all, num_all, count = _reference_forward_stats(
            ctx, x, keep, sum_sq, sum_sq_all, weight, step)
        ctx.save_for_backward(x, rstd_g, weight, rstd_fwd, rstd_bwd, sum_sq_all, num_all, count)
        return fused.grms_affine(x, rstd_g, scale, bias)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_y):
        x, rstd_g, weight, rstd_fwd, rstd_bwd, sum_sq_all, num_all, count = ctx.saved_tensors
        ema = ctx.ema_gz.view(-1)
        if not ctx.sync and fused.usable(grad_y, x, rstd_g, weight, ema, rstd_fwd, sum_sq_all, count):
            grad_x, grad_w, grad_b = fused.reference_group_backward(  # one call, rounding as below
                grad_y, x, rstd_g, weight, ema, rstd_fwd, rstd_bwd, sum_sq_all, count, num_all,
                ctx.alpha_bkw, ctx.num_unstable)
            need = ctx.needs_input_grad
            return grad_x, grad_w if need[1] else None, grad_b if need[2] else None, None, None
        coef_a, coef_x = _reference_backward_coef(ctx, weight, rstd_fwd, rstd_bwd)
        grad_x, sum_gy, sum_gyz = fused.grms_backward(grad_y, x, rstd_g, coef_a, coef_x)
        return _reference_backward_finish(ctx, grad_x, sum_gy, sum_gyz, weight, rstd_fwd,
                                          sum_sq_all, num_all, count)


@register_norm("power", variant="reference")
class PowerNormReference(MaskedNorm):
    r"""PN as in the released ``MaskPowerNorm`` (``variant="reference"``), number for number.

    Deviations from Algorithm 2 it reproduces (docs/SPEC.md section 3):

    - D4: per-token group RMS pre-scaling ``x / sqrt(mean_group(x^2) + 1e-5)`` in ``group_num``
      groups (1 = all channels), before everything else, also at eval; gradients flow through it
      by ordinary autograd. ``group_num=0`` turns it off.
    - D1: for ``iters <= warmup_updates`` the forward uses the batch ``psi_B^2`` (PN-V forward),
      afterwards the running ``running_phi``.
    - D3: for ``iters < warmup_updates`` the running statistic first takes a cumulative mean
      ``phi <- phi (t-1)/t + psi_B^2/t`` and then, always, the EMA
      ``phi <- alpha_fwd phi + (1-alpha_fwd) psi_B^2``.
    - D2: the backward divides by the batch ``sqrt(psi_B^2 + eps)``, also after warmup.
    - D6: the backward is the ``ema_gz`` approximation from the first step (see
      :class:`ReferencePowerFunction`); ``ema_gz = nu / (1 - alpha_bkw)`` in Algorithm 2's terms.
    - D5: ``ema_gz`` is updated with a mean over all ``T*B`` positions, pads included, while
      ``psi_B^2`` excludes pads; and the correction ``- c E z rstd_bwd`` of the input gradient is
      applied at every position, so pads receive a gradient even when the loss ignores them
      (which attention then carries into the parameters; the paper variant gives pads none).
    - D7: no cross-rank sync unless ``sync_stats=True`` (then ``psi_B^2``, the position count and
      the ``ema_gz`` increment are all-reduced: an opt-in departure from the released code).

    The step counter ``iters`` is incremented on every training forward call and is not touched
    in eval (with ``warmup_unit="forwards"`` it is also the warmup's clock, as released; with
    ``"updates"`` the warmup counts optimizer updates instead), where ``y = weight * x / sqrt(running_phi + eps) + bias``
    on the group-scaled ``x``. ``affine`` works (the released code ignores it). A batch without
    real tokens leaves ``running_phi`` and ``ema_gz`` unchanged (the released code would divide by
    zero).

    Divergence counting: ``num_unstable`` counts backward steps where ``(1-alpha_bkw) Gamma >= 2``
    (``Gamma = mean z^2`` over all positions) or ``ema_gz`` became non-finite. It is accumulated as
    a tensor (no host sync); the module reads it every ``check_every`` training calls and when its
    state dict is taken, and then warns once.

    Args:
        num_features: ``C``.
        eps: Default: 1e-5.
        alpha_fwd, alpha_bkw: Default: 0.9, 0.9.
        warmup_updates: the released ``warmup_iters``, in ``warmup_unit``s. Default: 0.
        warmup_unit: ``"updates"`` (optimizer updates, told by :meth:`set_num_updates`, as the
            paper variant; the running statistic's cumulative average still weighs each forward)
            or ``"forwards"`` (training forward calls: the released count, number for number).
            Default: ``"updates"``.
        group_num: GroupScaling groups, 0 = off. Default: 1.
        affine, sync_stats, process_group, device, dtype: see
            :class:`~powernorm_fairseq.norms.base.MaskedNorm`.

    Buffers (released names and shapes, so a released state dict loads): ``running_phi``
    ``(1, C, 1, 1)`` init 1, ``ema_gz`` ``(1, C, 1, 1)`` init 0, ``iters`` ``(1,)`` long init 0;
    plus ``num_unstable`` ``(1,)`` long (filled with 0 when loading a released state dict: a
    plain dict, or one with torch's ``_metadata`` version 1, alone or inside a model's state).

    Shape:
        - x: ``(T, B, C)`` or ``(N, C)``; padding_mask: ``(B, T)`` bool, True = pad, or None.
        - output: same as ``x``.

    Example::

        >>> norm = PowerNormReference(512, group_num=4, warmup_updates=8000)
        >>> y = norm(torch.randn(7, 3, 512))
    """

    check_every = 1000
    _host_state = ("_calls_since_check",)
    #: D5, by design: ``ema_gz`` averages over every position, pads included, and the input
    #: gradient's correction reaches them (the norm contract holds it to its outputs instead)
    pads_enter_backward = True

    def __init__(self, num_features: int, eps: float = EPS, alpha_fwd: float = ALPHA_FWD,
                 alpha_bkw: float = ALPHA_BKW, warmup_updates: int = WARMUP_UPDATES,
                 group_num: int = REFERENCE_GROUP_NUM,
                 affine: bool = True, sync_stats: bool = False, process_group=None,
                 device=None, dtype=None, batch_first: bool = False, warmup_unit: str = WARMUP_UNIT):
        super().__init__(num_features, eps, affine, sync_stats, process_group, device, dtype,
                         batch_first=batch_first)
        check_power_arguments(num_features, alpha_fwd, alpha_bkw, warmup_updates, group_num, warmup_unit)
        self.alpha_fwd, self.alpha_bkw = alpha_fwd, alpha_bkw
        self.warmup_updates, self.group_num, self.warmup_unit = warmup_updates, group_num, warmup_unit
        self._num_updates_host = 0  # the optimizer updates told (warmup_unit="updates")
        factory = {"device": device, "dtype": dtype}
        self.register_buffer("running_phi", torch.ones(1, num_features, 1, 1, **factory))
        self.register_buffer("ema_gz", torch.zeros(1, num_features, 1, 1, **factory))
        self.register_buffer("iters", torch.zeros(1, dtype=torch.long, device=device))
        self.register_buffer("num_unstable", torch.zeros(1, dtype=torch.long, device=device))
        self._calls_since_check = 0
        self._warned = False
        self.reset_parameters()

    @classmethod
    def from_options(cls, options, *, num_heads: int = 1, final: bool = False) -> dict:
        """:func:`~.power_norm_paper.power_options` (GroupScaling over the attention heads unless
        ``pn_group_num`` says otherwise, as the released transformer builds it) and ``sync_stats``."""
        return {**super().from_options(options, num_heads=num_heads, final=final),
                **power_options(options, num_heads, final, auto_groups=num_heads)}

    def prescale_groups(self) -> int:
        return self.group_num

    def running_statistics(self) -> dict[str, Tensor]:
        return {"psi2": self.running_phi.detach().view(-1)}

    def backward_nu(self) -> Tensor:
        """``(1 - alpha_bkw) ema_gz``: the released ``ema_gz`` is ``nu / (1 - alpha_bkw)``."""
        return (1.0 - float(self.alpha_bkw)) * self.ema_gz.detach().reshape(-1).float()

    def reset_running_stats(self) -> None:
        self.running_phi.fill_(1.0)
        self.ema_gz.zero_()
        self.iters.zero_()
        self.num_unstable.zero_()

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}, variant=reference, alpha_fwd={self.alpha_fwd}, "
                f"alpha_bkw={self.alpha_bkw}, warmup_updates={self.warmup_updates}, "
                f"group_num={self.group_num}, warmup_unit={self.warmup_unit}")

    @torch.no_grad()
    def eval_affine(self) -> tuple[Tensor, Tensor]:
        weight, bias = self._affine_or_identity(self.running_phi.dtype)
        return weight * torch.rsqrt(self.running_phi.view(-1) + self.eps), bias.clone()

    def check_stability(self) -> int:
        """Read ``num_unstable`` (one host sync) and warn once per module if it is non-zero."""
        self._calls_since_check = 0
        count = int(self.num_unstable[0])
        if count and not self._warned:
            self._warned = True
            warnings.warn(
                f"PowerNormReference({self.num_features}): the ema_gz recurrence was unstable in "
                f"{count} step(s) ((1-alpha_bkw)*mean(z^2) >= 2 or non-finite ema_gz); this "
                "variant has no safeguard. Raise alpha_bkw, use group_num >= 1, or use "
                "variant='paper'.", RuntimeWarning, stacklevel=2)
        return count

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        self.check_stability()
        super()._save_to_state_dict(destination, prefix, keep_vars)

    #: 2 = has ``num_unstable``; the released ``MaskPowerNorm`` saves version 1 (torch's default)
    _version = 2

    def _upgrade_legacy_state(self, state_dict: dict, prefix: str) -> None:
        state_dict.setdefault(prefix + "num_unstable", torch.zeros_like(self.num_unstable))

    def _normalize(self, x2d: Tensor, keep: Tensor | None) -> Tensor:
        weight, bias = self._affine_or_identity(x2d.dtype)
        if self.training:
            if self.warmup_unit == "updates" and self._num_updates_host < self.warmup_updates:
                self._check_warmup_clock()
            self._calls_since_check += 1
            if self._calls_since_check >= self.check_every:
                self.check_stability()
            function = ReferencePowerFunction
            if self.group_num and fused.usable(x2d, keep, weight, bias):
                function = ReferenceGroupPowerFunction  # scales by groups itself
            elif self.group_num:
                x2d = group_rms_scale(x2d, self.group_num, PRESCALE_EPS)
            # the Function advances running_phi and iters itself
            return function.apply(x2d, weight, bias, keep, ReferenceStep(
                self._config(), self.running_phi.view(-1), self.iters, self.ema_gz,
                self.num_unstable, self._sync(), self.process_group))
        if self.group_num:
            x2d = group_rms_scale(x2d, self.group_num, PRESCALE_EPS)
        phi = self.running_phi.view(-1).to(x2d.dtype)
        return torch.addcmul(bias, x2d, weight * torch.rsqrt(phi + self.eps))

    def set_num_updates(self, num_updates: int) -> None:
        self._told, self._num_updates_host = True, int(num_updates)

    def _config(self) -> ReferenceConfig:
        clock = None if self.warmup_unit == "forwards" else self._num_updates_host + 1
        return ReferenceConfig(self.eps, self.alpha_fwd, self.alpha_bkw, self.warmup_updates,
                               self.group_num, clock)
