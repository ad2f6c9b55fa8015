"""Multi30k task 1 German -> English (the fast translation setting)."""

from __future__ import annotations

from pathlib import Path

from powernorm_fairseq.pipeline.common import atomic_write_lines, read_lines

from .fetch import download, find_local, verify
from .registry import Corpus, register

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
                path = find_local(Path(args.from_dir).resolve(), [fname + ".gz", fname], "multi30k")
                source = str(path)
            else:
                source = MULTI30K_URL.format(fname)
                path = download(source, Path(args.download_dir) / (fname + ".gz"), "multi30k",
                                "train/val/test_2016_flickr .de/.en(.gz)")
            verify(path, MULTI30K_MD5[fname], kind="md5-content", no_verify=args.no_verify,
                   source=source, pin_in=__name__)
            atomic_write_lines(raw_dir / f"{split}.{lang}", read_lines(path))
            sources[f"{split}.{lang}"] = source
    return sources


MULTI30K = register(Corpus(
    "multi30k", "translation", fetch_multi30k,
    from_layout="train.de train.en val.de val.en test_2016_flickr.de test_2016_flickr.en, each "
                "plain or .gz (data/task1/raw/ of github.com/multi30k/dataset)",
    src="de", tgt="en",
    # As the IWSLT14 recipe (the paper's small-data setting): lowercased, joint BPE. 8k merges
    # suit ~29k sentence pairs (IWSLT14 uses 10k for ~160k pairs).
    lowercase=True, bpe_merges=8000,
    expected={"train": 29000, "valid": 1014, "test": 1000}))
