"""Inference-time transforms (pure torch): fold eval-mode batch/power norms into linear layers."""

from powernorm_fairseq.inference.fold import FoldedAffine, FoldedNorm, fold_norms

__all__ = ["FoldedAffine", "FoldedNorm", "fold_norms"]
