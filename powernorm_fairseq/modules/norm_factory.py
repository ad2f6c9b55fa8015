"""Turn the model config into one norm module per site (the layers' ``build_norm`` hook).

A *site* is one place a norm sits: ``self_attn``, ``cross_attn`` and ``ffn`` inside a layer,
``final`` after the last layer. The family comes from the site's own option or, when that is
unset, from the side's ``--encoder-norm`` / ``--decoder-norm``; the family's keyword arguments
come from the shared ``--pn-*`` / ``--bn-*`` options (see :mod:`powernorm_fairseq.models.pn_config`).
"""

from __future__ import annotations

from typing import Any

from torch import nn

from powernorm_fairseq.norms import NORM_CHOICES, build_norm, defaults

SITES = {
    "encoder": ("self_attn", "ffn", "final"),
    "decoder": ("self_attn", "cross_attn", "ffn", "final"),
}


def _choice(value: Any) -> str | None:
    """fairseq's ChoiceEnum members, plain strings and None, as a plain string or None."""
    return None if value is None else str(value)


def site_norm_name(cfg, side: str, site: str) -> str:
    """The norm family at ``site`` of ``side``: the per-site option, else the side's option.

    Raises:
        ValueError: for an unknown side/site or a family that is not in ``NORM_CHOICES`` (hydra
            configs of ``transformer_pn`` are not type-checked, so the check is repeated here).
    """
    if site not in SITES.get(side, ()):
        raise ValueError(f"unknown norm site {side}.{site}; sites are {SITES}")
    sub = getattr(cfg, side)
    name = _choice(getattr(sub, f"{site}_norm", None)) or _choice(getattr(sub, "norm", None))
    name = name or "layer"
    if name not in NORM_CHOICES:
        option = f"--{side}-{site.replace('_', '-')}-norm or --{side}-norm"
        raise ValueError(
            f"{option} = {name!r} is not a norm; choose one of {', '.join(NORM_CHOICES)}"
        )
    return name


def norm_kwargs(cfg, name: str, num_heads: int, final: bool = False) -> dict[str, Any]:
    """Keyword arguments of :func:`~powernorm_fairseq.norms.build_norm` for family ``name``.

    Args:
        cfg: a :class:`~powernorm_fairseq.models.pn_config.TransformerPNConfig`.
        name: the family (``layer``, ``batch``, ``power_v``, ``power``).
        num_heads: attention heads of the side, the default ``group_num`` of the reference PN.
        final: the site is an encoder/decoder output norm (``--pn-final-warmup-updates``).
    """
    if name == "layer":
        return {}
    kwargs: dict[str, Any] = {"sync_stats": bool(cfg.norm_sync_stats)}
    if name in ("batch", "power_v"):
        kwargs["momentum"] = float(cfg.bn_momentum)
        if name == "batch":
            kwargs["prescale"] = bool(cfg.bn_prescale)
            kwargs["pad_statistics"] = _choice(cfg.bn_pad_statistics)
        return kwargs
    variant = _choice(cfg.pn_variant)  # build_norm rejects unknown variants, listing the choices
    group_num = int(cfg.pn_group_num)
    if group_num == defaults.GROUP_NUM_AUTO:
        group_num = num_heads if variant == "reference" else defaults.PAPER_GROUP_NUM
    warmup = int(cfg.pn_warmup_updates)
    if final and int(cfg.pn_final_warmup_updates) >= 0:
        warmup = int(cfg.pn_final_warmup_updates)
    kwargs.update(
        variant=variant,
        alpha_fwd=float(cfg.pn_alpha_fwd),
        alpha_bkw=float(cfg.pn_alpha_bkw),
        warmup_updates=warmup,
        group_num=group_num,
    )
    return kwargs


def build_site_norm(cfg, side: str, site: str, num_features: int, num_heads: int) -> nn.Module:
    """Build the norm of ``site`` on ``side`` (``encoder``/``decoder``) for ``num_features`` channels.

    Every returned module is called as ``norm(x, padding_mask)`` with ``x`` of shape ``(T, B, C)``
    and ``padding_mask`` of shape ``(B, T)`` (True = pad) or None.
    """
    name = site_norm_name(cfg, side, site)
    return build_norm(name, num_features, **norm_kwargs(cfg, name, num_heads, site == "final"))
