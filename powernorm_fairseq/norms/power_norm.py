"""The PowerNorm family: PN-V and the two PN variants, one module each.

- :mod:`.power_norm_v`: :class:`PowerNormV` (``"power_v"``), the batch quadratic mean.
- :mod:`.power_norm_paper`: :class:`PowerNormPaper` (``variant="paper"``), Algorithm 2.
- :mod:`.power_norm_reference`: :class:`PowerNormReference` (``variant="reference"``), the
  released code.
"""

from __future__ import annotations

from .base import MaskedNorm
from .power_norm_paper import PowerNormPaper
from .power_norm_reference import PowerNormReference
from .power_norm_v import PowerNormV

__all__ = ["POWER_VARIANTS", "PowerNormPaper", "PowerNormReference", "PowerNormV", "power_norm"]


#: ``variant`` names of :func:`power_norm`.
POWER_VARIANTS = {"paper": PowerNormPaper, "reference": PowerNormReference}


def power_norm(num_features: int, variant: str = "paper", **kwargs) -> MaskedNorm:
    """Build PN: ``variant="paper"`` (Algorithm 2, :class:`PowerNormPaper`) or ``"reference"``
    (the released code, :class:`PowerNormReference`); ``kwargs`` go to that class."""
    if variant not in POWER_VARIANTS:
        raise ValueError(f"unknown PowerNorm variant {variant!r}; choose one of "
                         f"{sorted(POWER_VARIANTS)}")
    return POWER_VARIANTS[variant](num_features, **kwargs)
