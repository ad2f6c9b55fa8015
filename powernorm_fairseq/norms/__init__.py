"""Padding-aware normalization layers for (T, B, C) transformer activations. Pure torch.

Every layer is called as ``norm(x, padding_mask=None)`` with ``x: (T, B, C)`` (or ``(N, C)``) and
``padding_mask: (B, T)`` bool, True = pad. Build one by name::

    >>> from powernorm_fairseq.norms import build_norm
    >>> norm = build_norm("power", 512, variant="reference", group_num=4)

This package never imports fairseq.
"""

from __future__ import annotations

import inspect

from . import defaults
from .base import MaskedNorm
from .batch_norm import MaskedBatchNorm
from .layer_norm import LayerNorm
from .power_norm import POWER_VARIANTS, PowerNormPaper, PowerNormReference, PowerNormV
from .vocabulary import NORM_BY_SHORT, NORM_SHORTS, NORM_SPECS, NormSpec, norm_spec

#: name -> class, one entry per norm class (timm's ``_NORM_MAP``).
_NORM_MAP: dict[str, type[MaskedNorm]] = {
    "layer": LayerNorm,
    "batch": MaskedBatchNorm,
    "power_v": PowerNormV,
    "power_paper": PowerNormPaper,
    "power_reference": PowerNormReference,
}
#: alias -> (the keyword that selects the class, its default, {value: name in ``_NORM_MAP``}).
_NORM_ALIASES: dict[str, tuple[str, str, dict[str, str]]] = {
    "power": ("variant", defaults.PN_VARIANT,
              {variant: f"power_{variant}" for variant in POWER_VARIANTS}),
}
#: The families: the names of ``--encoder-norm`` / ``--decoder-norm`` and of the norm vocabulary.
NORM_CHOICES = ("layer", "batch", "power_v", "power")
#: family -> the class ``build_norm(name, C)`` builds (for the alias ``power``: the default
#: variant's; ``variant=`` selects the other, see :data:`POWER_VARIANTS`).
NORM_REGISTRY: dict[str, type[MaskedNorm]] = {
    name: _NORM_MAP[_NORM_ALIASES[name][2][_NORM_ALIASES[name][1]]]
    if name in _NORM_ALIASES else _NORM_MAP[name]
    for name in NORM_CHOICES
}

#: class -> family, for :func:`norm_family`
_FAMILY_OF: dict[type, str] = {
    _NORM_MAP[target]: alias for alias, (_, _, targets) in _NORM_ALIASES.items()
    for target in targets.values()
}
_FAMILY_OF.update((cls, name) for name, cls in _NORM_MAP.items() if name in NORM_CHOICES)


def _accepted_kwargs(cls) -> list[str]:
    params = list(inspect.signature(cls.__init__).parameters.values())[2:]
    return [p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]


def _resolve(name: str, kwargs: dict) -> tuple[type[MaskedNorm], str]:
    """The class of ``name`` (popping an alias's selecting keyword from ``kwargs``) and how
    error messages call it."""
    if name in _NORM_ALIASES:
        key, default, targets = _NORM_ALIASES[name]
        value = kwargs.pop(key, default)
        if value not in targets:
            raise ValueError(f"unknown PowerNorm {key} {value!r}; choose one of {sorted(targets)}")
        return _NORM_MAP[targets[value]], f"{name} ({key}={value!r})"
    if name not in _NORM_MAP:
        raise ValueError(f"unknown norm {name!r}; choose one of {list(NORM_CHOICES)} "
                         f"(or a class name: {list(_NORM_MAP)})")
    return _NORM_MAP[name], repr(name)


def build_norm(name: str, num_features: int, **kwargs) -> MaskedNorm:
    """Build the norm registered as ``name`` over ``num_features`` channels.

    Args:
        name: a family of :data:`NORM_CHOICES` (``"layer"``, ``"batch"``, ``"power_v"``,
            ``"power"``), or a class name of ``_NORM_MAP`` (``"power_paper"``,
            ``"power_reference"``). ``"power"`` is an alias: ``variant`` (default
            ``"paper"``, :data:`~powernorm_fairseq.norms.defaults.PN_VARIANT`) selects the class.
        num_features: number of channels ``C``.
        **kwargs: options of that class.

    Raises:
        ValueError: unknown ``name``, ``variant`` or keyword for that class, or invalid values.
    """
    kwargs = dict(kwargs)
    cls, label = _resolve(name, kwargs)
    accepted = _accepted_kwargs(cls)
    unknown = sorted(set(kwargs) - set(accepted))
    if unknown:
        raise ValueError(f"unknown option(s) {unknown} for norm {label}; accepted: {accepted}")
    return cls(num_features, **kwargs)


def norm_family(module) -> str | None:
    """The family (:data:`NORM_CHOICES`) of a norm module or class, or None if it is none of
    ours (``"power"`` for both PN variants)."""
    cls = module if isinstance(module, type) else type(module)
    return next((_FAMILY_OF[base] for base in cls.__mro__ if base in _FAMILY_OF), None)


__all__ = [
    "NORM_BY_SHORT",
    "NORM_SHORTS",
    "NORM_SPECS",
    "NormSpec",
    "norm_spec",
    "NORM_CHOICES",
    "NORM_REGISTRY",
    "POWER_VARIANTS",
    "LayerNorm",
    "MaskedBatchNorm",
    "MaskedNorm",
    "PowerNormPaper",
    "PowerNormReference",
    "PowerNormV",
    "build_norm",
    "defaults",
    "norm_family",
]
