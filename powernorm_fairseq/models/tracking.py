"""``--track-norm-stats``: attach the statistics tracker when training starts.

The tracker is attached on the model's first ``set_num_updates`` call, which only fairseq's
training loop makes (before the first training forward, and when a checkpoint is restored).
Attaching in ``build_model`` would also fire in ``fairseq-generate`` / ``fairseq-eval-lm``, which
rebuild the model from the checkpoint's config and would then overwrite the training log.
"""

from __future__ import annotations


class NormTrackingMixin:
    """Mixin for fairseq models whose config has ``track_norm_stats`` / ``track_norm_layers``.

    Subclasses call :meth:`_init_norm_tracking` in ``__init__`` and may override
    ``default_tracked_layer`` (the module tracked when ``--track-norm-layers`` is not given).
    """

    default_tracked_layer = "encoder.layers.0.self_attn_layer_norm"

    def _init_norm_tracking(self, cfg) -> None:
        self._track_norm_stats = getattr(cfg, "track_norm_stats", None) or None
        self._track_norm_layers = getattr(cfg, "track_norm_layers", None) or self.default_tracked_layer
        self._norm_tracking_started = False
        self.norm_tracker = None

    def set_num_updates(self, num_updates):
        if self._track_norm_stats and not self._norm_tracking_started:
            self._norm_tracking_started = True
            # Imported only when asked for: the analysis package is not needed otherwise.
            from powernorm_fairseq.analysis.tracking import attach_tracker

            # num_updates is the restored update count (0 for a new run): it decides whether an
            # existing file is this run's, to be continued, or another run's, to be refused.
            self.norm_tracker = attach_tracker(self, self._track_norm_stats, self._track_norm_layers,
                                               start_step=int(num_updates))
        super().set_num_updates(num_updates)
