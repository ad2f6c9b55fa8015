"""The PowerNorm family: PN-V and the two PN variants, one module each.

- :mod:`.power_norm_v`: :class:`PowerNormV` (``"power_v"``), the batch quadratic mean.
- :mod:`.power_norm_paper`: :class:`PowerNormPaper` (``variant="paper"``), Algorithm 2.
- :mod:`.power_norm_reference`: :class:`PowerNormReference` (``variant="reference"``), the
  released code.
"""

from __future__ import annotations

# PN-V first: the registry keeps the paper's order (power_v, then power)
# isort: off
from .power_norm_v import PowerNormV
from .power_norm_paper import PowerNormPaper
from .power_norm_reference import PowerNormReference
# isort: on

__all__ = ["PowerNormPaper", "PowerNormReference", "PowerNormV"]
