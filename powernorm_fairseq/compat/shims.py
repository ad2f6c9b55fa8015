"""Shims: fairseq-fixed working under torch >= 2.6, NumPy 2 and sacrebleu >= 2, with no change of
what it computes (items 1, 7 and 8 of :mod:`powernorm_fairseq.compat`)."""

from __future__ import annotations

import argparse
import collections
import functools
import types
import typing

import numpy as np
import torch

from .state import ORIGINAL


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



def install_shims() -> None:
    """Allow-list a checkpoint's classes; give fairseq's two datasets ``np.compat``; let
    ``sacrebleu.corpus_bleu`` take lines again."""
    torch.serialization.add_safe_globals(_checkpoint_safe_globals())
    if not hasattr(np, "compat"):  # NumPy 2
        from fairseq.data import language_pair_dataset, token_block_dataset

        for module in (token_block_dataset, language_pair_dataset):
            module.np = _NumpyWithCompat("numpy")
    import sacrebleu

    if not getattr(sacrebleu.corpus_bleu, "powernorm", False):
        ORIGINAL["sacrebleu.corpus_bleu"] = sacrebleu.corpus_bleu
        sacrebleu.corpus_bleu = _corpus_bleu_of_lines(sacrebleu.corpus_bleu)
