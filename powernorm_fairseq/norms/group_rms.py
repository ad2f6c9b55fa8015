"""GroupScaling alone: the released PN's per-token group RMS stage, then the affine."""

from __future__ import annotations

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from . import fused
from .autograd import PRESCALE_EPS, check_group_num
from .base import MaskedNorm, group_num_option
from .functional import group_rms_scale
from .registry import register_norm


class GroupRMSAffineFunction(torch.autograd.Function):
    """``y = group_rms_scale(x) * weight + bias`` on the fused CPU kernels (float32/float64 CPU
    tensors, checked by the caller): the forward is the scaling kernel and one ``addcmul`` (an
    in-place multiply without ``bias``), the backward one pass (``fused.grms_backward`` with
    ``dL/dz = dL/dy * weight``: the input gradient and the sums ``sum dL/dy`` and
    ``sum dL/dy * z`` of the parameter gradients), where the composite graph takes five. With one
    group it is RMSNorm (:class:`~.rms_norm.RMSNorm` runs on it). Shape: x ``(N, C)``; weight,
    bias ``(C,)`` (bias or None)."""

    @staticmethod
    def forward(ctx, x, weight, bias, group_num, eps):
        z, rstd = fused.group_rms_forward(x, group_num, eps)
        ctx.save_for_backward(x, rstd, weight)
        return torch.addcmul(bias, z, weight) if bias is not None else z.mul_(weight)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_y):
        x, rstd, weight = ctx.saved_tensors
        grad_x, sum_gy, sum_gyz = fused.grms_backward(grad_y, x, rstd, weight,
                                                      torch.zeros_like(weight))
        need = ctx.needs_input_grad
        return grad_x, sum_gyz if need[1] else None, sum_gy if need[2] else None, None, None


@register_norm("group_rms")
class GroupRMSNorm(MaskedNorm):
    r"""GroupScaling: each token divided by its RMS over each of ``group_num`` channel groups,
    then a per-channel affine map; no batch statistic.

    .. math::
        y_{n, g, j} = \gamma_{g, j} \frac{x_{n, g, j}}{\sqrt{\frac{1}{C_g}\sum_{j'} x_{n, g, j'}^2
        + \epsilon}} + \beta_{g, j}

    with the ``C`` channels in ``group_num`` contiguous groups of ``C_g = C / group_num``. This is
    the first stage of the released ``MaskPowerNorm`` (its ``GroupScaling1D``, eps 1e-5) with
    the affine map PN applies last, and nothing in between: the released PN without its power
    normalization, which separates the two ingredients. ``group_num = 1`` is an RMSNorm with a
    bias. Statistics are per token, so pads never influence real tokens. In fairseq the groups
    default to the attention heads, as the released transformer builds them (``--pn-group-num``,
    -1).

    Args:
        num_features: ``C``.
        eps: added to each group's mean square. Default: 1e-5 (the released GroupScaling's).
        group_num: channel groups, >= 1, dividing ``C``. Default: 1.
        affine: learn ``weight`` (init 1). Default: True.
        bias: with ``affine``, learn ``bias`` (init 0), as the released PN. Default: True.
        device, dtype: of the parameters.

    Shape:
        - x: ``(T, B, C)`` or ``(N, C)``; padding_mask: ``(B, T)`` bool, True = pad, or None.
        - output: same as ``x``.

    Example::

        >>> norm = GroupRMSNorm(512, group_num=4)
        >>> y = norm(torch.randn(10, 4, 512))
    """

    stateful = False  # plain torch ops and the group-scaling Function: no state to recompute
    reads_padding = False  # per token: pads cannot reach a real token

    def __init__(self, num_features: int, eps: float = PRESCALE_EPS, group_num: int = 1,
                 affine: bool = True, bias: bool = True, device=None, dtype=None, batch_first: bool = False):
        super().__init__(num_features, eps, affine, device=device, dtype=dtype, bias=bias, batch_first=batch_first)
        check_group_num(num_features, group_num)
        if group_num < 1:
            raise ValueError(f"group_num must be >= 1 for group_rms (it is the norm), got {group_num}")
        self.group_num = group_num
        self.reset_parameters()

    @classmethod
    def from_options(cls, options, *, num_heads: int = 1, final: bool = False) -> dict:
        """``group_num`` from ``pn_group_num`` (-1 and -2: the attention heads, as released)."""
        groups = group_num_option(options, num_heads, auto=num_heads)
        return {} if groups is None else {"group_num": groups}

    def prescale_groups(self) -> int:
        return self.group_num

    @torch.no_grad()
    def eval_affine(self) -> tuple[Tensor, Tensor]:
        """The affine after GroupScaling: ``(weight, bias)`` (what ``fold_norms`` folds)."""
        weight, bias = self._affine_or_identity(torch.float32)
        return weight.clone(), bias.clone()

    def extra_repr(self) -> str:
        return (f"{self.num_features}, eps={self.eps}, group_num={self.group_num}, affine={self.affine}, "
                f"bias={self.bias is not None}")

    def _normalize(self, x2d: Tensor, keep: Tensor | None) -> Tensor:
        weight, bias = self._affine_or_identity(x2d.dtype)
        if fused.usable(x2d, weight, bias):
            return GroupRMSAffineFunction.apply(x2d, weight, bias, self.group_num, self.eps)
        return group_rms_scale(x2d, self.group_num, self.eps) * weight + bias
