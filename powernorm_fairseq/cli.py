"""The console scripts of the pipeline's stages (``[project.scripts]`` in pyproject.toml).

Each runs its stage's ``main`` on ``sys.argv`` and exits 0 when it returns: a stage's ``main``
returns its record (a dict) for in-process callers, and a console script would otherwise hand that
dict to ``sys.exit``, which prints it and exits 1. A stage reports a bad input by ``SystemExit``
with a message, which passes through unchanged. The stages are imported only when called, so
``--help`` of one does not import the others.
"""

from __future__ import annotations


def prepare() -> None:
    """``powernorm-prepare CORPUS ...``: fetch, tokenize, BPE and binarize a corpus."""
    from powernorm_fairseq.pipeline.prepare import main

    main()


def train() -> None:
    """``powernorm-train EXPERIMENT NORM --data DIR ...``: one training run."""
    from powernorm_fairseq.pipeline.train import main

    main()


def average() -> None:
    """``powernorm-average --dir DIR --num-epoch-checkpoints N --output FILE``."""
    from powernorm_fairseq.pipeline.average import main

    main()


def evaluate() -> None:
    """``powernorm-evaluate {bleu,ppl} --data DIR --checkpoint FILE``."""
    from powernorm_fairseq.pipeline.evaluate import main

    main()


def reproduce() -> None:
    """``powernorm-reproduce CORPUS ...``: the paper's campaigns, resumably."""
    from powernorm_fairseq.campaign.cli import main

    main()


def results() -> None:
    """``powernorm-results``: the results tables and plots from the run records."""
    from powernorm_fairseq.campaign.make import main

    main()


def quickstart() -> None:
    """``powernorm-quickstart``: LN vs PN on a synthetic task in a few minutes."""
    from powernorm_fairseq.quickstart import main

    main()
