"""Masked batch normalization (BN)."""

from __future__ import annotations

import torch
from torch import Tensor

from .autograd import PRESCALE_EPS, BatchStat, BatchStatNormFunction, ema_running_
from .base import MaskedNorm
from .defaults import BN_PAD_STATISTICS, EPS, MOMENTUM, PAD_STATISTICS
from .functional import group_rms_scale
from .registry import register_norm


@register_norm("batch")
class MaskedBatchNorm(MaskedNorm):
    r"""Batch normalization over the real (non-pad) tokens of a ``(T, B, C)`` batch.

    .. math::
        y = \frac{x - \mu_B}{\sqrt{\sigma_B^2 + \epsilon}} \cdot \gamma + \beta

    with per-channel mean and biased variance over non-pad tokens only; exact gradient (custom
    backward, see :class:`BatchStatNormFunction`). Running mean and unbiased running variance
    (as in ``torch.nn.BatchNorm1d``) are updated as ``s <- (1 - momentum) s + momentum s_B``
    (:func:`~.autograd.ema_running_`) and used in eval mode, where
    the layer is the fixed affine map :meth:`eval_affine`. A batch without real tokens leaves the
    running statistics unchanged.

    Differs from the released code's ``MaskSyncBatchNorm``, which (i) first divides every token by
    its RMS over all channels (LayerScaling), (ii) replaces pad rows by the batch mean and runs BN
    over all ``T*B`` rows, so its variance is diluted by ``N_real / (T*B)``, (iii) uses momentum
    0.05 and (iv) never synchronizes. ``prescale=True`` adds (i), i.e.
    ``x / sqrt(mean_c(x^2) + 1e-5)`` per token, also at eval; ``momentum=0.05`` gives (iii);
    ``pad_statistics="released"`` gives (ii) in training:

    .. math::
        \mu = \mu_{real}, \quad
        \sigma^2 = \frac{1}{TB} \sum_{i \in real} (x_i - \mu)^2, \quad
        y_{pad} = \beta

    with the gradient through the filled rows (their value is the differentiable mean of the
    real rows) and the running variance updated with ``sum_real (x_i - mu)^2 / (TB - 1)``, as
    ``torch.nn.functional.batch_norm`` over the filled rows does. With ``sync_stats`` each rank
    fills its pads with its own real rows' mean. At eval both modes are the affine map.

    Args:
        num_features: ``C``.
        eps: Default: 1e-5.
        momentum: weight of the batch statistic in the running-average update. Default: 0.1.
        affine: learn ``weight`` (init 1) and ``bias`` (init 0). Default: True.
        prescale: per-token RMS scaling before BN (see above). Default: False.
        pad_statistics: ``"masked"`` (pads excluded from the statistics) or ``"released"``
            (the released pad filling, see above). Default: ``"masked"``.
        sync_stats: all-reduce statistics (forward and backward) over ``process_group``, so the
            running statistics stay identical on all ranks. Default: False.
        process_group, device, dtype: see :class:`~powernorm_fairseq.norms.base.MaskedNorm`.

    Shape:
        - x: ``(T, B, C)`` or ``(N, C)``; padding_mask: ``(B, T)`` bool, True = pad, or None.
        - output: same as ``x``.

    Example::

        >>> bn = MaskedBatchNorm(512)
        >>> x, pad = torch.randn(7, 3, 512), torch.zeros(3, 7, dtype=torch.bool)
        >>> pad[0, 5:] = True
        >>> y = bn(x, padding_mask=pad)
    """

    def __init__(self, num_features: int, eps: float = EPS, momentum: float = MOMENTUM,
                 affine: bool = True, prescale: bool = False, sync_stats: bool = False,
                 process_group=None, device=None, dtype=None, pad_statistics: str = PAD_STATISTICS,
                 batch_first: bool = False):
        super().__init__(num_features, eps, affine, sync_stats, process_group, device, dtype,
                         batch_first=batch_first)
        if not 0.0 <= momentum <= 1.0:
            raise ValueError(f"momentum must be in [0, 1], got {momentum}")
        if pad_statistics not in BN_PAD_STATISTICS:
            raise ValueError(f"pad_statistics must be one of {', '.join(BN_PAD_STATISTICS)}, "
                             f"got {pad_statistics!r}")
        self.momentum = momentum
        self.prescale = prescale
        self.pad_statistics = pad_statistics
        factory = {"device": device, "dtype": dtype}
        self.register_buffer("running_mean", torch.zeros(num_features, **factory))
        self.register_buffer("running_var", torch.ones(num_features, **factory))
        self.reset_parameters()

    @classmethod
    def from_options(cls, options, *, num_heads: int = 1, final: bool = False) -> dict:
        """``momentum`` (``bn_momentum``), ``prescale`` (``bn_prescale``), ``pad_statistics``
        (``bn_pad_statistics``), ``sync_stats`` (``norm_sync_stats``)."""
        kwargs = super().from_options(options, num_heads=num_heads, final=final)
        for key, option, kind in (("momentum", "bn_momentum", float), ("prescale", "bn_prescale", bool),
                                  ("pad_statistics", "bn_pad_statistics", str)):
            if getattr(options, option, None) is not None:
                kwargs[key] = kind(getattr(options, option))
        return kwargs

    def prescale_groups(self) -> int:
        return 1 if self.prescale else 0

    def running_statistics(self) -> dict[str, Tensor]:
        return {"mean": self.running_mean.detach(), "var": self.running_var.detach()}

    def reset_running_stats(self) -> None:
        self.running_mean.zero_()
        self.running_var.fill_(1.0)

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}, momentum={self.momentum}, prescale={self.prescale}"
                + (f", pad_statistics={self.pad_statistics}" if self.pad_statistics != PAD_STATISTICS else ""))

    @torch.no_grad()
    def eval_affine(self) -> tuple[Tensor, Tensor]:
        weight, bias = self._affine_or_identity(self.running_var.dtype)
        scale = weight * torch.rsqrt(self.running_var + self.eps)
        return scale, bias - self.running_mean * scale

    def _normalize(self, x2d: Tensor, keep: Tensor | None) -> Tensor:
        if self.prescale:
            x2d = group_rms_scale(x2d, 1, PRESCALE_EPS)
        weight, bias = self._affine_or_identity(x2d.dtype)
        if not self.training:
            scale = weight * torch.rsqrt(self.running_var.to(x2d.dtype) + self.eps)
            return torch.addcmul(bias - self.running_mean.to(x2d.dtype) * scale, x2d, scale)
        n_real = None
        if self.pad_statistics == "released" and keep is not None:
            # pad rows take the real rows' mean, with its gradient; then BN over all rows
            # (no host sync: no boolean indexing, no branch on the count)
            real = keep[:, None] > 0
            n_real = keep.sum()
            fill = torch.where(real, x2d, 0.0).sum(0) / n_real.clamp(min=1)
            x2d, keep = torch.where(real, x2d, fill), None
        running, ema = (self.running_mean, self.running_var), (1.0 - self.momentum, self.momentum)
        # the Function advances the running statistics itself (ema_running_), except after
        # the released pad filling, where a batch without real tokens must leave them
        stats = None if n_real is None else []
        y = BatchStatNormFunction.apply(x2d, weight, bias, keep, BatchStat(
            True, self.eps, self._sync(), self.process_group,
            running=running if n_real is None else (), ema=ema, stats=stats))
        if n_real is not None:
            mean, var, count = stats
            ema_running_(running, mean, var, count * (n_real > 0), ema)
        return y
