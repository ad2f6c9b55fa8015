"""RMSNorm (Zhang & Sennrich, 2019): LayerNorm without centering, per token."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from . import fused
from .base import MaskedNorm
from .defaults import EPS
from .group_rms import GroupRMSAffineFunction
from .registry import register_norm


@register_norm("rms")
class RMSNorm(MaskedNorm):
    r"""Root-mean-square normalization over the channels of each token.

    .. math::
        y = \frac{x}{\sqrt{\mathrm{E}_c[x^2] + \epsilon}} \cdot \gamma \; (+ \beta)

    Statistics are per token, so pads never influence real tokens; ``padding_mask`` is validated
    and otherwise ignored. The numbers of ``torch.nn.RMSNorm(C, eps)`` (it calls
    ``torch.nn.functional.rms_norm``; on the fused CPU kernels, with ``affine``, GroupScaling's
    one-pass kernels with one group, within 1e-6 of it in float32), plus an optional bias. The paper cites it as the norm
    without mean subtraction; PN-V is its batch-statistic counterpart, GroupScaling (``group_rms``)
    its per-group one.

    Args:
        num_features: ``C``.
        eps: added to the mean square. Default: 1e-5.
        affine: learn ``weight`` (init 1). Default: True.
        bias: with ``affine``, also learn ``bias`` (init 0). Default: False (torch's RMSNorm
            has none).
        device, dtype: of the parameters.

    Shape:
        - x: ``(T, B, C)`` or ``(N, C)``; padding_mask: ``(B, T)`` bool, True = pad, or None.
        - output: same as ``x``.

    Example::

        >>> norm = RMSNorm(512)
        >>> y = norm(torch.randn(10, 4, 512))
    """

    stateful = False  # no state: traced by torch.compile (as plain torch ops), recomputed as is
    reads_padding = False  # per token: pads cannot reach a real token

    def __init__(self, num_features: int, eps: float = EPS, affine: bool = True, bias: bool = False,
                 device=None, dtype=None, batch_first: bool = False):
        super().__init__(num_features, eps, affine, device=device, dtype=dtype, bias=bias, batch_first=batch_first)
        self.reset_parameters()

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}, affine={self.affine}, bias={self.bias is not None}"

    def _normalize(self, x2d: Tensor, keep: Tensor | None) -> Tensor:
        weight = None if self.weight is None else self.weight.to(x2d.dtype)
        bias = None if self.bias is None else self.bias.to(x2d.dtype)
        if weight is not None and fused.usable(x2d, weight, bias):
            # GroupScaling's kernels with one group: one pass each way, where torch's CPU
            # rms_norm is a composite of several (same formula; rounding within 1e-6 of it)
            return GroupRMSAffineFunction.apply(x2d, weight, bias, 1, self.eps)
        y = F.rms_norm(x2d, (self.num_features,), weight, self.eps)
        return y if bias is None else y + bias
