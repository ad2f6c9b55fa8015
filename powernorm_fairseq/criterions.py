"""``label_smoothed_cross_entropy_uniform``: label smoothing as in the released program.

fairseq up to 0.9 (the paper's fork is 0.8) spreads the smoothing mass over all ``V`` classes,
the target included (Szegedy et al. 2016):

.. math::
    \\ell = (1 - \\epsilon)\\,\\mathrm{nll} + \\frac{\\epsilon}{V} \\sum_{v} -\\log p_v

fairseq >= 0.10 spreads it over the ``V - 1`` other classes
(``(1 - eps - eps/(V-1)) nll + eps/(V-1) sum_v -log p_v``). With ``V`` = 10k the two targets differ
by ``eps/V`` = 1e-5 per class; the IWSLT14 presets use this criterion so that the training
objective is the released one exactly (``results/equivalence/README.md``). Options are those of
fairseq's ``label_smoothed_cross_entropy``.
"""

from __future__ import annotations

from dataclasses import dataclass

from fairseq.criterions import register_criterion
from fairseq.criterions.label_smoothed_cross_entropy import (
    LabelSmoothedCrossEntropyCriterion,
    LabelSmoothedCrossEntropyCriterionConfig,
)
from torch import Tensor


def uniform_label_smoothed_nll_loss(lprobs: Tensor, target: Tensor, epsilon: float,
                                    ignore_index: int | None = None, reduce: bool = True):
    """``((1 - eps) nll + eps/V * sum_v -log p_v, nll)`` with pads (``ignore_index``) zeroed.

    Shape: lprobs ``(N, V)`` log-probabilities; target ``(N,)`` or ``(N, 1)``. Returns sums when
    ``reduce``, else ``(N, 1)`` tensors.
    """
    if target.dim() == lprobs.dim() - 1:
        target = target.unsqueeze(-1)
    nll_loss = -lprobs.gather(dim=-1, index=target)
    smooth_loss = -lprobs.sum(dim=-1, keepdim=True)
    if ignore_index is not None:
        pad_mask = target.eq(ignore_index)
        nll_loss = nll_loss.masked_fill(pad_mask, 0.0)
        smooth_loss = smooth_loss.masked_fill(pad_mask, 0.0)
    if reduce:
        nll_loss, smooth_loss = nll_loss.sum(), smooth_loss.sum()
    eps_i = epsilon / lprobs.size(-1)
    return (1.0 - epsilon) * nll_loss + eps_i * smooth_loss, nll_loss


@dataclass
class UniformLabelSmoothingConfig(LabelSmoothedCrossEntropyCriterionConfig):
    """The options of fairseq's ``label_smoothed_cross_entropy``."""


@register_criterion("label_smoothed_cross_entropy_uniform", dataclass=UniformLabelSmoothingConfig)
class UniformLabelSmoothedCrossEntropyCriterion(LabelSmoothedCrossEntropyCriterion):
    """fairseq's label-smoothed cross entropy with the smoothing mass over all ``V`` classes."""

    def compute_loss(self, model, net_output, sample, reduce=True):
        lprobs, target = self.get_lprobs_and_target(model, net_output, sample)
        return uniform_label_smoothed_nll_loss(lprobs, target, self.eps,
                                               ignore_index=self.padding_idx, reduce=reduce)
