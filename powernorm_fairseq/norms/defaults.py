"""Every default of the norms' options, written once; the layers and the fairseq options read it.

Two columns, because two audiences (``docs/norm_defaults.md`` is the table, with the reasons):

- the *layer* defaults: what :func:`~powernorm_fairseq.norms.build_norm` and the classes use for
  an option that is not given (torch's BN momentum, the paper's Algorithm 2);
- the *fairseq* defaults of ``--pn-*`` / ``--bn-*``: the released code's recipe, which the
  presets reproduce. Only where they differ from the layer's is there a ``FAIRSEQ_`` constant;
  every other fairseq option defaults to the layer's value.

Pure data, no torch.
"""

from __future__ import annotations

#: added to the variance-like statistic before the square root (every family)
EPS = 1e-5
#: BN / PN-V running-statistic momentum (torch.nn.BatchNorm1d's)
MOMENTUM = 0.1
#: PN's forward (running psi^2) and backward (nu / ema_gz) EMA factors
ALPHA_FWD = 0.9
ALPHA_BKW = 0.9
#: PN warmup (PN-V steps before PN)
WARMUP_UPDATES = 0
#: what PN's ``warmup_updates`` counts, both variants: optimizer updates (told by
#: ``set_num_updates``, as fairseq does), or training forward calls (the released code's count)
WARMUP_UNITS = ("updates", "forwards")
WARMUP_UNIT = "updates"
#: training forwards after which a PN that counts its warmup in updates, and was never told one,
#: warns (once) that its warmup cannot end
UNTOLD_WARN_AFTER = 100
#: the PN variant of ``build_norm("power", C)``: Algorithm 2 of the paper
PN_VARIANT = "paper"
#: GroupScaling groups of each PN variant (0 = off, 1 = one group over all channels)
PAPER_GROUP_NUM = 0
REFERENCE_GROUP_NUM = 1
#: the paper PN's step scaling where the nu recurrence would not contract
SAFEGUARD = True
#: BN's treatment of pad rows in the batch statistics: "masked" excludes them; "released" is
#: the released MaskSyncBatchNorm's (pad rows replaced by the mean of the real rows, then
#: statistics over all T*B rows: the mean is exact, the variance diluted by N_real / (T*B))
BN_PAD_STATISTICS = ("masked", "released")
PAD_STATISTICS = "masked"

#: Dynamic Tanh's initial alpha: the authors' value for models other than LLMs
DYT_ALPHA_INIT = 0.5

#: ``--pn-variant``: the released code, which the presets reproduce
FAIRSEQ_PN_VARIANT = "reference"
#: ``--bn-momentum``: the released MaskSyncBatchNorm's
FAIRSEQ_BN_MOMENTUM = 0.05
#: ``--pn-group-num`` sentinel: the attention heads for the reference variant (as the released
#: transformer builds it), the paper variant's :data:`PAPER_GROUP_NUM` for the paper variant
GROUP_NUM_AUTO = -1
#: ``--pn-group-num`` sentinel: the attention heads, for any norm that takes GroupScaling groups
#: (PN-V, both PN variants, GroupScaling alone)
GROUP_NUM_HEADS = -2
#: ``--pn-final-warmup-updates`` sentinel: the same as ``--pn-warmup-updates``
FINAL_WARMUP_INHERIT = -1
