"""What the statistics tracker reads of one norm layer: its name, its kind, its pre-scaled non-pad
input, the distances and token norms it logs (:mod:`powernorm_fairseq.analysis.tracking`)."""

from __future__ import annotations

import math
import re
from collections.abc import Iterable

import torch
from torch import Tensor, nn

from powernorm_fairseq.norms import MaskedNorm, norm_family
from powernorm_fairseq.norms.autograd import PRESCALE_EPS
from powernorm_fairseq.norms.functional import group_rms_scale

#: tracked statistic -> its key in :meth:`MaskedNorm.running_statistics`
_RUNNING_KEYS = {"mu": "mean", "var": "var", "psi2": "psi2"}


def _canonical_name(name: str) -> str:
    """``encoder.layers[0].x`` -> ``encoder.layers.0.x`` (both spellings are accepted)."""
    return re.sub(r"\[(\d+)\]", r".\1", name.strip())


def _norm_kind(module: nn.Module) -> str:
    """Registry name of ``module`` (``layer``/``batch``/``power_v``/``power``, where ``power``
    covers both PN variants), ``layer`` for a torch/fairseq LayerNorm, else its class name."""
    family = norm_family(module)
    if family is not None:
        return family
    if isinstance(module, nn.LayerNorm) or type(module).__name__ == "LayerNorm":
        return "layer"
    return type(module).__name__


def _non_pad(t: Tensor, padding_mask: Tensor | None) -> Tensor:
    """Rows of the non-pad tokens as float32.

    Args:
        t: (T, B, C) or (N, C).
        padding_mask: (B, T) (or (N,) for 2-D ``t``) bool, True = pad, or None (all real).

    Returns:
        (B_real, C) float32, detached.
    """
    t = t.detach()
    if padding_mask is not None:
        keep = ~padding_mask.to(torch.bool)
        t = t[keep.t()] if t.dim() == 3 else t[keep]
    return t.reshape(-1, t.shape[-1]).float()


def _prescaled(module: nn.Module, x: Tensor) -> Tensor:
    """The input the layer's statistics are taken over: ``x``, or ``x`` after the per-token RMS
    pre-scaling over ``module.prescale_groups()`` channel groups (1 for BN's LayerScaling),
    ``x_g / sqrt(mean_{c in g} x_c^2 + 1e-5)``."""
    group_num = module.prescale_groups() if isinstance(module, MaskedNorm) else 0
    if not group_num:
        return x
    return group_rms_scale(x.detach().float(), group_num, PRESCALE_EPS)


def _dist(a: Tensor, b: Tensor) -> float:
    """(1/d) ||a - b||_2 for vectors of length d."""
    return (a - b).norm().item() / a.numel()


def _mean_token_norm(v: Tensor) -> float:
    """(1/B) sum_i (1/d) ||v_i||_2 for v of shape (B, d)."""
    return (v.norm(dim=1).mean() / v.shape[1]).item()


class _LayerState:
    """What the hooks of one tracked layer need between forward and backward."""

    def __init__(self, name: str, module: nn.Module, shadow_momentum: float) -> None:
        self.name = name
        self.module = module
        self.kind = _norm_kind(module)
        self.momentum = shadow_momentum
        self.shadow: dict[str, Tensor] = {}
        self.micro = 0
        self.next_step = 0
        self.last_step: int | None = None
        self.before: dict[str, Tensor] = {}
        self.x: Tensor | None = None
        self.mask: Tensor | None = None
        self.rows = 0  # rows of the input, pads included
        self.pending: dict | None = None

    def running(self, stat: str) -> Tensor | None:
        """The layer's own running statistic ``stat`` as a float32 (C,) copy, or None."""
        if not isinstance(self.module, MaskedNorm):
            return None
        value = self.module.running_statistics().get(_RUNNING_KEYS[stat])
        return None if value is None else value.detach().reshape(-1).float().clone()


def _fmt(v) -> str | int:
    """Compact CSV cell: ints as is, floats with 6 significant digits."""
    if isinstance(v, float):
        return "nan" if math.isnan(v) else f"{v:.6g}"
    return v


def _find_layers(model: nn.Module, layer_names: Iterable[str]) -> dict[str, nn.Module]:
    named = dict(model.named_modules())
    found = {}
    for raw in layer_names:
        name = _canonical_name(raw)
        if name not in named:
            norms = [n for n, m in named.items() if n and ("norm" in n.lower() or "norm" in type(m).__name__.lower())]
            raise ValueError(
                f"no module named {raw!r} to track; norm layers in this model: "
                f"{', '.join(norms[:12]) or '(none)'}{' ...' if len(norms) > 12 else ''}"
            )
        found[name] = named[name]
    return found

