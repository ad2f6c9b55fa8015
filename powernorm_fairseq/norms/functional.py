"""Masked per-channel statistics over tokens; no module state.

Tokens are the rows of a 2-D view ``x2d: (N, C)`` of the input: for ``x: (T, B, C)``,
``N = T * B`` and row ``n = t * B + b`` (a free view of a contiguous tensor, no permute).
Padding is given as a float keep-vector ``keep: (N,)`` with 1 for real tokens and 0 for pads,
so masked sums are a matrix-vector product ``keep @ f(x2d)`` (one pass, no boolean-index copies).
``keep=None`` means every token is real.

All functions work in the dtype of their input; callers pass float32 (or float64) tensors.
"""

from __future__ import annotations

import torch
from torch import Tensor


def keep_vector(padding_mask: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    """Float keep-vector from a padding mask.

    Args:
        padding_mask: ``(B, T)`` bool, True = pad (or ``(N,)`` for 2-D inputs), or None.
        dtype: floating dtype of the result.

    Returns:
        ``(N,)`` with ``keep[t * B + b] = 1 - padding_mask[b, t]``, or None.
    """
    if padding_mask is None:
        return None
    keep = torch.logical_not(padding_mask)
    if keep.dim() == 2:
        keep = keep.t()
    return keep.reshape(-1).to(dtype)


def token_count(x2d: Tensor, keep: Tensor | None) -> Tensor:
    """Number of real tokens as a 0-dim tensor of ``x2d``'s dtype (no host sync)."""
    if keep is None:
        return torch.full((), x2d.shape[0], dtype=x2d.dtype, device=x2d.device)
    return keep.sum()


def column_sum(x2d: Tensor, keep: Tensor | None) -> Tensor:
    """``sum_n keep[n] * x2d[n, c]``: shape ``(C,)``."""
    if keep is None:
        return x2d.sum(0)
    return keep @ x2d


def column_sum_of_squares(x2d: Tensor, keep: Tensor | None, with_total: bool = False):
    """Masked per-channel sum of squares ``sum_n keep[n] * x2d[n, c]^2``.

    One elementwise pass (``x * x``) and one GEMV/GEMM read of it. With ``with_total`` the sum over
    ALL rows (pads included) comes from the same read, as a 2-row GEMM ``[1; keep] @ x^2``.

    Returns:
        ``(C,)``, or the pair ``(masked (C,), total (C,))`` when ``with_total``.
    """
    sq = x2d * x2d
    if keep is None:
        s = sq.sum(0)
        return (s, s) if with_total else s
    if not with_total:
        return keep @ sq
    both = torch.stack([keep, torch.ones_like(keep)]) @ sq
    return both[0], both[1]


def group_rms_scale(x: Tensor, group_num: int, eps: float = 1e-5) -> Tensor:
    """Per-token, per-group RMS scaling (the released code's GroupScaling1D), with autograd.

    .. math::
        y_{n, g, j} = \\frac{x_{n, g, j}}{\\sqrt{\\frac{1}{C_g}\\sum_{j'} x_{n, g, j'}^2 + \\epsilon}}

    with the ``C`` channels split into ``group_num`` contiguous groups of ``C_g = C / group_num``.
    No affine parameters; ``group_num = 1`` is an RMSNorm over all channels.

    Args:
        x: ``(..., C)`` with ``C % group_num == 0``.
        group_num: number of groups (>= 1).
        eps: added to the mean square, 1e-5 as in the released code.

    Shape:
        output has the shape of ``x``.
    """
    shape = x.shape
    xg = x.reshape(*shape[:-1], group_num, shape[-1] // group_num)
    ms = (xg * xg).mean(-1, keepdim=True)
    return (xg * torch.rsqrt(ms + eps)).reshape(shape)
