"""Prepare a corpus: fetch (download or ``--from DIR``) -> clean -> Moses-tokenize -> BPE -> binarize.

Usage::

    python -m powernorm_fairseq.pipeline.prepare multi30k --from ../shared/data/multi30k
    python -m powernorm_fairseq.pipeline.prepare ptb --from ../shared/data/ptb --out data/ptb

Output layout under ``--out`` (default ``data/<corpus>/``)::

    raw/{train,valid,test}.{src,tgt}   fetched text (LM: raw/{split}.txt), checksums verified
    clean/...                          pairs with an empty side dropped on both sides (counted)
    tok/...                            Moses-tokenized (lowercased where the paper's recipe does)
    bpe/...                            joint BPE (subword-nmt merges or a sentencepiece model)
    ref/test.<tgt>.tok                 tokenized (lowercased) references for tokenized BLEU
    ref/test.<tgt>.detok               raw true-case references for detokenized sacreBLEU
    data-bin/                          fairseq-preprocess output (joined dictionary / LM dictionary)
    prepare.json                       record: sizes, dropped lines, BPE, commands
    .done/<step>                       done-markers: a rerun skips finished steps

Every step writes its outputs atomically and then its marker, so an interrupted run redoes only the
step it was in. Line counts are checked between the two sides and against the corpus's expected
sizes after every step.

Layout: :mod:`.registry` (the :class:`Corpus` description and ``CORPORA``), one module per corpus
(:mod:`.multi30k`, :mod:`.iwslt14`, :mod:`.wmt14`, :mod:`.ptb`, :mod:`.wikitext103`,
:mod:`.synthetic`: its sources, checksums and recipe settings), :mod:`.fetch` (downloads,
``--from`` copies, checksums) and :mod:`.steps` (clean, tokenize, filter, BPE, binarize); this
module runs the steps in order.
"""

from __future__ import annotations

import argparse
import os
import sys
import textwrap
import time
from pathlib import Path

from powernorm_fairseq.pipeline.common import (
    Steps,
    atomic_write_json,
    atomic_write_lines,
    git_commit,
    invocation,
    log,
    read_lines,
)

# One module per corpus; importing it registers the corpus (the order is --help's order).
from . import multi30k, iwslt14, wmt14, ptb, wikitext103, synthetic  # noqa: F401  isort: skip
from .registry import CORPORA, SPLITS, Corpus
from .steps import (
    check_sizes,
    input_fingerprint,
    step_binarize,
    step_bpe,
    step_clean,
    step_filter_train,
    tokenize_file,
)

__all__ = ["CORPORA", "SPLITS", "Corpus", "build_parser", "main", "prepare"]


def prepare(args) -> dict:
    """Run the steps for ``args.corpus`` (parsed by :func:`build_parser`) and return the record
    written to ``prepare.json``; finished steps (their done-markers and keys) are skipped."""
    corpus = CORPORA[args.corpus]
    out = Path(args.out or Path("data") / corpus.name).resolve()  # default: under the current directory
    args.download_dir = args.download_dir or str(out / "download")
    raw, clean, tok, bpe_dir, ref = (out / d for d in ("raw", "clean", "tok", "bpe", "ref"))
    steps = Steps(out)
    t0 = time.time()
    langs_files = [f"{s}.{lang}" for s in SPLITS for lang in corpus.langs]

    # IWSLT14's valid set is split off the cleaned training text (step `filter`), not fetched.
    fetched = ("train", "test") if corpus.valid_every else SPLITS
    fetched_files = [f"{s}.{lang}" for s in fetched for lang in corpus.langs]

    # --no-verify: the user's own copy (another release, extra pairs) may have other sizes.
    pinned = None if args.no_verify else corpus.expected
    if args.no_verify and corpus.expected:
        log(f"--no-verify: checksums and the pinned sizes {corpus.expected} are not checked")

    def fetch():
        raw.mkdir(parents=True, exist_ok=True)
        sources = corpus.fetch(args, raw)
        check_sizes(corpus, raw, "fetch", None if corpus.valid_every else pinned, fetched)
        return sources

    fetch_key = {"from": str(Path(args.from_dir).resolve()) if args.from_dir else None,
                 "inputs": input_fingerprint(args.from_dir) if args.from_dir else None,
                 "no_verify": args.no_verify}
    if corpus.name == "synthetic":
        fetch_key.update(seed=args.seed, train=args.synthetic_train)
    sources = steps.run("fetch", fetch, [raw / f for f in fetched_files], key=fetch_key)
    dropped = steps.run("clean", lambda: step_clean(corpus, raw, clean, fetched),
                        [clean / f for f in fetched_files])
    text_dir = clean
    filtered = None
    if corpus.tokenize:
        def tokenize():
            for f in fetched_files:
                tokenize_file(clean / f, tok / f, f.split(".")[1], corpus, args.workers)

        steps.run("tokenize", tokenize, [tok / f for f in fetched_files])
        text_dir = tok
        if corpus.clean_train:
            filt = out / "filtered"
            filtered = steps.run("filter", lambda: step_filter_train(corpus, tok, filt),
                                 [filt / f for f in langs_files])
            text_dir = filt
    # The fetched release was checked against the pinned sizes; after dropping empty pairs only the
    # sides' agreement is checked, except IWSLT14, whose pinned sizes are those after filtering.
    sizes = check_sizes(corpus, text_dir, "text", pinned if corpus.valid_every else None)
    if corpus.kind == "translation":
        def refs():
            atomic_write_lines(ref / f"test.{corpus.tgt}.tok", read_lines(text_dir / f"test.{corpus.tgt}"))
            atomic_write_lines(ref / f"test.{corpus.tgt}.detok", read_lines(clean / f"test.{corpus.tgt}"))
            return None

        steps.run("references", refs, [ref / f"test.{corpus.tgt}.tok", ref / f"test.{corpus.tgt}.detok"])
        size = args.bpe_size or corpus.bpe_merges
        bpe_info = steps.run("bpe", lambda: step_bpe(corpus, text_dir, bpe_dir, args.bpe, size),
                             [bpe_dir / f for f in langs_files], key={"method": args.bpe, "size": size})
        check_sizes(corpus, bpe_dir, "bpe", sizes)
        text_dir = bpe_dir
    else:
        bpe_info = None
    counted = steps.run("binarize", lambda: step_binarize(corpus, text_dir, out / "data-bin",
                                                          args.workers, sizes), [out / "data-bin"])
    record = {
        "corpus": corpus.name, "kind": corpus.kind, "src": corpus.src, "tgt": corpus.tgt,
        "sources": sources, "sizes": sizes, "dropped_empty": dropped, "train_filter": filtered,
        "lowercase": corpus.lowercase, "moses_tokenized": corpus.tokenize, "bpe": bpe_info,
        "binarized": counted, "data_bin": str(out / "data-bin"),
        "references": ({"tok": str(ref / f"test.{corpus.tgt}.tok"),
                        "detok": str(ref / f"test.{corpus.tgt}.detok")}
                       if corpus.kind == "translation" else None),
        "steps_run": steps.ran, "steps_skipped": steps.skipped,
        "command": getattr(args, "command", None) or " ".join(sys.argv), "git_commit": git_commit(),
        "wall_s": round(time.time() - t0, 1),
    }
    if steps.ran or not (out / "prepare.json").exists():
        atomic_write_json(out / "prepare.json", record)
    log(f"{corpus.name}: data-bin at {out / 'data-bin'} (sizes {sizes}); "
        f"steps run {steps.ran or 'none'}")
    return record


def build_parser() -> argparse.ArgumentParser:
    epilog = "--from DIR must hold, per corpus:\n" + "\n".join(
        textwrap.fill(corpus.from_layout, 98, initial_indent=f"  {name}: ",
                      subsequent_indent="      ")
        for name, corpus in CORPORA.items())
    p = argparse.ArgumentParser(prog="powernorm-prepare", description=__doc__.split("\n")[0], epilog=epilog,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("corpus", choices=sorted(CORPORA))
    p.add_argument("--from", dest="from_dir", metavar="DIR",
                   help="take the corpus files from DIR instead of downloading them (what DIR "
                   "must hold: see below)")
    p.add_argument("--out", metavar="DIR", help="output directory (default: ./data/<corpus>/)")
    p.add_argument("--download-dir", metavar="DIR", help="where downloads go (default: OUT/download)")
    p.add_argument("--bpe", choices=["subword-nmt", "sentencepiece"], default="subword-nmt")
    p.add_argument("--bpe-size", type=int, help="BPE merges / sentencepiece vocabulary size "
                   "(default: the corpus's recipe: multi30k 8000, iwslt14 10000, wmt14 32764)")
    p.add_argument("--no-verify", action="store_true",
                   help="accept files that differ from the pinned release: skip the checksums "
                   "and the pinned line counts (e.g. your own or an extended copy of a corpus); "
                   "the two sides must still agree line for line")
    p.add_argument("--synthetic-train", type=int, default=8000,
                   help="synthetic corpus only: training pairs (valid/test get 1/25 of it each)")
    p.add_argument("--seed", type=int, default=1, help="synthetic corpus only: generator seed")
    p.add_argument("--workers", type=int, default=max(1, min(8, os.cpu_count() or 1)))
    return p


def main(argv=None) -> dict:
    args = build_parser().parse_args(argv)
    args.command = invocation("powernorm_fairseq.pipeline.prepare", argv)
    return prepare(args)
