"""``--commit``: a finished run's record, the status table and the regenerated tables land in git."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from powernorm_fairseq.pipeline.common import checkout_top, directory_lock, git

# What a finished run changes and ``--commit`` commits: its record and the status table
# (results/), and what scripts/make_results.py regenerates from them (results/, README section 5).
COMMITTED = ("results", "README.md")


def regenerate_tables(root: Path) -> None:
    """Rewrite the tables of the checkout ``root`` from its records: with the ``root`` checkout's
    own ``scripts/make_results.py``, in a process of its own, when ``root`` is another checkout
    than the one this code runs from (a campaign runs from a worktree at a fixed commit while the
    checkout it commits to moves on: the tables are drawn as that checkout draws them); else here."""
    script = root / "scripts" / "make_results.py"
    if script.is_file() and checkout_top(root) != checkout_top(Path(__file__)):
        subprocess.run([sys.executable, os.fspath(script), "--root", os.fspath(root)], check=True,
                       capture_output=True, text=True, env={**os.environ, "PYTHONPATH": os.fspath(root)})
        return
    from powernorm_fairseq.campaign import (
        make,  # the tables' module, only when there is a run to commit
    )

    make.main(["--root", os.fspath(root)])


def commit_records(root: Path, record: Path, message: str, regenerate=None) -> str:
    """``--commit``: once a run has finished (or failed), commit its record with the status table
    and the tables regenerated from the records, so that a machine lost later loses only the runs
    then in progress. Only ``COMMITTED`` paths are committed (anything else the user has changed
    or staged stays as it is), and nothing when ``record`` is unchanged since HEAD (a run that was
    already done). ``regenerate(root)`` rewrites the tables (default :func:`regenerate_tables`).
    A table that cannot be regenerated does not hold the record back: the record and the status
    table are committed alone, and the message says so. Returns what was done, for the log; a
    failure to commit is reported, not raised: the run itself is finished and its record written."""
    if not git(root, "status", "--porcelain", "--", os.fspath(record)):
        return "--commit: its record is unchanged since HEAD; nothing to commit"
    if regenerate is None:
        regenerate = regenerate_tables
    paths, note = COMMITTED, ""
    try:
        with directory_lock(root / "results"):  # other campaign processes commit in the same checkout
            try:
                regenerate(root)
            except Exception as e:  # the finished run's record must still land
                detail = (e.stderr or "").strip().splitlines()[-1:] if isinstance(e, subprocess.CalledProcessError) else []
                paths = (os.fspath(record.relative_to(root)), "results/status.md")
                paths = tuple(p for p in paths if (root / p).exists())
                note = (f" (tables not regenerated: {type(e).__name__}: {' '.join(detail) or e}; "
                        "run scripts/make_results.py)")
            git(root, "add", "--", *paths)
            git(root, "commit", "-q", "-m", message + note, "--", *paths)
    except subprocess.CalledProcessError as e:
        return f"--commit: git {e.cmd[3]} failed ({(e.stderr or e.stdout).strip()}); the record is written, commit it by hand"
    return f"--commit: committed {git(root, 'rev-parse', '--short', 'HEAD')}: {message + note}"

