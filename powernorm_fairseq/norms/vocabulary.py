"""The one vocabulary of the compared norms: short names, registry names, variants and labels.

Every table of norms in the project (pipeline, presets, sweep, plots, benchmarks, results) reads
:data:`NORM_SPECS`; nothing else spells these names out. Pure data, no torch.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class NormSpec:
    """One compared norm.

    Attributes:
        short: the short name of presets and scripts (``configs/<experiment>_<short>.yaml``).
        name: the :func:`~powernorm_fairseq.norms.build_norm` name, which is also the fairseq
            ``--encoder-norm`` / ``--decoder-norm`` value.
        variant: the PowerNorm variant (``--pn-variant``), or None for the other families.
        label: how tables and plots name it.
        short_label: a compact label for narrow table columns and legends.
    """

    short: str
    name: str
    variant: str | None
    label: str
    short_label: str


#: The compared norms, in the paper's table order.
NORM_SPECS: tuple[NormSpec, ...] = (
    NormSpec("ln", "layer", None, "LN", "LN"),
    NormSpec("bn", "batch", None, "BN", "BN"),
    NormSpec("pnv", "power_v", None, "PN-V", "PN-V"),
    NormSpec("pn", "power", "reference", "PN (reference variant)", "PN"),
    NormSpec("pnpaper", "power", "paper", "PN (paper variant)", "PN-paper"),
)
#: short name -> spec
NORM_BY_SHORT: dict[str, NormSpec] = {s.short: s for s in NORM_SPECS}
#: the short names, in order
NORM_SHORTS: tuple[str, ...] = tuple(NORM_BY_SHORT)


def norm_spec(short: str) -> NormSpec:
    """The spec of a short name; raises ValueError naming the choices for an unknown one."""
    try:
        return NORM_BY_SHORT[short]
    except KeyError:
        raise ValueError(f"unknown norm {short!r}; choose one of {list(NORM_SHORTS)}") from None
