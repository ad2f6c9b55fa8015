"""Shared fixtures: tiny corpora binarized with fairseq-preprocess, and a fairseq CLI runner.

Fixtures (all session-scoped, built once in a temporary directory):

- ``fairseq_cli``: ``fairseq_cli(tool, *args, check=True, timeout=300, cwd=None)`` runs
  ``python -m fairseq_cli.<tool> *args`` (tool = ``train``, ``generate``, ``eval_lm``,
  ``preprocess``, ...; a dotted name such as ``powernorm_fairseq.hydra_train`` is run as that
  module) with one CPU thread and the repository on ``PYTHONPATH``, and returns the
  ``CompletedProcess`` (text stdout/stderr). With ``check=True`` a nonzero exit fails the test
  with the output's tail.
- ``tiny_mt_data``: data-bin of a toy translation task (``--source-lang src --target-lang tgt``,
  joined dictionary, so ``--share-all-embeddings`` works): each target is the source with every
  word mapped by a fixed permutation. Splits train (240 pairs), valid (24), test (21 pairs, not a
  multiple of 8 on purpose). The raw text is in ``tiny_mt_data / "raw"``.
- ``tiny_lm_data``: data-bin for ``--task language_modeling``: sentences of a toy grammar.
  Splits train (300 lines), valid (30), test (27); raw text in ``tiny_lm_data / "raw"``.
- ``plugin_dir``: the ``--user-dir`` path (str).
- ``device`` (function-scoped, parametrized): ``"cpu"`` and ``"cuda"`` (``$PN_TEST_DEVICES``);
  the CUDA run skips, naming the device, without a GPU; ``on_device`` also makes it torch's
  default device. ``kernel_path``: fused / eager norms.

Fairseq is optional for the pure-torch tests: these fixtures skip when it is not installed.
"""

from __future__ import annotations

import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PLUGIN_DIR = REPO / "powernorm_fairseq"

MT_SIZES = {"train": 240, "valid": 24, "test": 21}
LM_SIZES = {"train": 300, "valid": 30, "test": 27}


def _cli_env() -> dict[str, str]:
    env = dict(os.environ)
    # 2 shared cores: one thread per process keeps tests predictable; no GPU in tests.
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH", "")]))
    return env


def run_fairseq(tool: str, *args, check: bool = True, timeout: float = 300, cwd=None):
    """Run ``python -m fairseq_cli.<tool> *args``; see the module docstring."""
    module = tool if "." in tool else f"fairseq_cli.{tool}"
    cmd = [sys.executable, "-m", module, *map(str, args)]
    proc = subprocess.run(
        cmd, capture_output=True, text=True, env=_cli_env(), timeout=timeout, cwd=cwd
    )
    if check and proc.returncode != 0:
        tail = (proc.stdout + "\n" + proc.stderr)[-4000:]
        pytest.fail(f"{' '.join(cmd)} exited with {proc.returncode}:\n{tail}", pytrace=False)
    return proc


@pytest.fixture(scope="session")
def fairseq_cli():
    pytest.importorskip("fairseq")
    return run_fairseq


@pytest.fixture(scope="session")
def plugin_dir() -> str:
    return str(PLUGIN_DIR)


def _write(path: Path, lines) -> None:
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")


@pytest.fixture(scope="session")
def tiny_mt_data(tmp_path_factory, fairseq_cli) -> Path:
    root = tmp_path_factory.mktemp("tiny_mt")
    raw, out = root / "raw", root / "data-bin"
    raw.mkdir()
    rng = random.Random(1)
    src_vocab = [f"s{i}" for i in range(24)]
    tgt_of = dict(zip(src_vocab, rng.sample([f"t{i}" for i in range(24)], 24), strict=True))
    for split, n in MT_SIZES.items():
        src = [" ".join(rng.choices(src_vocab, k=rng.randint(3, 9))) for _ in range(n)]
        _write(raw / f"{split}.src", src)
        _write(raw / f"{split}.tgt", (" ".join(tgt_of[w] for w in s.split()) for s in src))
    fairseq_cli(
        "preprocess", "--source-lang", "src", "--target-lang", "tgt",
        "--trainpref", raw / "train", "--validpref", raw / "valid", "--testpref", raw / "test",
        "--destdir", out, "--joined-dictionary", "--workers", "1",
    )
    (out / "raw").symlink_to(raw, target_is_directory=True)
    return out


@pytest.fixture(scope="session")
def tiny_lm_data(tmp_path_factory, fairseq_cli) -> Path:
    root = tmp_path_factory.mktemp("tiny_lm")
    raw, out = root / "raw", root / "data-bin"
    raw.mkdir()
    rng = random.Random(2)
    subjects, verbs, objects = ["the cat", "a dog", "my friend", "the bird"], ["sees", "likes",
                                                                               "finds"], [
        "the ball", "a tree", "some food", "the house"]
    for split, n in LM_SIZES.items():
        _write(raw / f"{split}.txt", (
            f"{rng.choice(subjects)} {rng.choice(verbs)} {rng.choice(objects)} ." for _ in range(n)
        ))
    fairseq_cli(
        "preprocess", "--only-source", "--trainpref", raw / "train.txt",
        "--validpref", raw / "valid.txt", "--testpref", raw / "test.txt",
        "--destdir", out, "--workers", "1",
    )
    (out / "raw").symlink_to(raw, target_is_directory=True)
    return out


def _test_devices() -> list[str]:
    """Devices of the ``device`` fixture: ``$PN_TEST_DEVICES`` (comma-separated), default
    ``cpu,cuda`` (``scripts/device_check.sh`` sets ``cuda``)."""
    names = [d.strip() for d in os.environ.get("PN_TEST_DEVICES", "cpu,cuda").split(",")]
    return [d for d in names if d] or ["cpu"]


@pytest.fixture(params=_test_devices())
def device(request) -> str:
    """Run a test once per device (``"cpu"``, ``"cuda"``). The CUDA run is skipped, with a reason
    naming the device, where ``torch.cuda.is_available()`` is False; combined with
    ``kernel_path``, the fused run is skipped on CUDA (the fused kernels are CPU-only, the eager
    run covers the CUDA path)."""
    import torch

    name = request.param
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            pytest.skip(f"device {name!r}: no CUDA device (torch.cuda.is_available() is False)")
        callspec = getattr(request.node, "callspec", None)
        if callspec is not None and callspec.params.get("kernel_path") == "fused":
            pytest.skip(f"device {name!r}: the fused kernels are CPU-only (the eager run covers "
                        "this device)")
    return name


@pytest.fixture
def on_device(device):
    """``device`` as torch's default device for the test (``torch.set_default_device``): tensors
    from factory functions and new modules land there. Tensors drawn from an explicit CPU
    ``torch.Generator`` must still be moved (``.to(torch.get_default_device())``)."""
    import torch

    old = torch.get_default_device()
    torch.set_default_device(device)
    try:
        yield device
    finally:
        torch.set_default_device(old)


@pytest.fixture(params=["fused", "eager"])
def kernel_path(request):
    """Run a test once with the fused CPU kernels and once with the eager torch path
    (``powernorm_fairseq.norms.fused``); the fused run skips where no C compiler is available."""
    from powernorm_fairseq.norms import fused

    if request.param == "fused" and not fused.available():
        pytest.skip("fused CPU kernels unavailable (no C compiler, or PN_FUSED_KERNELS=0)")
    old = fused.set_enabled(request.param == "fused")
    yield request.param
    fused.set_enabled(old)


# The plugin's own norms, as importing the package registers them: what every test module that
# runs over the registry (norm_names / norm_configs) is parametrized with at collection time.
from powernorm_fairseq.norms import norm_configs as _norm_configs  # noqa: E402

_PLUGIN_NORMS = tuple(_norm_configs())


@pytest.fixture(scope="module", autouse=True)
def registry_left_as_found(request):
    """A test module that registers a norm of its own removes it again (``unregister_norm``):
    otherwise the modules after it see a norm their fairseq subprocesses cannot build."""
    assert tuple(_norm_configs()) == _PLUGIN_NORMS, (
        f"a test module before {request.module.__name__} left norms registered: "
        f"{sorted(set(_norm_configs()) - set(_PLUGIN_NORMS))}")
    yield
    left = sorted(set(_norm_configs()) - set(_PLUGIN_NORMS))
    assert not left, f"{request.module.__name__} left norms registered: {left} (unregister_norm)"
