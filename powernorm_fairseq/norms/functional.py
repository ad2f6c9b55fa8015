"""Masked per-channel statistics over tokens; no module state.

Tokens are the rows of a 2-D view ``x2d: (N, C)`` of the input: for ``x: (T, B, C)``,
``N = T * B`` and row ``n = t * B + b`` (a free view of a contiguous tensor, no permute).
Padding is given as a float keep-vector ``keep: (N,)`` with 1 for real tokens and 0 for pads,
so masked sums are a product ``keep @ f(x2d)`` (one pass, no boolean-index copies).
``keep=None`` means every token is real.

All functions work in the dtype of their input; callers pass float32 (or float64) tensors.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from . import fused

#: The last keep-vector built, ``(mask, its version counter, dtype, batch_major, keep)``: every
#: norm of a layer stack reads the same mask object, so it is converted once per forward.
_last_keep: tuple = ()


def keep_vector(padding_mask: Tensor | None, dtype: torch.dtype, batch_major: bool = False) -> Tensor | None:
    """Float keep-vector from a padding mask (the result is shared: do not modify it).

    Args:
        padding_mask: ``(B, T)`` bool, True = pad (or ``(N,)`` for 2-D inputs), or None.
        dtype: floating dtype of the result.
        batch_major: the rows are ``b * T + t`` (a ``(B, T, C)`` input), not ``t * B + b``.

    Returns:
        ``(N,)`` with ``keep[t * B + b] = 1 - padding_mask[b, t]`` (``keep[b * T + t]`` when
        ``batch_major``), or None.
    """
    global _last_keep
    if padding_mask is None:
        return None
    # a cache of one, keyed on the mask object (held, so its id cannot be reused) and its
    # version counter (an in-place change of the mask misses); inference tensors have no
    # version counter and a traced graph must see the ops
    cacheable = not padding_mask.is_inference() and not torch.compiler.is_compiling()
    if cacheable:
        last = _last_keep
        if (last and last[0] is padding_mask and last[1] == padding_mask._version
                and last[2] == dtype and last[3] == batch_major):
            return last[4]
    keep = torch.logical_not(padding_mask)
    if keep.dim() == 2 and not batch_major:
        keep = keep.t()
    keep = keep.reshape(-1).to(dtype)
    if cacheable:
        _last_keep = (padding_mask, padding_mask._version, dtype, batch_major, keep)
    return keep


def token_count(x2d: Tensor, keep: Tensor | None) -> Tensor:
    """Number of real tokens as a 0-dim tensor of ``x2d``'s dtype (no host sync)."""
    if keep is None:
        return torch.full((), x2d.shape[0], dtype=x2d.dtype, device=x2d.device)
    return keep.sum()


def column_sum(x2d: Tensor, keep: Tensor | None) -> Tensor:
    """``sum_n keep[n] * x2d[n, c]``: shape ``(C,)``.

    A ``(1, N) @ (N, C)`` GEMM even without a mask: on CPU it reads ``x2d`` faster than
    ``x2d.sum(0)``, and unlike ``keep @ x2d`` (a GEMV) it does not stall on a busy multi-thread pool.
    """
    if keep is None:
        keep = x2d.new_ones(x2d.shape[0])
    return torch.mm(keep.unsqueeze(0), x2d).squeeze(0)


def zero_pads_(x2d: Tensor, keep: Tensor | None) -> Tensor:
    """Set the pad rows of ``x2d: (N, C)`` to 0 in place and return it (no-op for ``keep=None``).

    Masked sums of a possibly non-finite operand go through this, then an unmasked
    :func:`column_sum`: the product ``keep @ x2d`` would turn an inf or NaN at a pad into
    ``0 * inf = NaN`` in the statistic.
    """
    if keep is not None:
        x2d.masked_fill_((keep == 0).unsqueeze(1), 0)
    return x2d


def grad_times_x(grad_y: Tensor, x2d: Tensor, keep: Tensor | None, out: Tensor) -> Tensor:
    """``out = grad_y * x2d`` with ``0 * anything = 0`` when there are pads (``keep`` given).

    A backward's sums over all positions include the pads (their outputs depend on the
    statistics too), where ``dL/dy`` is 0 (the loss ignores pads) but ``x`` may be inf or NaN:
    IEEE ``0 * inf = NaN`` would reach every real token's gradient through the sums.
    """
    torch.mul(grad_y, x2d, out=out)
    if keep is not None:
        out.masked_fill_(grad_y == 0, 0)
    return out


def column_sums(x2d: Tensor, keep: Tensor | None) -> tuple[Tensor, Tensor]:
    """``(masked, total)`` column sums ``(C,)`` from ONE read of ``x2d`` (a 2-row GEMM
    ``[keep; 1] @ x2d``); without a mask both are the plain column sum."""
    if keep is None:
        total = column_sum(x2d, None)
        return total, total
    both = torch.mm(torch.stack([keep, torch.ones_like(keep)]), x2d)
    return both[0], both[1]


class _GroupRMSScale(torch.autograd.Function):
    """Autograd Function of :func:`group_rms_scale` (the composite autograd graph takes about
    twice the memory passes). Works on ``(N, G, C_g)`` views of ``(..., C)``;
    ``r = 1/sqrt(mean_g(x^2) + eps)`` ``(N, G)``. Backward (RMSNorm without affine):
    ``dL/dx = r * dL/dy - x * r^3 * mean_g(dL/dy * x)``."""

    @staticmethod
    def forward(ctx, x, group_num, eps):
        ctx.group_num = group_num
        if fused.usable(x):
            y, rstd = fused.group_rms_forward(x.reshape(-1, x.shape[-1]), group_num, eps)
            ctx.save_for_backward(x, rstd)
            return y.view(x.shape)
        xg = x.reshape(-1, group_num, x.shape[-1] // group_num)
        # a last-dim vector norm is one fused read (no x*x temporary)
        mean_sq = torch.linalg.vector_norm(xg, dim=-1).square_().div_(xg.shape[-1])
        rstd = torch.rsqrt(mean_sq + eps)
        ctx.save_for_backward(x, rstd)
        return (xg * rstd.unsqueeze(-1)).view(x.shape)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_y):
        x, rstd = ctx.saved_tensors
        if fused.usable(x, grad_y, rstd):
            c = x.shape[-1]
            return fused.group_rms_backward(grad_y.reshape(-1, c), x.reshape(-1, c),
                                            rstd).view(x.shape), None, None
        xg = x.reshape(-1, ctx.group_num, x.shape[-1] // ctx.group_num)
        gyg = grad_y.reshape(xg.shape)
        grad_x = torch.mul(gyg, xg)  # scratch for the group means first, then the gradient
        coef = grad_x.mean(-1) * rstd * rstd * rstd
        torch.mul(gyg, rstd.unsqueeze(-1), out=grad_x)
        grad_x.addcmul_(xg, coef.unsqueeze(-1), value=-1)
        return grad_x.view(x.shape), None, None


def group_rms_scale(x: Tensor, group_num: int, eps: float = 1e-5) -> Tensor:
    """Per-token, per-group RMS scaling (the released code's GroupScaling1D), differentiable.

    .. math::
        y_{n, g, j} = \\frac{x_{n, g, j}}{\\sqrt{\\frac{1}{C_g}\\sum_{j'} x_{n, g, j'}^2 + \\epsilon}}

    with the ``C`` channels split into ``group_num`` contiguous groups of ``C_g = C / group_num``.
    No affine parameters; ``group_num = 1`` is an RMSNorm over all channels. Exact gradient
    (custom backward, checked by gradcheck in the tests).

    Args:
        x: ``(..., C)`` with ``C % group_num == 0``.
        group_num: number of groups (>= 1).
        eps: added to the mean square, 1e-5 as in the released code.

    Shape:
        output has the shape of ``x``.
    """
    return _GroupRMSScale.apply(x, group_num, eps)
