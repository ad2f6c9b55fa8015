"""Padding-aware normalization layers for (T, B, C) transformer activations. Pure torch.

Every layer is called as ``norm(x, padding_mask=None)`` with ``x: (T, B, C)`` (or ``(N, C)``) and
``padding_mask: (B, T)`` bool, True = pad. Build one by name::

    >>> from powernorm_fairseq.norms import build_norm
    >>> norm = build_norm("power", 512, variant="reference", group_num=4)

Every norm is one module of this package that registers its class with
:func:`~powernorm_fairseq.norms.registry.register_norm`; importing the package imports each
module (the paper's norms first, then any other, as fairseq imports its models), so a new norm
is one module and its one registration. This package never imports fairseq.
"""

from __future__ import annotations

import importlib
import pkgutil

from . import defaults
from .base import MaskedNorm, set_num_updates

# the paper's norms, registered in the paper's order; every other module after them
# isort: off
from .layer_norm import LayerNorm
from .batch_norm import MaskedBatchNorm
from .power_norm import PowerNormPaper, PowerNormReference, PowerNormV
# isort: on
from .registry import (
    build_norm,
    build_norm_from_options,
    norm_class,
    norm_configs,
    norm_family,
    norm_names,
    norm_variants,
    register_norm,
    unregister_norm,
)

# not norms (helpers of the norm modules) and the modules imported above
_NOT_NORMS = {"autograd", "base", "defaults", "distributed", "functional", "fused", "registry"}
for _module in pkgutil.iter_modules(__path__):
    if not _module.name.startswith("_") and _module.name not in _NOT_NORMS:
        importlib.import_module(f"{__name__}.{_module.name}")

#: The paper's four families: the names of its tables, in its order (every registered name:
#: :func:`norm_names`).
NORM_CHOICES = ("layer", "batch", "power_v", "power")
#: family -> the class ``build_norm(name, C)`` builds, for the paper's families (for ``power``
#: the default variant's; ``variant=`` selects the other, :func:`norm_variants`).
NORM_REGISTRY: dict[str, type[MaskedNorm]] = {name: norm_class(name) for name in NORM_CHOICES}
#: ``variant`` -> class of the ``"power"`` norm
POWER_VARIANTS = {variant: norm_class("power", variant) for variant in norm_variants("power")}

__all__ = [
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
    "build_norm_from_options",
    "defaults",
    "norm_class",
    "norm_configs",
    "norm_family",
    "norm_names",
    "norm_variants",
    "register_norm",
    "set_num_updates",
    "unregister_norm",
]
