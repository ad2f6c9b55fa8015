"""Data: no batch dropped, fairseq-eval-lm scores every token or fails, a resumed run trains on the
batches of the run uninterrupted (items 3, 5 and 10 of :mod:`powernorm_fairseq.compat`)."""

from __future__ import annotations

import functools
import inspect

import numpy as np

from .errors import EvaluationError
from .state import EVAL_LM, ORIGINAL, PLUGIN_MODEL


def _eval_lm_dataloader_in_full(build):
    """Wrap ``LanguageModelingTask.eval_lm_dataloader`` (fairseq-eval-lm's batches)."""

    @functools.wraps(build)
    def eval_lm_dataloader(self, dataset, *args, **kwargs):
        EVAL_LM["active"] = True
        try:
            return build(self, dataset, *args, **kwargs)
        finally:
            EVAL_LM.clear()

    return eval_lm_dataloader


def _filter_nothing_in_eval_lm(filter_indices):
    """Wrap ``FairseqTask.filter_indices_by_size``: under eval-lm, a dropped sample is an error."""

    @functools.wraps(filter_indices)
    def filter_indices_by_size(self, indices, dataset, max_positions=None, *args, **kwargs):
        kept = filter_indices(self, indices, dataset, max_positions, *args, **kwargs)
        if not EVAL_LM.get("active"):
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
        return ORIGINAL["batch_by_size"](
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



def _keep_tail_for_plugin_models(*args, **kwargs):
    """``data_utils.batch_by_size`` as installed: :func:`batch_by_size_keep_tail` once one of the
    plugin's models is built in this process (training, generation and evaluation of its models),
    fairseq-fixed's own otherwise, so that fairseq's architectures under ``--user-dir`` batch as
    stock fairseq does."""
    if PLUGIN_MODEL.get("built"):
        return batch_by_size_keep_tail(*args, **kwargs)
    return ORIGINAL["batch_by_size"](*args, **kwargs)


def plugin_model_built() -> None:
    """Called by the plugin's models when they are built: the data changes apply from then on."""
    PLUGIN_MODEL["built"] = True


def install_data() -> None:
    """Wrap fairseq's batching and eval-lm's dataloader."""
    from fairseq.data import data_utils
    from fairseq.tasks.fairseq_task import FairseqTask
    from fairseq.tasks.language_modeling import LanguageModelingTask

    ORIGINAL["FairseqTask.get_batch_iterator"] = FairseqTask.get_batch_iterator
    FairseqTask.get_batch_iterator = _batches_as_at_epoch_one(FairseqTask.get_batch_iterator)
    ORIGINAL["batch_by_size"] = data_utils.batch_by_size
    data_utils.batch_by_size = _keep_tail_for_plugin_models
    ORIGINAL["LanguageModelingTask.eval_lm_dataloader"] = LanguageModelingTask.eval_lm_dataloader
    LanguageModelingTask.eval_lm_dataloader = _eval_lm_dataloader_in_full(LanguageModelingTask.eval_lm_dataloader)
    ORIGINAL["FairseqTask.filter_indices_by_size"] = FairseqTask.filter_indices_by_size
    FairseqTask.filter_indices_by_size = _filter_nothing_in_eval_lm(FairseqTask.filter_indices_by_size)
