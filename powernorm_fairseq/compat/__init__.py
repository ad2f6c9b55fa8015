"""fairseq-fixed 0.12.3.1 under torch >= 2.6, NumPy 2 and sacrebleu 2: every patch, in one place.

:func:`install` runs when the plugin's models are imported (``--user-dir powernorm_fairseq``) and
is idempotent. It applies two kinds of patch (``docs/fairseq.md`` lists each with its reason):

- **shims** (:mod:`.shims`: items 1, 7, 8) make fairseq-fixed work at all under the current
  torch, NumPy and sacrebleu; they change nothing fairseq computes;
- **changes of behaviour**, each a fix of a fault with its test: clear errors (items 2, 5, 6:
  :mod:`.checkpoints`, :mod:`.data`), robust checkpoints (items 4, 9, 10), and one change of
  what a model trains on, applied to the plugin's own models only: no batch dropped (item 3,
  from the first build of a plugin model in the process; fairseq's own architectures under
  ``--user-dir powernorm_fairseq`` batch as stock fairseq does, bit for bit).

The plugin's errors are :mod:`.errors` (:class:`OptionError` for the options).

1. **Checkpoints load under torch's ``weights_only`` default.** torch >= 2.6 refuses to unpickle
   anything but tensors and containers; fairseq checkpoints also hold the training configuration
   (``argparse.Namespace``, omegaconf containers, enums, numpy scalars), so resuming and
   ``fairseq-generate --path`` failed with ``UnpicklingError``. The classes that make up a fairseq
   checkpoint are allow-listed with ``torch.serialization.add_safe_globals`` (no code from the file
   runs; no environment variable is involved).
2. **Unreadable checkpoints fail with one clear message** (:class:`CheckpointError`, a
   ``ValueError``): a truncated or corrupt file, a file holding a non-allow-listed object, or a
   checkpoint whose parameters do not fit the model being trained (another architecture or other
   norms). The message names the file and what to do; on the command line only the message is
   printed, not the stack trace. Training refuses to resume from an average of checkpoints
   (``scripts/average_checkpoints.py`` marks it with an ``average`` field and leaves out the
   optimizer state and data position) unless ``--reset-optimizer`` asks for a fresh optimizer.
3. **No batch is dropped** (the plugin's models). fairseq-fixed's ``data_utils.batch_by_size``
   discards the last batch whenever its size is not a multiple of ``--required-batch-size-multiple``
   (default 8), so validation, ``fairseq-generate`` and ``fairseq-eval-lm`` silently scored a
   subset (and training skipped those sentences). Once a plugin model is built, the patched
   function keeps it (upstream fairseq's behaviour); for fairseq's own architectures it is
   fairseq-fixed's.
4. **Checkpoint copies are atomic.** fairseq writes a checkpoint once (to a temporary file, then
   renamed) and *copies* it to the other names it saves at that point, ``checkpoint_last.pt``
   included, with a plain ``shutil.copyfile``. A run killed during that copy left a truncated
   ``checkpoint_last.pt``, the very file a resume reads. The copy now goes to ``<name>.tmp`` and is
   renamed over the target, so the target holds either the old or the new checkpoint, whole.
   Only the ``PathManager`` seen by ``fairseq.checkpoint_utils`` is replaced (a subclass); remote
   paths, which cannot be renamed, keep fairseq's copy.
5. **fairseq-eval-lm scores every token or fails.** It drops every sample longer than the model's
   ``max_positions`` with a warning ("N samples have invalid sizes and will be skipped"); left at
   fairseq's default ``--tokens-per-sample 1024``, a model trained on shorter blocks scored 0
   tokens and reported perplexity 1.00 with exit 0. While ``LanguageModelingTask``'s
   ``eval_lm_dataloader`` (used by fairseq-eval-lm only) builds its batches, a skipped sample or an
   empty split raises :class:`EvaluationError` naming ``--tokens-per-sample``.
6. **A checkpoint used with another dictionary fails with one clear message.** ``fairseq-generate``
   / ``-interactive`` / ``-eval-lm`` on a data directory whose dictionary differs in size from
   the one the model was trained with raised torch's multi-line ``size mismatch`` error; it is
   now a :class:`CheckpointError` naming both sizes and the fix.
7. **NumPy 2.** fairseq's ``TokenBlockDataset`` (``--sample-break-mode eos``) and the bucketing
   of ``LanguagePairDataset`` use ``np.compat.long``, which NumPy 2 removed. Those two fairseq
   modules get a ``numpy`` that also has ``compat.long`` (= ``int``, NumPy 1's value); numpy itself
   is not changed.
8. **sacrebleu >= 2.** ``fairseq-score --sacrebleu`` passes open files to ``sacrebleu.corpus_bleu``,
   which sacrebleu 2 refuses ("refs should be a sequence of strings"). ``corpus_bleu`` accepts any
   iterable of lines again (read into lists, newlines stripped). ``fairseq-score`` has no
   ``--user-dir``: run it as ``python -m powernorm_fairseq.score`` (same arguments).
9. **Early stopping counts across a resume.** fairseq keeps ``--patience``'s state (the best
   validation loss and the validations since it, attributes of ``fairseq_cli.train.
   should_stop_early``) in the process only. A resumed run started counting again and took its
   first validation's loss as the best, even when an earlier one was better, so it trained longer
   than the same run uninterrupted. Every checkpoint now carries that state
   (``extra_state["powernorm_patience"]``) and loading one for training restores it, under the
   condition fairseq restores ``save_checkpoint.best`` (no ``--reset-optimizer`` /
   ``--reset-meters``). A checkpoint saved before this restores the best loss it recorded and
   counts from 0 since it: the run stops at most as many epochs late as it had gone without a
   better loss when it was saved.
10. **A resumed run trains on the batches of the run uninterrupted.** fairseq-fixed's
    ``FairseqTask.get_batch_iterator`` groups the sentences into batches once, under the seed
    ``seed + epoch`` of the epoch at which the iterator is first built, and reuses those batches
    (reshuffled per epoch) for the rest of the process. A run builds it at epoch 1; a run resumed
    at epoch N built it at N, so every batch after a resume held other sentences than in the run
    uninterrupted (measured: the first update of epoch 3 had loss 5.222 instead of 5.207 on a tiny
    corpus). A reusable iterator is now always built as at epoch 1, then set to its epoch; an
    iterator built anew every epoch (``--rebuild-batches``, sharded data) is left as it was.

Bad plugin options (:class:`OptionError`, a ``ValueError``, raised by the models' option checks)
are printed like a :class:`CheckpointError`: the message only.

Two further constraints are respected by the plugin's code rather than patched: fairseq's
``TransformerConfig`` uses its sub-config *classes* as defaults, so the plugin never writes to a
default-constructed ``TransformerConfig().encoder`` (its own config builds instances); and
fairseq-fixed's speech modules pull in torchaudio, which does not load against this torch, so the
plugin never imports ``fairseq.data.audio``, ``fairseq.models.speech_*`` or ``examples.speech_*``.
``fairseq-hydra-train`` is wrapped separately by :mod:`powernorm_fairseq.hydra_train`.
"""

from __future__ import annotations

from .checkpoints import install_checkpoints
from .data import (
    _filter_nothing_in_eval_lm,
    batch_by_size_keep_tail,
    install_data,
    plugin_model_built,
)
from .errors import CheckpointError, EvaluationError, OptionError
from .shims import install_shims
from .state import EVAL_LM as _EVAL_LM  # noqa: F401  (read by the tests)
from .state import ORIGINAL as _ORIGINAL  # noqa: F401  (fairseq's originals, for comparisons)

_INSTALLED = False


def install() -> None:
    """Apply every shim and change (idempotent); see the module docstring."""
    global _INSTALLED
    if _INSTALLED:
        return
    install_shims()
    install_checkpoints()
    install_data()
    _INSTALLED = True


__all__ = ["CheckpointError", "EvaluationError", "OptionError", "_filter_nothing_in_eval_lm",
           "batch_by_size_keep_tail", "install", "plugin_model_built"]
