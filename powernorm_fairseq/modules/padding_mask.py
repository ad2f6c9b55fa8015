"""The padding mask of the running forward pass, for norms that fairseq's code calls as ``norm(x)``.

fairseq's layers and stacks call their norms as ``norm(x)``; batch-statistics norms also need the
``(B, T)`` padding mask so that pads stay out of their statistics. Instead of re-stating fairseq's
forward passes with the mask added at every call, a layer or stack here runs fairseq's own forward
inside :func:`padding_mask_for_norms`, and every norm it built carries :func:`pass_padding_mask`
as a forward pre-hook: a call ``norm(x)`` made inside the context becomes
``norm(x, padding_mask=mask)``. A call that passes its own mask, and any call outside a context,
is left as it is.

The mask lives in a :class:`contextvars.ContextVar`, not in module state: threads (autograd's
device threads, ``DataParallel`` replicas) each see their own, and a forward that activation
checkpointing re-runs inside the backward enters the context again itself.

Example::

    >>> norm = attach_padding_mask(build_norm("batch", 8))
    >>> with padding_mask_for_norms(mask):  # mask: (B, T) bool, True = pad
    ...     y = norm(x)  # x: (T, B, 8); the same as norm(x, padding_mask=mask)
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from contextvars import ContextVar
from typing import Any

from torch import Tensor, nn

_UNSET = object()
_CURRENT: ContextVar[Any] = ContextVar("powernorm_fairseq_padding_mask", default=_UNSET)


@contextlib.contextmanager
def padding_mask_for_norms(padding_mask: Tensor | None) -> Iterator[None]:
    """Within the block, norms with :func:`attach_padding_mask` called as ``norm(x)`` receive
    ``padding_mask`` (``(B, T)`` bool, True = pad, or None for a batch without pads).
    Contexts nest; leaving one restores the enclosing mask."""
    token = _CURRENT.set(padding_mask)
    try:
        yield
    finally:
        _CURRENT.reset(token)


def pass_padding_mask(
    module: nn.Module, args: tuple, kwargs: dict[str, Any]
) -> tuple[tuple, dict[str, Any]] | None:
    """Forward pre-hook (``with_kwargs=True``): add the context's mask to a ``norm(x)`` call."""
    mask = _CURRENT.get()
    if mask is _UNSET or len(args) != 1 or "padding_mask" in kwargs:
        return None
    return args, {**kwargs, "padding_mask": mask}


def attach_padding_mask(norm: nn.Module) -> nn.Module:
    """Register :func:`pass_padding_mask` on ``norm`` and return it (a module-level function, so
    the model still deep-copies and pickles)."""
    norm.register_forward_pre_hook(pass_padding_mask, with_kwargs=True)
    return norm
