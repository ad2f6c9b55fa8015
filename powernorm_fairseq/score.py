"""``fairseq-score`` with the plugin's workarounds: ``python -m powernorm_fairseq.score ARGS``.

Same arguments and output as ``fairseq-score`` (BLEU of a system output against references).
``fairseq-score`` takes no ``--user-dir``, so the plugin cannot reach it; this entry point applies
:mod:`powernorm_fairseq.compat` first (``--sacrebleu`` works with sacrebleu >= 2).
"""

from __future__ import annotations


def cli_main() -> None:
    from fairseq_cli import score

    from powernorm_fairseq import compat

    compat.install()
    score.cli_main()


if __name__ == "__main__":
    cli_main()
