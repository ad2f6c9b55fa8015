"""WMT14 English -> German (the paper's large translation benchmark)."""

from __future__ import annotations

import tarfile
from pathlib import Path

from powernorm_fairseq.pipeline.common import atomic_write_lines, decode_utf8

from .fetch import download, find_local, sgm_lines, verify
from .registry import Corpus, register

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
            archive = find_local(Path(args.from_dir), [fname], "wmt14_en_de")
        else:
            archive = download(url, Path(args.download_dir) / fname, "wmt14_en_de",
                               ", ".join(WMT14_URLS))
        verify(archive, WMT14_SHA256[fname], kind="sha256", no_verify=args.no_verify, source=url,
               pin_in=__name__)
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
        atomic_write_lines(raw_dir / f"test.{lang}", sgm_lines(texts[f"newstest2014-deen-{side}.{lang}.sgm"]))
    return {"archives": list(WMT14_URLS.values())}


WMT14_EN_DE = register(Corpus(
    "wmt14_en_de", "translation", fetch_wmt14_en_de,
    from_layout="the five archives training-parallel-europarl-v7.tgz "
                "training-parallel-commoncrawl.tgz training-parallel-nc-v12.tgz dev.tgz "
                "test-full.tgz, as published (the names of WMT14_URLS)",
    src="en", tgt="de", lowercase=False,
    aggressive_dash=True, bpe_merges=32764, clean_train=(1, 250, 1.5),
    expected={"valid": 3000, "test": 3003}))
