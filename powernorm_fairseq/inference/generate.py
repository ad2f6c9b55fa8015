"""``fairseq-generate`` with the batch/power norms of every loaded model folded away.

Usage (the arguments are exactly fairseq-generate's)::

    python -m powernorm_fairseq.inference.generate DATA_BIN --user-dir powernorm_fairseq \
        --path checkpoints/checkpoint_best.pt --beam 5 --remove-bpe

fairseq-generate loads its models with ``checkpoint_utils.load_model_ensemble``; this entry point
wraps that one function so each model is put in eval mode and passed through
:func:`~powernorm_fairseq.inference.fold.fold_norms` before fairseq prepares it for decoding.
Everything else (beam search, scoring, output format) is fairseq's own code, so the translations
of a folded and an unfolded model can be compared line by line.
"""

from __future__ import annotations

import functools
import logging
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from powernorm_fairseq.inference.fold import fold_norms

logger = logging.getLogger(__name__)


def _folding(load: Callable) -> Callable:
    @functools.wraps(load)
    def load_and_fold(*args, **kwargs):
        models, cfg = load(*args, **kwargs)
        for model in models:
            counts = Counter(fold_norms(model.eval()).values())
            logger.info(
                "fold_norms: %d norms folded into linear layers, %d fused into one affine map",
                counts["folded"],
                counts["fused"],
            )
        return models, cfg

    return load_and_fold


@contextmanager
def folding_loader() -> Iterator[None]:
    """Within the block, ``checkpoint_utils.load_model_ensemble`` returns folded eval models."""
    from fairseq import checkpoint_utils

    original = checkpoint_utils.load_model_ensemble
    checkpoint_utils.load_model_ensemble = _folding(original)
    try:
        yield
    finally:
        checkpoint_utils.load_model_ensemble = original


def cli_main() -> None:
    """Run fairseq-generate (same command line) on folded models."""
    from fairseq_cli import generate

    # ``python -m`` imported this package before fairseq, so its ``__init__`` skipped the model
    # registration, and fairseq's ``--user-dir`` import will skip the already-imported package.
    import powernorm_fairseq.models  # noqa: F401  (registers the models, applies compat)

    with folding_loader():
        generate.cli_main()


if __name__ == "__main__":
    cli_main()
