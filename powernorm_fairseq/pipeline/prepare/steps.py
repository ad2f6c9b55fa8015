"""The steps after fetching, shared by every corpus: checks, clean, tokenize, filter, BPE, binarize.

Each step reads the previous step's directory and writes its outputs atomically (the caller,
:func:`powernorm_fairseq.pipeline.prepare.prepare`, then writes its done-marker).
"""

from __future__ import annotations

import contextlib
import io
import multiprocessing
import os
import re
import shutil
import unicodedata
from pathlib import Path

from powernorm_fairseq.pipeline.common import (
    atomic_path,
    atomic_write_lines,
    log,
    python_module_cmd,
    read_lines,
    run_cmd,
)

from .registry import SPLITS, Corpus


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
