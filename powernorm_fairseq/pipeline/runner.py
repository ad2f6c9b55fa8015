"""One run of an orchestrator: train, average and evaluate one (norm, seed, size) point.

The quickstart, :mod:`powernorm_fairseq.campaign` (the paper's campaigns) and the batch-size sweep
(``analysis/sweep.py``) all run their points through these functions, so every caller gets what the
pipeline's stages do, the same way:

* :func:`train` is ``pipeline.train``: the batch scaled to the world size (``max_tokens *
  update_freq * W`` kept at the preset's), resumption from ``checkpoint_last.pt``, repair of a
  truncated ``checkpoint_last.pt``, and the launch record ``<save_dir>/launch.json``;
* :func:`average` is ``pipeline.average`` over the last N epoch or update checkpoints;
* :func:`evaluate` is ``pipeline.evaluate`` (BLEU or perplexity, a JSON record).

Each stage also has its command line (:func:`train_argv`, :func:`evaluate_argv`), the arguments
of ``python -m powernorm_fairseq.pipeline.<stage>`` (or ``powernorm-<stage>``), for callers that
run a stage in a child process (the sweep) and for the records, which hold the command that
reproduces a run.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path

__all__ = ["average", "evaluate", "evaluate_argv", "train", "train_argv"]


def train_argv(experiment: str, norm: str, data: str | os.PathLike, save_dir: str | os.PathLike,
               overrides: Sequence[str] = (), *, cpu: bool = False,
               effective_tokens: int | None = None) -> list[str]:
    """Arguments of ``pipeline.train`` for one run.

    Args:
        experiment: an experiment (``configs/base/<experiment>.yaml``; the preset ``<experiment>_<norm>``) or ``flags``.
        norm: the norm configuration's name (``configs/norm/<norm>.yaml``).
        overrides: hydra ``key=value`` pairs (preset mode) or fairseq-train flags (``flags``);
            they follow ``--``, so none is read as an option of ``pipeline.train`` itself.
        cpu: train on CPU even where GPUs are visible.
        effective_tokens: tokens (LM: sequences) per update to keep; default the preset's.
    """
    argv = [experiment, norm, "--data", str(data), "--save-dir", str(save_dir)]
    if cpu:
        argv.append("--cpu")
    if effective_tokens:
        argv += ["--effective-tokens", str(effective_tokens)]
    return [*argv, "--", *overrides]


def train(argv: Sequence[str], echo: Callable[[str], None] | None = None) -> dict:
    """Run ``pipeline.train`` with ``argv`` (see :func:`train_argv`) in this process.

    ``echo`` receives every line of rank 0's output (default: printed); the full output is in
    ``<save_dir>/train.log`` either way. Returns the launch record.

    Raises:
        SystemExit: the launch was refused or training failed, with ``pipeline.train``'s message
            (a caller running several points catches it per point).
    """
    from powernorm_fairseq.pipeline import train as train_stage
    from powernorm_fairseq.pipeline.common import invocation

    args, overrides = train_stage.parse_args(list(argv))
    args.command = invocation("powernorm_fairseq.pipeline.train", list(argv))
    return train_stage.train(args, overrides, echo=echo)


def average(save_dir: str | os.PathLike, n: int, kind: str, output: str | os.PathLike) -> dict:
    """Average the last ``n`` ``kind`` (``"epoch"`` or ``"update"``) checkpoints of ``save_dir``
    into ``output`` (replaced if there); returns ``pipeline.average``'s summary."""
    from powernorm_fairseq.pipeline import average as average_stage

    inputs = average_stage.find_checkpoints(Path(save_dir), n, kind)
    return average_stage.average_checkpoints(inputs, output, force=True)


def evaluate_argv(metric: str, data: str | os.PathLike, checkpoint: str | os.PathLike,
                  out: str | os.PathLike, extra: Sequence[str] = ()) -> list[str]:
    """Arguments of ``pipeline.evaluate``: ``metric`` (``bleu`` or ``ppl``) of ``checkpoint`` on
    the prepared directory ``data``, its record written to ``out``; ``extra`` appended."""
    return [metric, "--data", str(data), "--checkpoint", str(checkpoint), "--out", str(out), *extra]


def evaluate(argv: Sequence[str]) -> dict:
    """Run ``pipeline.evaluate`` with ``argv`` (see :func:`evaluate_argv`) in this process;
    returns its record (also written to its ``--out``)."""
    from powernorm_fairseq.pipeline import evaluate as evaluate_stage

    return evaluate_stage.main(list(argv))


def probe_leak(argv: Sequence[str]) -> dict:
    """Run the leak probe (:mod:`powernorm_fairseq.analysis.leak`) with ``argv`` in a process of
    its own (it loads the model with fairseq); returns its record (also written to its ``--out``)."""
    import json

    from powernorm_fairseq.pipeline.common import python_module_cmd, run_cmd

    argv = list(argv)
    run_cmd(python_module_cmd("powernorm_fairseq.analysis.leak") + argv)
    return json.loads(Path(argv[argv.index("--out") + 1]).read_text())
