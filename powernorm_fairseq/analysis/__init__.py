"""The paper's analyses as tools: statistics tracking during training (Figs. 2-4), the statistics
batch-size sweep (Fig. 5), embedding spectra (Fig. 6) and their plots.

``tracking`` and ``spectrum`` are pure torch; ``plots`` needs matplotlib and is imported only by
the CLI scripts in ``analysis/`` at the repository root.
"""

from powernorm_fairseq.analysis.tracking import attach_tracker

__all__ = ["attach_tracker"]
