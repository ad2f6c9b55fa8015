r"""Singular-value spectrum of a checkpoint's word-embedding matrix (Fig. 6 of the paper).

For an embedding matrix :math:`E \in \mathbb{R}^{V \times d}` with singular values
:math:`s_1 \ge s_2 \ge \dots \ge s_{\min(V, d)}`, the normalized spectrum is :math:`s_k / s_1`
(so the largest is 1). A spectrum that decays fast means the embeddings occupy a narrow cone
("representation degeneration", Gao et al. 2019); the paper reads PN's slower decay as less
degeneration than LN's. Pure torch; fairseq is needed only to unpickle a fairseq checkpoint's
config objects, which ``torch.load`` imports on demand.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import torch
from torch import Tensor

__all__ = ["EMBEDDING_KEYS", "load_embedding", "normalized_spectrum"]

# Shared embeddings (--share-all-embeddings) are stored under both names; the encoder's is the
# source side otherwise. A language model has only the decoder's.
EMBEDDING_KEYS: tuple[str, ...] = ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight")


def load_embedding(path: str | os.PathLike, key: str | None = None) -> tuple[Tensor, str]:
    """Read the word-embedding matrix of a fairseq checkpoint.

    Args:
        path: a fairseq checkpoint (a dict with a ``model`` state dict) or a bare state dict,
            saved with ``torch.save``.
        key: state-dict key of the matrix. Default: the first of :data:`EMBEDDING_KEYS` present.

    Returns:
        (weight, key): the (V, d) matrix as float64 on the CPU, and the key it was read from.
    """
    # weights_only=False: fairseq checkpoints pickle argparse/omegaconf config objects.
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    state = ckpt.get("model", ckpt) if isinstance(ckpt, Mapping) else None
    if not isinstance(state, Mapping):
        raise ValueError(f"{path}: not a fairseq checkpoint or state dict (got {type(ckpt).__name__})")
    keys = (key,) if key else EMBEDDING_KEYS
    for k in keys:
        if k in state:
            weight = state[k]
            if not isinstance(weight, Tensor) or weight.dim() != 2:
                raise ValueError(f"{path}: {k} is not a 2-D tensor")
            return weight.detach().to("cpu", torch.float64), k
    embeds = [k for k in state if "embed" in k][:8]
    raise ValueError(
        f"{path}: none of {list(keys)} in the model state dict; embedding-like keys: {embeds}; "
        "pass --key NAME"
    )


def normalized_spectrum(weight: Tensor) -> Tensor:
    """Singular values of ``weight`` (descending) divided by the largest.

    Args:
        weight: (V, d) matrix.

    Returns:
        (min(V, d),) float64 tensor with first entry 1.
    """
    s = torch.linalg.svdvals(weight.to(torch.float64))
    if s.numel() == 0 or s[0] <= 0:
        raise ValueError("the embedding matrix is empty or all zero; its spectrum is undefined")
    return s / s[0]
