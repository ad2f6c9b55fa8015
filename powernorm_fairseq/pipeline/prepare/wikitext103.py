"""WikiText-103 (tokenized, v1), for language modelling."""

from __future__ import annotations

import zipfile
from pathlib import Path

from powernorm_fairseq.pipeline.common import atomic_write_lines, read_lines

from .fetch import download, find_local, verify
from .registry import SPLITS, Corpus, register

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
            archive = find_local(Path(args.from_dir), ["wikitext-103-v1.zip"], "wikitext103")
            source = str(archive)
        else:
            source = WT103_URL
            archive = download(WT103_URL, Path(args.download_dir) / "wikitext-103-v1.zip",
                               "wikitext103", "wikitext-103-v1.zip or wiki.{train,valid,test}.tokens")
        verify(archive, WT103_SHA256, kind="sha256", no_verify=args.no_verify, source=source,
               pin_in=__name__)
        src_dir = Path(args.download_dir) / "wikitext-103"
        with zipfile.ZipFile(archive) as z:
            z.extractall(src_dir.parent)
    for split in SPLITS:
        # WikiText's blank lines separate paragraphs; fairseq's recipe keeps them (one <eos> each).
        atomic_write_lines(raw_dir / f"{split}.txt", read_lines(src_dir / f"wiki.{split}.tokens"))
    return {"archive": source}


WIKITEXT103 = register(Corpus(
    "wikitext103", "lm", fetch_wikitext103,
    from_layout="wiki.train.tokens wiki.valid.tokens wiki.test.tokens, or wikitext-103-v1.zip",
    tokenize=False, empty_lines="keep",
    expected={"train": 1801350, "valid": 3760, "test": 4358}))
