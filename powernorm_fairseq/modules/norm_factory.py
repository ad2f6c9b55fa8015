"""Turn the model config into one norm module per site (the layers' ``build_norm`` hook).

A *site* is one place a norm sits: ``self_attn``, ``cross_attn`` and ``ffn`` inside a layer,
``final`` after the last layer. The norm comes from the site's own option or, when that is
unset, from the side's ``--encoder-norm`` / ``--decoder-norm``; it is any registered norm
(:func:`~powernorm_fairseq.norms.norm_names`), and its keyword arguments come from the model
config through the norm's own ``from_options`` (:func:`~powernorm_fairseq.norms.build_norm_from_options`):
nothing here knows one norm from another.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from powernorm_fairseq.norms import build_norm_from_options, norm_names

SITES = {
    "encoder": ("self_attn", "ffn", "final"),
    "decoder": ("self_attn", "cross_attn", "ffn", "final"),
}


def norm_fields(sides=tuple(SITES), language_model: bool = False) -> dict[str, tuple[str, ...]]:
    """The norm option fields of each side (``norm`` and ``<site>_norm``), from :data:`SITES`: the
    one list of the sites; a language model's decoder has no encoder attention."""
    return {side: ("norm", *(f"{site}_norm" for site in SITES[side]
                             if not (language_model and site == "cross_attn"))) for side in sides}


def _choice(value: Any) -> str | None:
    """fairseq's ChoiceEnum members, plain strings and None, as a plain string or None."""
    return None if value is None else str(value)


def site_norm_name(cfg, side: str, site: str) -> str:
    """The norm at ``site`` of ``side``: the per-site option, else the side's option.

    Raises:
        ValueError: for an unknown side/site or a name that is not a registered norm (the
            options take any name, so that a norm registered after the options were declared
            works; the check is here).
    """
    if site not in SITES.get(side, ()):
        raise ValueError(f"unknown norm site {side}.{site}; sites are {SITES}")
    sub = getattr(cfg, side)
    name = _choice(getattr(sub, f"{site}_norm", None)) or _choice(getattr(sub, "norm", None))
    name = name or "layer"
    if name not in norm_names():
        option = f"--{side}-{site.replace('_', '-')}-norm or --{side}-norm"
        raise ValueError(
            f"{option} = {name!r} is not a norm; choose one of {', '.join(norm_names())}"
        )
    return name


def build_site_norm(cfg, side: str, site: str, num_features: int, num_heads: int) -> nn.Module:
    """Build the norm of ``site`` on ``side`` (``encoder``/``decoder``) for ``num_features`` channels.

    Every returned module is called as ``norm(x, padding_mask)`` with ``x`` of shape ``(T, B, C)``
    and ``padding_mask`` of shape ``(B, T)`` (True = pad) or None.
    """
    name = site_norm_name(cfg, side, site)
    return build_norm_from_options(name, num_features, cfg, num_heads=num_heads, final=site == "final")
