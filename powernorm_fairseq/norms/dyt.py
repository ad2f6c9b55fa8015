"""Dynamic Tanh (Zhu, Chen, He, LeCun, Liu, "Transformers without Normalization", CVPR 2025)."""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from . import fused
from .base import MaskedNorm
from .defaults import DYT_ALPHA_INIT
from .registry import register_norm


class DynamicTanhFunction(torch.autograd.Function):
    """``y = weight * tanh(alpha x) + bias`` on the fused CPU kernels (float32/float64 CPU tensors,
    checked by the caller). In float32 the forward is one kernel pass (``fused.dyt_forward``) with
    its own vectorized tanh, within 1.3 ulp of the exact tanh (torch's CPU ``tanh`` took about 3 ns
    per element here, nine times LayerNorm's forward); in float64 it is torch's (``tanh`` in place
    on ``alpha x``, then one ``addcmul``: the eager path's bits). The backward is one kernel pass
    (``fused.dyt_backward``: the input gradient and the sums of all three parameter gradients)
    where autograd takes about eight. Shape: x ``(N, C)``; alpha ``(1,)``; weight, bias ``(C,)``."""

    @staticmethod
    def forward(ctx, x, alpha, weight, bias):
        if x.dtype is torch.float32:  # one pass, the kernel's own vectorized tanh
            y, t = fused.dyt_forward(x, alpha, weight, bias)
        else:
            t = torch.tanh_(alpha * x)
            y = torch.addcmul(bias, t, weight)
        ctx.save_for_backward(x, t, alpha, weight)
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_y):
        x, t, alpha, weight = ctx.saved_tensors
        grad_x, grad_w, grad_b, grad_a = fused.dyt_backward(grad_y, x, t, alpha, weight)
        need = ctx.needs_input_grad
        return grad_x, grad_a if need[1] else None, grad_w if need[2] else None, grad_b if need[3] else None


@register_norm("dyt")
class DynamicTanh(MaskedNorm):
    r"""Dynamic Tanh, an element-wise replacement of a norm layer: no statistic at all.

    .. math::
        y = \gamma \tanh(\alpha x) + \beta

    with one learnable scalar ``alpha`` (initialised at ``alpha_init``; the authors use 0.5 for
    models other than LLMs) and a per-channel ``weight`` (init 1) and ``bias`` (init 0). Each
    element is mapped alone, so pads never influence real tokens and ``padding_mask`` is only
    validated. ``eps`` is accepted for the common signature and unused.

    Args:
        num_features: ``C``.
        alpha_init: initial ``alpha``. Default: 0.5.
        affine: learn ``weight`` and ``bias``. Default: True.
        bias: with ``affine``, learn ``bias`` too. Default: True.
        device, dtype: of the parameters.

    Shape:
        - x: ``(T, B, C)`` or ``(N, C)``; padding_mask: ``(B, T)`` bool, True = pad, or None.
        - output: same as ``x``.

    Example::

        >>> norm = DynamicTanh(512, alpha_init=0.5)
        >>> y = norm(torch.randn(10, 4, 512))
    """

    stateful = False  # no state: traced by torch.compile (as plain torch ops), recomputed as is
    reads_padding = False  # per token: pads cannot reach a real token

    def __init__(self, num_features: int, alpha_init: float = DYT_ALPHA_INIT, eps: float = 1e-5,
                 affine: bool = True, bias: bool = True, device=None, dtype=None, batch_first: bool = False):
        super().__init__(num_features, eps, affine, device=device, dtype=dtype, bias=bias, batch_first=batch_first)
        if not alpha_init > 0:
            raise ValueError(f"alpha_init must be > 0, got {alpha_init}")
        self.alpha_init = float(alpha_init)
        self.alpha = nn.Parameter(torch.empty(1, device=device, dtype=dtype))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        super().reset_parameters()
        nn.init.constant_(self.alpha, self.alpha_init)

    @classmethod
    def from_options(cls, options, *, num_heads: int = 1, final: bool = False) -> dict:
        """``alpha_init`` from ``dyt_alpha_init``."""
        value = getattr(options, "dyt_alpha_init", None)
        return {} if value is None else {"alpha_init": float(value)}

    def extra_repr(self) -> str:
        return (f"{self.num_features}, alpha_init={self.alpha_init}, affine={self.affine}, "
                f"bias={self.bias is not None}")

    def _normalize(self, x2d: Tensor, keep: Tensor | None) -> Tensor:
        weight, bias = self._affine_or_identity(x2d.dtype)
        alpha = self.alpha.to(x2d.dtype)
        if fused.usable(x2d, alpha, weight, bias):
            return DynamicTanhFunction.apply(x2d, alpha, weight, bias)
        return torch.addcmul(bias, torch.tanh(alpha * x2d), weight)
