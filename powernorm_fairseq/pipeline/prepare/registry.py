"""The corpus registry: what each corpus is and how the paper's recipe treats it.

Each corpus module (``multi30k.py``, ``iwslt14.py``, ...) describes its corpus with one
:class:`Corpus` and adds it with :func:`register`; ``CORPORA`` maps the name on the command line
to it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

SPLITS = ("train", "valid", "test")


@dataclass(frozen=True)
class Corpus:
    """What a corpus is and how the paper's recipe treats it.

    Attributes:
        name: the name on the command line (``prepare <name>``) and the default ``data/<name>/``.
        kind: ``"translation"`` (parallel, joined dictionary) or ``"lm"`` (one side, plain dictionary).
        fetch: function(args, raw_dir) writing ``raw/{split}.{lang}`` (or ``raw/{split}.txt``);
            returns the record's ``sources``.
        from_layout: what ``--from DIR`` must hold (shown by ``--help`` and in "not found" errors).
        src, tgt: language suffixes (translation only).
        lowercase: lowercase after tokenization (the IWSLT14 recipe does, WMT14 does not).
        tokenize: run the Moses tokenizer (LM corpora here come tokenized already).
        aggressive_dash: Moses ``-a`` (WMT14 recipe: ``a-b`` -> ``a @-@ b``).
        bpe_merges: joint BPE merges (subword-nmt) or the sentencepiece vocabulary size.
        clean_train: (min_len, max_len, ratio) of Moses clean-corpus-n on the training set, or None.
        valid_every: take every n-th cleaned training pair as the validation set (IWSLT14), or None.
        expected: expected line counts per split after cleaning (None = not pinned).
        empty_lines: ``"drop"`` (pairs or lines with an empty side) or ``"keep"`` (LM paragraphs).
    """

    name: str
    kind: str
    fetch: Callable
    from_layout: str
    src: str | None = None
    tgt: str | None = None
    lowercase: bool = False
    tokenize: bool = True
    aggressive_dash: bool = False
    bpe_merges: int | None = None
    clean_train: tuple[int, int, float] | None = None
    valid_every: int | None = None
    expected: dict = field(default_factory=dict)
    empty_lines: str = "drop"

    @property
    def langs(self) -> tuple[str, ...]:
        return (self.src, self.tgt) if self.kind == "translation" else ("txt",)


#: name -> corpus, in registration order (the order ``--help`` lists the ``--from`` layouts in).
CORPORA: dict[str, Corpus] = {}


def register(corpus: Corpus) -> Corpus:
    """Add ``corpus`` to :data:`CORPORA`; a second corpus of the same name is an error."""
    if corpus.name in CORPORA:
        raise ValueError(f"corpus {corpus.name!r} is registered twice")
    CORPORA[corpus.name] = corpus
    return corpus
