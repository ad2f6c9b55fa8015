"""The analysis tools on real fairseq runs of ``transformer_pn_tiny`` (a few updates, CPU)."""

from __future__ import annotations

import csv
import importlib.util
import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from powernorm_fairseq.analysis.sweep import run_sweep
from powernorm_fairseq.pipeline.common import run_cmd

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]

TRAIN = ["--task", "translation", "--arch", "transformer_pn_tiny", "--share-all-embeddings",
         "--optimizer", "adam", "--lr", "1e-3", "--max-tokens", "64", "--update-freq", "2",
         "--cpu", "--seed", "1", "--no-epoch-checkpoints", "--log-format", "simple"]  # fmt: skip


def _cli(name: str):
    """Import ``analysis/<name>.py`` (a script folder, not a package) as a module."""
    spec = importlib.util.spec_from_file_location(f"analysis_{name}", ROOT / "analysis" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _png_ok(path: Path) -> None:
    assert path.exists() and path.stat().st_size > 1000


def _rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_track_norm_stats_train_resume_plot(tmp_path, fairseq_cli, tiny_mt_data, plugin_dir):
    """--track-norm-stats logs every micro-batch with the update index, a resumed run appends,
    and the CSV and checkpoint feed plot_stats / embedding_spectrum."""
    stats, save = tmp_path / "stats.csv", tmp_path / "ck"
    args = [tiny_mt_data, "--user-dir", plugin_dir, *TRAIN, "--encoder-norm", "batch",
            "--save-dir", save, "--track-norm-stats", stats]
    fairseq_cli("train", *args, "--max-update", "3")
    rows = _rows(stats)
    assert [(r["step"], r["micro"]) for r in rows] == [
        (str(s), str(m)) for s in range(3) for m in range(2)]
    assert {r["layer"] for r in rows} == {"encoder.layers.0.self_attn_layer_norm"}
    assert {r["norm"] for r in rows} == {"batch"} and all(r["g_var"] for r in rows)

    fairseq_cli("train", *args, "--max-update", "5")  # resumes from checkpoint_last.pt
    rows = _rows(stats)
    assert [int(r["step"]) for r in rows] == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4]

    # a new run (another norm, another save dir) on the same file: refused, the file untouched
    # (its rows used to be appended, steps restarting at 0, and plotted as one curve)
    written = stats.read_bytes()
    other = [tiny_mt_data, "--user-dir", plugin_dir, *TRAIN, "--encoder-norm", "power",
             "--save-dir", tmp_path / "ck_pn", "--track-norm-stats", stats, "--max-update", "2"]
    proc = fairseq_cli("train", *other, check=False)
    assert proc.returncode != 0 and "is not continued" in proc.stderr
    assert stats.read_bytes() == written

    _cli("plot_stats").main([str(stats), "--out", str(tmp_path / "fig4.png")])
    _png_ok(tmp_path / "fig4.png")
    _cli("embedding_spectrum").main([str(save / "checkpoint_last.pt"), "--labels", "BN",
                                     "--out", str(tmp_path / "spec.png")])
    _png_ok(tmp_path / "spec.png")
    spec = json.loads((tmp_path / "spec.json").read_text())[0]
    assert spec["key"] == "encoder.embed_tokens.weight" and spec["normalized_singular_values"][0] == 1


def test_sweep_one_real_point(tmp_path, tiny_mt_data):
    """One sweep point through pipeline.train and fairseq-generate: a record with a BLEU score."""
    args = SimpleNamespace(
        experiment="flags", data=str(tiny_mt_data), out=str(tmp_path / "sweep"), norms=["pn"],
        sizes=[64], effective_tokens=128, cpu=True, checkpoint="checkpoint_last.pt",
        eval_args=["--beam", "2"], dry_run=False,
        train_args=["--task", "translation", "--arch", "transformer_pn_tiny",
                    "--share-all-embeddings", "--optimizer", "adam", "--lr", "1e-3",
                    "--max-update", "2", "--no-epoch-checkpoints", "--seed", "1"])
    records = run_sweep(args, runner=run_cmd)
    assert len(records) == 1 and records[0]["update_freq"] == 2
    assert 0.0 <= records[0]["bleu"] <= 100.0
    assert (tmp_path / "sweep" / "points" / "pn_64.json").exists()
