"""IWSLT14 German -> English (the paper's small translation benchmark)."""

from __future__ import annotations

import tarfile
from pathlib import Path

from powernorm_fairseq.pipeline.common import atomic_write_lines, decode_utf8

from .fetch import download, find_local, sgm_lines, verify
from .registry import Corpus, register

# IWSLT14 De-En. The wit3.fbk.eu URL of the paper's and fairseq's old script is dead; fairseq's
# current script downloads this mirror. The checksum is not pinned: verify on first use.
IWSLT14_URL = "http://dl.fbaipublicfiles.com/fairseq/data/iwslt14/de-en.tgz"
IWSLT14_SHA256 = None
IWSLT14_TEST = ["IWSLT14.TED.dev2010", "IWSLT14.TEDX.dev2012", "IWSLT14.TED.tst2010",
                "IWSLT14.TED.tst2011", "IWSLT14.TED.tst2012"]
_DROP_TAGS = ("<url>", "<talkid>", "<keywords>")


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


def fetch_iwslt14(args, raw_dir: Path) -> dict:
    if args.from_dir:
        archive = find_local(Path(args.from_dir), ["de-en.tgz"], "iwslt14")
        source = str(archive)
    else:
        source = IWSLT14_URL
        archive = download(IWSLT14_URL, Path(args.download_dir) / "de-en.tgz", "iwslt14", "de-en.tgz")
    verify(archive, IWSLT14_SHA256, kind="sha256", no_verify=args.no_verify, source=source,
           pin_in=__name__)
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
                test += sgm_lines(read(f"{stem}.de-en.{lang}.xml"))
            atomic_write_lines(raw_dir / f"test.{lang}", test)
    return {"archive": source}


IWSLT14 = register(Corpus(
    "iwslt14", "translation", fetch_iwslt14,
    from_layout="de-en.tgz, the IWSLT14 release (train.tags.de-en.{de,en} and the "
                "IWSLT14.TED*.de-en.{de,en}.xml dev/test files inside)",
    src="de", tgt="en", lowercase=True,
    bpe_merges=10000, clean_train=(1, 175, 1.5), valid_every=23,
    # sizes produced by fairseq's prepare-iwslt14.sh
    expected={"train": 160239, "valid": 7283, "test": 6750}))
