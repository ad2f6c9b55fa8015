"""The quickstart's synthetic translation corpus (or any parallel corpus of the user's)."""

from __future__ import annotations

from pathlib import Path

from powernorm_fairseq.pipeline.common import atomic_write_lines, read_lines

from .fetch import find_local
from .registry import SPLITS, Corpus, register


def fetch_synthetic(args, raw_dir: Path) -> dict:
    """The quickstart's corpus: generated here (no download), or copied from ``--from DIR``."""
    if args.from_dir:
        for split in SPLITS:
            for lang in ("src", "tgt"):
                path = find_local(Path(args.from_dir).resolve(), [f"{split}.{lang}"], "synthetic")
                atomic_write_lines(raw_dir / f"{split}.{lang}", read_lines(path))
        return {"from": str(Path(args.from_dir).resolve())}
    from powernorm_fairseq.synthetic import generate

    n_train = args.synthetic_train
    sizes = generate(raw_dir, seed=args.seed, n_train=n_train, n_valid=max(50, n_train // 25),
                     n_test=max(50, n_train // 25))
    return {"generated": "powernorm_fairseq.synthetic", "seed": args.seed, "sizes": sizes}


SYNTHETIC = register(Corpus(
    "synthetic", "translation", fetch_synthetic,
    from_layout="train.src train.tgt valid.src valid.tgt test.src test.tgt: ANY parallel corpus, "
                "one UTF-8 sentence per line, the two sides line-aligned (Moses-tokenized and "
                "lowercased here; BPE 300 merges unless --bpe-size)",
    src="src", tgt="tgt",
    # Already lowercase; a few hundred merges: the vocabulary is ~300 words.
    lowercase=True, bpe_merges=300))
