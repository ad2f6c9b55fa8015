"""PN-V: power normalization by the batch quadratic mean (docs/SPEC.md section 1)."""

from __future__ import annotations

import torch
from torch import Tensor

from .autograd import PRESCALE_EPS, BatchStat, BatchStatNormFunction, check_group_num
from .base import MaskedNorm, group_num_option
from .defaults import EPS, MOMENTUM
from .functional import group_rms_scale
from .registry import register_norm


@register_norm("power_v")
class PowerNormV(MaskedNorm):
    r"""PN-V: divide by the per-channel quadratic mean of the batch (no centering).

    .. math::
        \psi_B^2 = \frac{1}{n}\sum_{i\,\text{real}} x_i^2, \qquad
        y = \gamma \cdot \frac{x}{\sqrt{\psi_B^2 + \epsilon}} + \beta

    with the exact gradient
    ``dL/dx_j = r (g_j - k_j x_hat_j (1/n) sum_i g_i x_hat_i)``, ``r = 1/sqrt(psi_B^2 + eps)``
    (:class:`~powernorm_fairseq.norms.autograd.BatchStatNormFunction`). Pads are normalized but
    excluded from ``psi_B^2``. In training the running statistic is updated as
    ``psi^2 <- (1 - momentum) psi^2 + momentum psi_B^2`` (:func:`~.autograd.ema_running_`; init
    1; skipped for a batch without real tokens or with a non-finite statistic); eval uses
    ``y = gamma * x / sqrt(psi^2 + eps) + beta``.

    With ``group_num > 0`` each token is first divided by its RMS over each of ``group_num``
    channel groups (the released PN's GroupScaling,
    :func:`~powernorm_fairseq.norms.functional.group_rms_scale`, eps 1e-5, also at eval): PN-V
    with GroupScaling, the ``pnv_gs`` configuration.

    Args:
        num_features: ``C``.
        eps: Default: 1e-5.
        momentum: weight of the batch statistic in the running average. Default: 0.1.
        group_num: GroupScaling groups before the statistic, 0 = off. Default: 0.
        affine, sync_stats, process_group, device, dtype: see
            :class:`~powernorm_fairseq.norms.base.MaskedNorm`.

    Shape:
        - x: ``(T, B, C)`` or ``(N, C)``; padding_mask: ``(B, T)`` bool, True = pad, or None.
        - output: same as ``x``.

    Example::

        >>> norm = PowerNormV(512)
        >>> y = norm(torch.randn(7, 3, 512))
    """

    def __init__(self, num_features: int, eps: float = EPS, momentum: float = MOMENTUM,
                 affine: bool = True, sync_stats: bool = False, process_group=None,
                 device=None, dtype=None, group_num: int = 0, batch_first: bool = False):
        super().__init__(num_features, eps, affine, sync_stats, process_group, device, dtype,
                         batch_first=batch_first)
        if not 0.0 <= momentum <= 1.0:
            raise ValueError(f"momentum must be in [0, 1], got {momentum}")
        check_group_num(num_features, group_num)
        self.momentum = momentum
        self.group_num = group_num
        self.register_buffer("running_psi2",
                             torch.ones(num_features, device=device, dtype=dtype))
        self.reset_parameters()

    @classmethod
    def from_options(cls, options, *, num_heads: int = 1, final: bool = False) -> dict:
        """``momentum`` (``bn_momentum``), ``group_num`` (``pn_group_num``; -1 = none, -2 = the
        heads), ``sync_stats`` (``norm_sync_stats``)."""
        kwargs = super().from_options(options, num_heads=num_heads, final=final)
        if getattr(options, "bn_momentum", None) is not None:
            kwargs["momentum"] = float(options.bn_momentum)
        if (groups := group_num_option(options, num_heads, auto=0)) is not None:
            kwargs["group_num"] = groups
        return kwargs

    def prescale_groups(self) -> int:
        return self.group_num

    def reset_running_stats(self) -> None:
        self.running_psi2.fill_(1.0)

    def running_statistics(self) -> dict[str, Tensor]:
        return {"psi2": self.running_psi2.detach()}

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, momentum={self.momentum}" + (
            f", group_num={self.group_num}" if self.group_num else "")

    @torch.no_grad()
    def eval_affine(self) -> tuple[Tensor, Tensor]:
        weight, bias = self._affine_or_identity(self.running_psi2.dtype)
        return weight * torch.rsqrt(self.running_psi2 + self.eps), bias.clone()

    def _normalize(self, x2d: Tensor, keep: Tensor | None) -> Tensor:
        if self.group_num:
            x2d = group_rms_scale(x2d, self.group_num, PRESCALE_EPS)
        weight, bias = self._affine_or_identity(x2d.dtype)
        if not self.training:
            return torch.addcmul(bias, x2d, weight * torch.rsqrt(
                self.running_psi2.to(x2d.dtype) + self.eps))
        # the Function advances running_psi2 itself (ema_running_)
        return BatchStatNormFunction.apply(x2d, weight, bias, keep, BatchStat(
            False, self.eps, self._sync(), self.process_group, running=(self.running_psi2,),
            ema=(1.0 - self.momentum, self.momentum)))
