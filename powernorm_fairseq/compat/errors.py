"""The plugin's own errors: each message names the file, flag or key and what to do; on the command
line only the message is printed (:func:`~powernorm_fairseq.compat.checkpoints.excepthook`)."""

from __future__ import annotations


class CheckpointError(ValueError):
    """A checkpoint file cannot be used; the message says which file and what to do."""


class EvaluationError(ValueError):
    """An evaluation would not score the whole split; the message says which flag to pass."""


class OptionError(ValueError):
    """A plugin option has a value it cannot take; the message names the flag / hydra key."""

