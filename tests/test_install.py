"""The package works installed from a wheel, away from the checkout (issue 16, item 4).

A wheel is built from a copy of the sources (offline, no build isolation), installed (not
editable) into a fresh virtual environment that sees this environment's torch and fairseq through
a ``.pth`` file but not the checkout, and two console scripts run from a directory outside the
checkout: ``powernorm-average`` on tiny checkpoints and ``powernorm-results`` on tiny records.
"""

from __future__ import annotations

import json
import os
import shutil
import site
import subprocess
import sys
from argparse import Namespace
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SOURCES = ("pyproject.toml", "README.md", "LICENSE", "powernorm_fairseq", "configs")


def _run(cmd, **kw) -> subprocess.CompletedProcess:
    proc = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=300, **kw)
    assert proc.returncode == 0, f"{' '.join(map(str, cmd))} exited {proc.returncode}:\n" \
                                 f"{(proc.stdout + proc.stderr)[-3000:]}"
    return proc


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """A virtual environment with the package installed from its wheel; returns its bin/."""
    tmp = tmp_path_factory.mktemp("install")
    src = tmp / "src"  # a copy: building in the checkout would leave build/ and *.egg-info there
    src.mkdir()
    for name in SOURCES:
        path = REPO / name
        if path.is_dir():
            shutil.copytree(path, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.so", "build"))
        elif path.is_file():
            shutil.copy2(path, src / name)
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
          "--wheel-dir", tmp / "dist", src])
    (wheel,) = (tmp / "dist").glob("powernorm_fairseq-*.whl")
    venv = tmp / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", venv])
    py = venv / "bin" / "python"
    purelib = Path(_run([py, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"]).stdout.strip())
    # torch, fairseq & co. from this environment, after the venv's own site-packages
    (purelib / "parent_env.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    _run([sys.executable, "-m", "pip", "--python", py, "install", "--no-deps", "--no-index", wheel])
    return venv / "bin"


def _env() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    env.update(OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="", PYTHONDONTWRITEBYTECODE="1")
    return env


@pytest.mark.slow
def test_wheel_installs_and_its_stages_run_outside_the_checkout(installed, tmp_path):
    work = tmp_path / "elsewhere"
    work.mkdir()
    where = _run([installed / "python", "-c", "import powernorm_fairseq; print(powernorm_fairseq.__file__)"],
                 cwd=work, env=_env()).stdout.strip()
    assert Path(where).resolve().is_relative_to(installed.parent.resolve()), where  # the wheel's copy

    # powernorm-average: the mean of two checkpoints, written where --output says
    for i, scale in ((1, 1.0), (2, 3.0)):
        torch.save({"model": {"w": torch.full((2, 3), scale)},
                    "cfg": {"model": Namespace(arch="transformer_pn_tiny")},
                    "optimizer_history": [{"num_updates": 10 * i}]}, work / f"checkpoint{i}.pt")
    _run([installed / "powernorm-average", "--dir", ".", "--num-epoch-checkpoints", "2",
          "--output", "avg.pt"], cwd=work, env=_env())
    avg = torch.load(work / "avg.pt", weights_only=False)
    assert torch.equal(avg["model"]["w"], torch.full((2, 3), 2.0))

    # powernorm-results: tables of the project directory it runs in (the current one)
    recs = work / "results" / "runs" / "multi30k"
    recs.mkdir(parents=True)
    for seed, bleu in ((1, 20.0), (2, 22.0)):
        ev = {w: {"bleu_tokenized": {"score": bleu, "signature": "tok:none"}, "bleu_detok": {"score": bleu}}
              for w in ("avg", "best", "last")}
        (recs / f"ln_s{seed}.json").write_text(json.dumps(
            {"norm": "ln", "seed": seed, "status": "done", "evaluations": ev}))
    _run([installed / "powernorm-results"], cwd=work, env=_env())
    table = (work / "results" / "table1_multi30k.md").read_text()
    assert "| LN | 35.5 | 29.5 | 21.00 ± 1.41 (2 seeds, range 20.00-22.00) |" in table
    assert "`results/runs/multi30k/ln_s1.json`" in table  # records named relative to the project

    for script in ("prepare", "train", "evaluate", "reproduce", "quickstart", "hydra-train"):
        assert (installed / f"powernorm-{script}").is_file(), script


def test_the_license_is_an_spdx_expression():
    """Issue 38 item 10: ``license = { text = "MIT" }`` is deprecated by setuptools (removal
    announced for 2027-02-18); the SPDX string form, with a build backend that reads it."""
    import tomllib

    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert project["project"]["license"] == "MIT"
    assert "setuptools>=77" in project["build-system"]["requires"]
