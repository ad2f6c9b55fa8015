"""LayerNorm with the common ``norm(x, padding_mask=None)`` signature."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from .base import MaskedNorm
from .defaults import EPS
from .registry import register_norm


@register_norm("layer")
class LayerNorm(MaskedNorm):
    r"""Layer normalization over the channel dimension (per token; padding needs no masking).

    .. math::
        y = \frac{x - \mathrm{E}_c[x]}{\sqrt{\mathrm{Var}_c[x] + \epsilon}} \cdot \gamma + \beta

    Statistics are per token, so pads never influence real tokens; ``padding_mask`` is validated
    and otherwise ignored. Same numbers as ``torch.nn.LayerNorm(C, eps)`` (the released code's LN);
    like it, the weight/bias gradients sum over every position, so an inf or NaN at a pad makes
    them non-finite (real-token outputs and input gradients stay clean).

    Args:
        num_features: ``C``.
        eps: Default: 1e-5.
        affine: learn ``weight`` (init 1) and ``bias`` (init 0). Default: True.
        bias: with ``affine``, learn ``bias`` too (False: weight only). Default: True.
        device, dtype: of the parameters.

    Shape:
        - x: ``(T, B, C)`` or ``(N, C)``; padding_mask: ``(B, T)`` bool, True = pad, or None.
        - output: same as ``x``.

    Example::

        >>> norm = LayerNorm(512)
        >>> y = norm(torch.randn(10, 4, 512), padding_mask=torch.zeros(4, 10, dtype=torch.bool))
    """

    stateful = False  # plain torch ops: traced by torch.compile, recomputed as is
    reads_padding = False  # per token: pads cannot reach a real token

    def __init__(self, num_features: int, eps: float = EPS, affine: bool = True, device=None,
                 dtype=None, bias: bool = True, batch_first: bool = False):
        # no sync_stats / process_group: LN has no batch statistics to synchronize
        super().__init__(num_features, eps, affine, device=device, dtype=dtype, bias=bias, batch_first=batch_first)
        self.reset_parameters()

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}, affine={self.affine}"

    def _normalize(self, x2d: Tensor, keep: Tensor | None) -> Tensor:
        weight = None if self.weight is None else self.weight.to(x2d.dtype)
        bias = None if self.bias is None else self.bias.to(x2d.dtype)
        return F.layer_norm(x2d, (self.num_features,), weight, bias, self.eps)
