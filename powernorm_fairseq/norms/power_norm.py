"""The PowerNorm family: PN-V and the two PN variants, one module each.

- :mod:`.power_norm_v`: :class:`PowerNormV` (``"power_v"``), the batch quadratic mean.
- :mod:`.power_norm_paper`: :class:`PowerNormPaper` (``variant="paper"``), Algorithm 2.
- :mod:`.power_norm_reference`: :class:`PowerNormReference` (``variant="reference"``), the
  released code.
"""

from __future__ import annotations

from .power_norm_paper import PowerNormPaper
from .power_norm_reference import PowerNormReference
from .power_norm_v import PowerNormV

#: ``variant`` -> class of the ``"power"`` alias of :func:`~powernorm_fairseq.norms.build_norm`.
POWER_VARIANTS = {"paper": PowerNormPaper, "reference": PowerNormReference}

__all__ = ["POWER_VARIANTS", "PowerNormPaper", "PowerNormReference", "PowerNormV"]
