"""Fetching shared by the corpora: downloads, local copies (``--from DIR``), pinned checksums."""

from __future__ import annotations

import gzip
import hashlib
import re
import urllib.request
from pathlib import Path

from powernorm_fairseq.pipeline.common import atomic_path, log, stage_command

from .registry import CORPORA


def md5_of_text(path: Path) -> str:
    """md5 of the uncompressed content of a (possibly gzipped) file.

    Content checksums hold for both a gzipped local copy and a plain download of the same text.
    """
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


def verify(path: Path, expected: str | None, *, kind: str, no_verify: bool, source: str,
           pin_in: str) -> None:
    """Check ``path`` against a pinned checksum; fail loudly if missing or different.

    Args:
        kind: ``"md5-content"`` (uncompressed text) or ``"sha256"`` (the archive bytes).
        no_verify: skip the check (``--no-verify``), e.g. for a mirror with different packaging.
        pin_in: the module that holds the corpus's checksums (named in the error).
    """
    if no_verify:
        return
    actual = md5_of_text(path) if kind == "md5-content" else sha256_of_file(path)
    if expected is None:
        raise SystemExit(
            f"no pinned {kind} checksum for {source} (file {path}, its {kind} is {actual}).\n"
            f"Check the file against the publisher's, then pin it in {pin_in} "
            "or rerun with --no-verify.")
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
            f"If you have a copy, pass it with: "
            f"{stage_command(f'scripts/prepare_{corpus}.sh', f'powernorm-prepare {corpus}')} --from DIR "
            f"(DIR holding {hint}).") from e
    return dest


def find_local(src_dir: Path, names: list[str], corpus: str) -> Path:
    """The first of ``names`` that exists in ``src_dir`` (``--from DIR``); else an error saying
    what DIR must hold for ``corpus``."""
    for name in names:
        if (src_dir / name).exists():
            return src_dir / name
    raise SystemExit(f"--from {src_dir}: none of {names} found. For {corpus}, --from DIR must hold "
                     f"{CORPORA[corpus].from_layout}.")


_SEG = re.compile(r'<seg id="?\d+"?>\s*(.*?)\s*</seg>')


def sgm_lines(text: str) -> list[str]:
    """The segments of an SGML/XML test set (IWSLT, WMT), curly apostrophes made straight."""
    return [m.group(1).replace("\u2019", "'") for m in _SEG.finditer(text)]
