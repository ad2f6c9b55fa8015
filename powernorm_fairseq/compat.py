"""Workarounds for fairseq-fixed 0.12.3.1 under torch >= 2.6, in one place.

:func:`install` is called when the plugin's models are imported (``--user-dir powernorm_fairseq``)
and is idempotent. It changes fairseq's behaviour in these ways only:

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
3. **No batch is dropped.** fairseq-fixed's ``data_utils.batch_by_size`` discards the last batch
   whenever its size is not a multiple of ``--required-batch-size-multiple`` (default 8), so
   validation, ``fairseq-generate`` and ``fairseq-eval-lm`` silently scored a subset. The patched
   function keeps it (upstream fairseq's behaviour).
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

import argparse
import collections
import functools
import inspect
import logging
import os
import pickle
import re
import shutil
import sys
import types
import typing
import zipfile

import numpy as np
import torch

logger = logging.getLogger(__name__)

_INSTALLED = False


class CheckpointError(ValueError):
    """A checkpoint file cannot be used; the message says which file and what to do."""


class EvaluationError(ValueError):
    """An evaluation would not score the whole split; the message says which flag to pass."""


class OptionError(ValueError):
    """A plugin option has a value it cannot take; the message names the flag / hydra key."""


def _checkpoint_safe_globals() -> list:
    """Classes a fairseq checkpoint may pickle besides tensors (configs and training state)."""
    import omegaconf
    from fairseq.distributed import utils as distributed_utils
    from omegaconf import base, nodes

    scalar_reconstruct = np.float64(0).__reduce__()[0]  # numpy scalars, e.g. the best loss
    array_reconstruct = np.zeros(1).__reduce__()[0]
    return [
        # the builtin types themselves: an omegaconf config in memory names them in its metadata
        # (object_type=dict, element_type=int, ...), and a resume on several workers sends rank 0's
        # loaded checkpoint to the others through torch.save / torch.load (fairseq's
        # _broadcast_object_slow), which met "Unsupported global: GLOBAL dict" (issue 38)
        dict, list, tuple, int, float, str, bool,
        # broadcast_object sends the tensors apart, each replaced by this placeholder (an index)
        distributed_utils._TensorPlaceholder,
        argparse.Namespace,
        collections.defaultdict,
        collections.OrderedDict,
        typing.Any,
        omegaconf.DictConfig,
        omegaconf.ListConfig,
        base.Metadata,
        base.ContainerMetadata,
        nodes.AnyNode,
        nodes.StringNode,
        nodes.IntegerNode,
        nodes.FloatNode,
        nodes.BooleanNode,
        nodes.EnumNode,
        np.dtype,
        np.ndarray,
        scalar_reconstruct,
        array_reconstruct,
        *(type(np.dtype(t)) for t in ("float64", "float32", "int64", "int32", "bool")),
    ]


def _checked_load_checkpoint_to_cpu(load):
    """Wrap ``checkpoint_utils.load_checkpoint_to_cpu`` so unreadable files raise CheckpointError."""

    @functools.wraps(load)
    def load_checkpoint_to_cpu(path, *args, **kwargs):
        try:
            state = load(path, *args, **kwargs)
        except pickle.UnpicklingError as e:
            if "Unsupported global" in str(e):
                raise CheckpointError(
                    f"checkpoint {path} holds a Python object that is not allow-listed for "
                    f"torch.load(weights_only=True) ({_first_line(e)}). If you trust the file, "
                    "allow-list that class with torch.serialization.add_safe_globals([...]) "
                    "before loading."
                ) from e
            raise CheckpointError(_corrupt_message(path, e)) from e
        except (RuntimeError, EOFError, zipfile.BadZipFile) as e:
            raise CheckpointError(_corrupt_message(path, e)) from e
        except KeyError as e:
            raise CheckpointError(
                f"{path} is not a fairseq checkpoint (it has no {e} entry): pass a checkpoint "
                "written by fairseq-train (checkpoint_*.pt) or an average of such checkpoints"
            ) from e
        if _TRAINING_LOAD.get("active") and not _TRAINING_LOAD.get("reset_optimizer") \
                and isinstance(state, dict) and state.get("average"):
            raise CheckpointError(
                f"{path} is an average of checkpoints (scripts/average_checkpoints.py, "
                "powernorm-average): it has no "
                "optimizer state and no position in the data, so training cannot resume from it. "
                "To continue the run, train from its checkpoint_last.pt; to fine-tune from the "
                "averaged weights, add --reset-optimizer --reset-dataloader --reset-meters."
            )
        return state

    return load_checkpoint_to_cpu


# Set while Trainer.load_checkpoint runs: the checkpoint being read is for training, not decoding.
_TRAINING_LOAD: dict = {}


def _first_line(e: BaseException) -> str:
    # torch's weights_only errors are long; the part from "Unsupported" says what went wrong.
    for line in str(e).splitlines():
        if "Unsupported" in line:
            return line[line.index("Unsupported"):].strip()
    return (str(e).splitlines() or [type(e).__name__])[0]


def _corrupt_message(path, e: BaseException) -> str:
    return (
        f"cannot read checkpoint {path}: it is truncated or corrupt ({type(e).__name__}: "
        f"{_first_line(e)}). This happens when a run is killed while saving. Point "
        "--restore-file/--path to another checkpoint (checkpoint_best.pt, an epoch checkpoint) "
        "or delete this file to start from scratch."
    )


PATIENCE_KEY = "powernorm_patience"  # extra_state of a checkpoint: --patience's state (item 9)


def _stop_functions() -> list:
    """fairseq's early-stopping function, which holds the patience state as attributes (``best``,
    ``num_runs``), of every loaded copy of ``fairseq_cli.train``: the imported module
    (``fairseq-train``, ``fairseq-hydra-train``) and ``__main__`` under ``python -m
    fairseq_cli.train``; none outside a training."""
    main = sys.modules.get("__main__")
    modules = [sys.modules.get("fairseq_cli.train"),
               main if getattr(getattr(main, "__spec__", None), "name", None) == "fairseq_cli.train" else None]
    found = [getattr(m, "should_stop_early", None) for m in modules]
    return [f for i, f in enumerate(found) if f is not None and f not in found[:i]]


def _patience_saved(save):
    """Wrap ``Trainer.save_checkpoint``: the checkpoint carries the patience state (item 9).
    fairseq validates and updates that state before it saves the epoch's checkpoint."""

    @functools.wraps(save)
    def save_checkpoint(self, filename, extra_state):
        for stop in _stop_functions():  # the copy that is validating is the one with a state
            if getattr(stop, "best", None) is not None:
                extra_state = {**extra_state,
                               PATIENCE_KEY: {"best": stop.best, "num_runs": getattr(stop, "num_runs", 0)}}
        return save(self, filename, extra_state)

    return save_checkpoint


def _restore_patience(extra_state) -> None:
    """Give ``should_stop_early`` the state a checkpoint saved (item 9); from a checkpoint saved
    before that, its best loss (``save_checkpoint.best``'s, the same metric) and a count of 0."""
    saved = (extra_state or {}).get(PATIENCE_KEY)
    if saved is None and (extra_state or {}).get("best") is not None:
        saved = {"best": extra_state["best"], "num_runs": 0}
    for stop in _stop_functions() if saved is not None else ():
        stop.best, stop.num_runs = saved["best"], saved["num_runs"]


def _checked_trainer_load_checkpoint(load):
    """Wrap ``Trainer.load_checkpoint``: parameters that do not fit the model raise CheckpointError."""

    @functools.wraps(load)
    def load_checkpoint(self, filename, *args, **kwargs):
        reset_optimizer = kwargs.get("reset_optimizer", args[0] if args else False)
        reset_meters = kwargs.get("reset_meters", args[3] if len(args) > 3 else False)
        _TRAINING_LOAD.update(active=True, reset_optimizer=bool(reset_optimizer))
        try:
            extra_state = load(self, filename, *args, **kwargs)
            if not (reset_optimizer or reset_meters):
                _restore_patience(extra_state)
            return extra_state
        except CheckpointError:
            raise
        except Exception as e:
            if not str(e).startswith("Cannot load model parameters"):
                raise
            cause = e.__cause__ or e.__context__ or e
            detail = " ".join(str(cause).split())  # torch lists the mismatched keys over lines
            if len(detail) > 400:
                detail = detail[:400] + " ..."
            raise CheckpointError(
                f"checkpoint {filename} does not fit the model being trained ({detail}). "
                "It was saved from another architecture or other norm options: train with the "
                "--arch and --*-norm/--pn-* options it was saved with (see its cfg.model), or "
                "start without it (other --save-dir or --restore-file, or add "
                "--reset-optimizer --reset-dataloader --reset-meters only to fine-tune a "
                "matching model)."
            ) from e
        finally:
            _TRAINING_LOAD.clear()

    return load_checkpoint


# Set while an eval-lm dataloader is built: its size filter must not drop anything.
_EVAL_LM: dict = {}


def _eval_lm_dataloader_in_full(build):
    """Wrap ``LanguageModelingTask.eval_lm_dataloader`` (fairseq-eval-lm's batches)."""

    @functools.wraps(build)
    def eval_lm_dataloader(self, dataset, *args, **kwargs):
        _EVAL_LM["active"] = True
        try:
            return build(self, dataset, *args, **kwargs)
        finally:
            _EVAL_LM.clear()

    return eval_lm_dataloader


def _filter_nothing_in_eval_lm(filter_indices):
    """Wrap ``FairseqTask.filter_indices_by_size``: under eval-lm, a dropped sample is an error."""

    @functools.wraps(filter_indices)
    def filter_indices_by_size(self, indices, dataset, max_positions=None, *args, **kwargs):
        kept = filter_indices(self, indices, dataset, max_positions, *args, **kwargs)
        if not _EVAL_LM.get("active"):
            return kept
        fix = (f"Pass --tokens-per-sample N with N <= {max_positions} (the model's max_positions; "
               "use the block length it was trained with), so that every token is scored.")
        if len(indices) == 0:
            raise EvaluationError("fairseq-eval-lm: the split has no samples, 0 tokens would be "
                                  "scored; check --gen-subset and the data directory.")
        if len(kept) < len(indices):
            raise EvaluationError(
                f"fairseq-eval-lm would skip {len(indices) - len(kept)} of {len(indices)} samples "
                f"(longer than max_positions={max_positions}) and score "
                f"{'no token' if len(kept) == 0 else 'only part of the split'}: the perplexity "
                f"would not be the split's. {fix}")
        return kept

    return filter_indices_by_size

_SIZE_MISMATCH = re.compile(
    r"size mismatch for (\S*(?:embed_tokens|output_projection)\.weight): copying a param with "
    r"shape torch\.Size\(\[(\d+), \d+\]\) from checkpoint, the shape in current model is "
    r"torch\.Size\(\[(\d+), \d+\]\)")


def _checked_load_model_ensemble_and_task(load):
    """Wrap ``checkpoint_utils.load_model_ensemble_and_task`` (generate, interactive, eval-lm):
    a checkpoint trained with a dictionary of another size raises CheckpointError."""

    @functools.wraps(load)
    def load_model_ensemble_and_task(filenames, *args, **kwargs):
        try:
            return load(filenames, *args, **kwargs)
        except RuntimeError as e:
            m = _SIZE_MISMATCH.search(str(e))
            if m is None:
                raise
            name, trained, given = m.groups()
            raise CheckpointError(
                f"checkpoint {', '.join(map(str, filenames))} was trained with a dictionary of "
                f"{trained} entries ({name}), but the data directory's dictionary has {given}: "
                "pass the data-bin the model was trained on (the same dict.*.txt)."
            ) from e

    return load_model_ensemble_and_task


class _NumpyWithCompat(types.ModuleType):
    """``numpy`` plus ``compat.long`` (removed in NumPy 2), for fairseq modules that still use it."""

    compat = types.SimpleNamespace(long=int)  # numpy 1's np.compat.long

    def __getattr__(self, name):
        return getattr(np, name)


def _corpus_bleu_of_lines(corpus_bleu):
    """``sacrebleu.corpus_bleu`` that also takes iterables of lines (files), as sacrebleu 1 did."""

    @functools.wraps(corpus_bleu)
    def wrapped(hypotheses, references, *args, **kwargs):
        if not isinstance(hypotheses, str):
            hypotheses = [h.rstrip("\n") for h in hypotheses]
        if not isinstance(references, str):
            references = [r if isinstance(r, str) else [x.rstrip("\n") for x in r]
                          for r in references]
        return corpus_bleu(hypotheses, references, *args, **kwargs)

    wrapped.powernorm = True
    return wrapped


def batch_by_size_keep_tail(
    indices,
    num_tokens_fn,
    num_tokens_vec=None,
    max_tokens=None,
    max_sentences=None,
    required_batch_size_multiple=1,
    fixed_shapes=None,
):
    """fairseq's ``data_utils.batch_by_size`` without fairseq-fixed's drop of the last batch.

    Batches are built exactly as fairseq builds them (each batch's size is a multiple of
    ``required_batch_size_multiple`` unless it is limited by ``max_tokens``); the final batch holds
    whatever is left, of any size. See fairseq's docstring for the arguments.

    Returns:
        list of ``np.ndarray`` index batches covering every index exactly once.
    """
    if fixed_shapes is not None or required_batch_size_multiple <= 1:
        # No tail is dropped on these paths.
        return _ORIGINAL["batch_by_size"](
            indices, num_tokens_fn, num_tokens_vec, max_tokens, max_sentences,
            required_batch_size_multiple, fixed_shapes,
        )
    from fairseq.data.data_utils_fast import batch_by_size_fn, batch_by_size_vec

    max_tokens = int(max_tokens) if max_tokens is not None else -1
    max_sentences = max_sentences if max_sentences is not None else -1
    if not isinstance(indices, np.ndarray):
        indices = np.fromiter(indices, dtype=np.int64, count=-1)
    if num_tokens_vec is not None and not isinstance(num_tokens_vec, np.ndarray):
        num_tokens_vec = np.fromiter(num_tokens_vec, dtype=np.int64, count=-1)
    if num_tokens_vec is None:
        return batch_by_size_fn(
            indices, num_tokens_fn, max_tokens, max_sentences, required_batch_size_multiple
        )
    return batch_by_size_vec(
        indices, num_tokens_vec, max_tokens, max_sentences, required_batch_size_multiple
    )


def _batches_as_at_epoch_one(get_batch_iterator):
    """Wrap ``FairseqTask.get_batch_iterator`` (item 10): an iterator that fairseq will reuse
    across epochs groups its batches under ``seed + 1``, as the run that started at epoch 1 did,
    whichever epoch asks for it first (a resume); then it and the dataset are set to that epoch,
    as fairseq sets them. fairseq's own call for epoch 1, a cached iterator and an iterator built
    anew each epoch go through unchanged."""
    signature = inspect.signature(get_batch_iterator)

    @functools.wraps(get_batch_iterator)
    def wrapped(self, *args, **kwargs):
        bound = signature.bind(self, *args, **kwargs)
        bound.apply_defaults()
        a = bound.arguments
        reused = (not a["disable_iterator_cache"] and not a["update_epoch_batch_itr"]
                  and self.can_reuse_epoch_itr(a["dataset"])
                  and not getattr(getattr(self, "cfg", None), "rebuild_batches", False))
        epoch = a["epoch"]
        if not reused or epoch <= 1 or a["dataset"] in self.dataset_to_epoch_iter:
            return get_batch_iterator(*bound.args, **bound.kwargs)
        a["epoch"] = 1
        itr = get_batch_iterator(*bound.args, **bound.kwargs)
        itr.epoch = epoch  # what EpochBatchIterator(epoch=epoch) sets; load_state_dict sets it again
        a["dataset"].set_epoch(epoch)
        return itr

    return wrapped


def _atomic_copy_path_manager(base: type) -> type:
    """A subclass of fairseq's ``PathManager`` whose ``copy`` to a local file is atomic."""

    class AtomicCopyPathManager(base):
        @staticmethod
        def copy(src_path: str, dst_path: str, overwrite: bool = False) -> bool:
            if not base.supports_rename(dst_path):
                return base.copy(src_path, dst_path, overwrite=overwrite)
            if not overwrite and os.path.exists(dst_path):
                return False  # iopath's answer for an existing target without overwrite
            tmp = f"{dst_path}.tmp"
            try:
                shutil.copyfile(src_path, tmp)
                os.replace(tmp, dst_path)  # atomic on one filesystem: old or new, never half
            finally:
                if os.path.exists(tmp):
                    os.remove(tmp)
            return True

    AtomicCopyPathManager.__qualname__ = f"atomic_copy({base.__qualname__})"
    return AtomicCopyPathManager


_ORIGINAL: dict = {}


def _excepthook(previous):
    def hook(exc_type, exc, tb):
        if issubclass(exc_type, (CheckpointError, EvaluationError, OptionError)):
            print(f"error: {exc}", file=sys.stderr)
        else:
            previous(exc_type, exc, tb)

    hook.powernorm = True
    return hook


def install() -> None:
    """Apply every workaround (idempotent); see the module docstring."""
    global _INSTALLED
    if _INSTALLED:
        return
    from fairseq import checkpoint_utils, trainer
    from fairseq.data import data_utils
    from fairseq.tasks.fairseq_task import FairseqTask
    from fairseq.tasks.language_modeling import LanguageModelingTask

    torch.serialization.add_safe_globals(_checkpoint_safe_globals())

    _ORIGINAL["load_checkpoint_to_cpu"] = checkpoint_utils.load_checkpoint_to_cpu
    checkpoint_utils.load_checkpoint_to_cpu = _checked_load_checkpoint_to_cpu(
        checkpoint_utils.load_checkpoint_to_cpu
    )
    _ORIGINAL["Trainer.load_checkpoint"] = trainer.Trainer.load_checkpoint
    trainer.Trainer.load_checkpoint = _checked_trainer_load_checkpoint(
        trainer.Trainer.load_checkpoint
    )
    _ORIGINAL["Trainer.save_checkpoint"] = trainer.Trainer.save_checkpoint
    trainer.Trainer.save_checkpoint = _patience_saved(trainer.Trainer.save_checkpoint)
    _ORIGINAL["FairseqTask.get_batch_iterator"] = FairseqTask.get_batch_iterator
    FairseqTask.get_batch_iterator = _batches_as_at_epoch_one(FairseqTask.get_batch_iterator)
    _ORIGINAL["batch_by_size"] = data_utils.batch_by_size
    data_utils.batch_by_size = batch_by_size_keep_tail
    _ORIGINAL["LanguageModelingTask.eval_lm_dataloader"] = LanguageModelingTask.eval_lm_dataloader
    LanguageModelingTask.eval_lm_dataloader = _eval_lm_dataloader_in_full(
        LanguageModelingTask.eval_lm_dataloader
    )
    _ORIGINAL["FairseqTask.filter_indices_by_size"] = FairseqTask.filter_indices_by_size
    FairseqTask.filter_indices_by_size = _filter_nothing_in_eval_lm(FairseqTask.filter_indices_by_size)

    _ORIGINAL["load_model_ensemble_and_task"] = checkpoint_utils.load_model_ensemble_and_task
    checkpoint_utils.load_model_ensemble_and_task = _checked_load_model_ensemble_and_task(
        checkpoint_utils.load_model_ensemble_and_task
    )
    if not hasattr(np, "compat"):  # NumPy 2
        from fairseq.data import language_pair_dataset, token_block_dataset

        for module in (token_block_dataset, language_pair_dataset):
            module.np = _NumpyWithCompat("numpy")
    import sacrebleu

    if not getattr(sacrebleu.corpus_bleu, "powernorm", False):
        _ORIGINAL["sacrebleu.corpus_bleu"] = sacrebleu.corpus_bleu
        sacrebleu.corpus_bleu = _corpus_bleu_of_lines(sacrebleu.corpus_bleu)
    _ORIGINAL["checkpoint_utils.PathManager"] = checkpoint_utils.PathManager
    checkpoint_utils.PathManager = _atomic_copy_path_manager(checkpoint_utils.PathManager)

    # On the command line a CheckpointError / EvaluationError is the whole story: print it without the traceback.
    if not getattr(sys.excepthook, "powernorm", False):
        sys.excepthook = _excepthook(sys.excepthook)
    _INSTALLED = True
