"""Every script answers ``--help`` with its usage, exit 0, and changes nothing in the tree.

(``scripts/make_results.py --help`` used to rewrite README.md and the results tables;
``benchmarks/report.py --help`` crashed with ``FileNotFoundError: '--help'``.)
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = sorted(str(p.relative_to(REPO)) for pattern in
                 ("scripts/*.py", "scripts/*.sh", "analysis/*.py", "benchmarks/*.py")
                 for p in REPO.glob(pattern))


def _tree_state() -> tuple[dict[str, str], str]:
    """sha256 of every tracked or untracked (not ignored) file, and git's view of ignored paths
    (a script that creates e.g. data/ or checkpoints/ shows up there)."""
    def git(*args):
        return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True,
                              check=True).stdout

    files = {}
    for name in git("ls-files", "-co", "--exclude-standard").splitlines():
        path = REPO / name
        files[name] = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else "absent"
    return files, git("status", "--porcelain", "--ignored")


def test_every_script_is_listed():
    assert {"scripts/make_results.py", "benchmarks/report.py", "scripts/setup_env.sh",
            "scripts/train.sh", "analysis/plot_stats.py"} <= set(SCRIPTS)


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_prints_usage_and_changes_nothing(script):
    before = _tree_state()
    cmd = ["bash" if script.endswith(".sh") else sys.executable, str(REPO / script), "--help"]
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1", "OMP_NUM_THREADS": "1",
           "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=env, timeout=120)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"{script} --help exited {proc.returncode}:\n{out[-2000:]}"
    assert "usage" in proc.stdout.lower(), out[-2000:]
    assert proc.stdout.strip(), f"{script} --help printed nothing"
    after = _tree_state()
    changed = sorted(k for k in set(before[0]) | set(after[0]) if before[0].get(k) != after[0].get(k))
    assert not changed, f"{script} --help changed {changed}"
    assert before[1] == after[1], f"{script} --help changed ignored paths"
