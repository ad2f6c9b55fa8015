"""Padding-aware normalization layers for (T, B, C) transformer activations. Pure torch.

Every layer is called as ``norm(x, padding_mask=None)`` with ``x: (T, B, C)`` (or ``(N, C)``) and
``padding_mask: (B, T)`` bool, True = pad. Build one by name::

    >>> from powernorm_fairseq.norms import build_norm
    >>> norm = build_norm("power", 512, variant="reference", group_num=4)

This package never imports fairseq.
"""

from __future__ import annotations

import inspect

from .base import MaskedNorm
from .batch_norm import MaskedBatchNorm
from .layer_norm import LayerNorm
from .power_norm import (
    POWER_VARIANTS,
    PowerNormPaper,
    PowerNormReference,
    PowerNormV,
    power_norm,
)
from .vocabulary import NORM_BY_SHORT, NORM_SHORTS, NORM_SPECS, NormSpec, norm_spec

#: name -> constructor ``(num_features, **kwargs) -> MaskedNorm``.
NORM_REGISTRY = {
    "layer": LayerNorm,
    "batch": MaskedBatchNorm,
    "power_v": PowerNormV,
    "power": power_norm,
}
NORM_CHOICES = tuple(NORM_REGISTRY)


def _accepted_kwargs(cls) -> list[str]:
    params = list(inspect.signature(cls.__init__).parameters.values())[2:]
    return [p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]


def build_norm(name: str, num_features: int, **kwargs) -> MaskedNorm:
    """Build the norm registered as ``name`` over ``num_features`` channels.

    Args:
        name: one of :data:`NORM_CHOICES` (``"layer"``, ``"batch"``, ``"power_v"``, ``"power"``).
        num_features: number of channels ``C``.
        **kwargs: options of that family (``variant`` selects the PN class for ``"power"``).

    Raises:
        ValueError: unknown ``name``, ``variant`` or keyword for that family, or invalid values.
    """
    if name not in NORM_REGISTRY:
        raise ValueError(f"unknown norm {name!r}; choose one of {list(NORM_CHOICES)}")
    if name == "power":
        variant = kwargs.pop("variant", "paper")
        if variant not in POWER_VARIANTS:
            raise ValueError(f"unknown PowerNorm variant {variant!r}; choose one of "
                             f"{sorted(POWER_VARIANTS)}")
        cls, label = POWER_VARIANTS[variant], f"power (variant={variant!r})"
    else:
        cls, label = NORM_REGISTRY[name], repr(name)
    accepted = _accepted_kwargs(cls)
    unknown = sorted(set(kwargs) - set(accepted))
    if unknown:
        raise ValueError(f"unknown option(s) {unknown} for norm {label}; accepted: {accepted}")
    return cls(num_features, **kwargs)


__all__ = [
    "NORM_BY_SHORT",
    "NORM_SHORTS",
    "NORM_SPECS",
    "NormSpec",
    "norm_spec",
    "NORM_CHOICES",
    "NORM_REGISTRY",
    "LayerNorm",
    "MaskedBatchNorm",
    "MaskedNorm",
    "PowerNormPaper",
    "PowerNormReference",
    "PowerNormV",
    "build_norm",
    "power_norm",
]
