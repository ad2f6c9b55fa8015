"""The analysis CLIs: statistics box plots, embedding spectrum, batch-size sweep (tiny/dry forms)."""

from __future__ import annotations

import csv
import importlib.util
import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from powernorm_fairseq.analysis.plots import bucket_summary, bucket_values, read_stats, stat_column
from powernorm_fairseq.analysis.spectrum import load_embedding, normalized_spectrum
from powernorm_fairseq.analysis.sweep import parse_bleu, plan, run_sweep
from powernorm_fairseq.analysis.tracking import COLUMNS, attach_tracker
from powernorm_fairseq.norms import build_norm

ROOT = Path(__file__).resolve().parents[1]


def _cli(name: str):
    """Import ``analysis/<name>.py`` (a script folder, not a package) as a module."""
    spec = importlib.util.spec_from_file_location(f"analysis_{name}", ROOT / "analysis" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _png_ok(path: Path) -> None:
    assert path.exists() and path.stat().st_size > 1000
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _track_run(path: Path, name: str, steps: int = 10) -> None:
    """A tiny tracked "training": one norm, random batches, a few steps."""
    torch.manual_seed(0)
    norm = build_norm(name, 8)
    holder = torch.nn.Module()
    holder.add_module("norm", norm)
    tracker = attach_tracker(holder, path, ["norm"])
    for step in range(steps):
        norm.set_num_updates(step)
        x = torch.randn(4, 3, 8) * (1 + step / 4)
        norm(x, padding_mask=torch.zeros(3, 4, dtype=torch.bool)).pow(2).sum().backward()
    tracker.close()


def test_each_norms_own_statistic_and_no_silent_default():
    """Fig. 4 compares sigma^2 of BN with psi^2 of PN-V; a name that is not a registry name (such
    as a preset's short name "pnv") is an error, not sigma^2 (which once mislabelled PN-V)."""
    assert [stat_column(n, "forward") for n in ("batch", "power_v", "power")] == ["var_dist", "psi2_dist", "psi2_dist"]
    assert stat_column("power_v", "backward") == "g_psi2"
    with pytest.raises(ValueError, match="'pnv'.*registry name"):
        stat_column("pnv", "forward")
    rows = [{"step": i, "x": float(i)} for i in range(10)]
    assert bucket_summary(rows, "x", 10, 2) == [(2.0, 4.0), (7.0, 9.0)]
    assert bucket_summary(rows[:5], "x", 10, 2) == [(2.0, 4.0), None]


def test_plot_stats_cli(tmp_path):
    bn, pnv = tmp_path / "bn.csv", tmp_path / "pnv.csv"
    _track_run(bn, "batch")
    _track_run(pnv, "power_v")
    rows = read_stats(bn)
    assert rows[0]["norm"] == "batch" and len(rows) == 10 and not math.isnan(rows[0]["g_var"])
    buckets = bucket_values(rows, "var_dist", total_steps=10)
    assert [len(b) for b in buckets] == [2, 2, 2, 2, 2]
    out = tmp_path / "fig" / "fig4.png"
    _cli("plot_stats").main([str(bn), str(pnv), "--out", str(out)])
    _png_ok(out)
    out2 = tmp_path / "fig2.png"
    _cli("plot_stats").main([str(bn), "--out", str(out2), "--forward", "mu_dist", "--backward",
                             "g_mu", "--labels", "BN", "--total-steps", "20"])
    _png_ok(out2)
    with pytest.raises(SystemExit):
        _cli("plot_stats").main([str(bn), "--out", str(out2), "--layer", "nope"])


def _fake_checkpoint(path: Path, weight: torch.Tensor, key: str) -> None:
    torch.save({"model": {key: weight, "encoder.layers.0.fc1.weight": torch.zeros(2, 2)},
                "cfg": {"model": "fake"}}, path)


def test_embedding_spectrum_cli(tmp_path):
    torch.manual_seed(0)
    u, _ = torch.linalg.qr(torch.randn(20, 6))
    s = torch.tensor([6.0, 3.0, 2.0, 1.5, 1.0, 0.5])
    _fake_checkpoint(tmp_path / "ln.pt", u * s, "encoder.embed_tokens.weight")
    _fake_checkpoint(tmp_path / "pn.pt", torch.randn(20, 6), "decoder.embed_tokens.weight")
    w, key = load_embedding(tmp_path / "ln.pt")
    assert key == "encoder.embed_tokens.weight" and w.dtype == torch.float64
    assert torch.allclose(normalized_spectrum(w), s.double() / 6, atol=1e-6)

    out = tmp_path / "spec.png"
    _cli("embedding_spectrum").main([str(tmp_path / "ln.pt"), str(tmp_path / "pn.pt"),
                                     "--labels", "LN", "PN", "--out", str(out)])
    _png_ok(out)
    records = json.loads((tmp_path / "spec.json").read_text())
    assert [r["label"] for r in records] == ["LN", "PN"]
    assert records[1]["key"] == "decoder.embed_tokens.weight"
    assert records[0]["normalized_singular_values"][0] == 1.0
    with open(tmp_path / "spec.csv", newline="") as f:
        table = list(csv.reader(f))
    assert table[0] == ["index", "LN", "PN"] and len(table) == 7
    assert float(table[2][1]) == pytest.approx(0.5, rel=1e-5)

    torch.save({"model": {"x": torch.zeros(2)}}, tmp_path / "bad.pt")
    with pytest.raises(SystemExit, match="embedding-like keys"):
        _cli("embedding_spectrum").main([str(tmp_path / "bad.pt"), "--out", str(out)])


def test_sweep_plan_and_bleu():
    points = plan(["layer", "pn"], [512, 256], 1024)
    assert [(p.name, p.update_freq) for p in points] == [
        ("ln_256", 4), ("ln_512", 2), ("pn_256", 4), ("pn_512", 2)]
    assert plan(["batch"], [128, 256], None)[0].effective_tokens == 256
    with pytest.raises(ValueError, match="do not divide"):
        plan(["batch"], [300], 1024)
    with pytest.raises(ValueError, match="unknown norms"):
        plan(["group"], [128], None)
    assert [p.name for p in plan(["pn"], [256], 1024, seed=2)] == ["pn_256_s2"]
    assert parse_bleu("x\nGenerate test with beam=5: BLEU4 = 12.34, 40.1/...\n") == 12.34
    with pytest.raises(SystemExit, match="no BLEU"):
        parse_bleu("nothing")


def _sweep_args(tmp_path, **kw):
    args = dict(experiment="flags", data=str(tmp_path / "data-bin"), out=str(tmp_path / "sweep"),
                norms=["layer", "power"], sizes=[128, 256], effective_tokens=None, cpu=True,
                checkpoint="checkpoint_last.pt", train_args=["--arch", "x"],
                eval_args=["--beam", "5"], dry_run=False)
    args.update(kw)
    return SimpleNamespace(**args)


def test_sweep_resumable_with_fake_runner(tmp_path, capsys):
    calls = []

    def runner(cmd, log_file=None):
        calls.append(cmd)
        if "fairseq_cli.generate" in cmd:
            return f"BLEU4 = {10 + len(calls)}.5, ..."
        assert "--effective-tokens" in cmd and cmd[cmd.index("--effective-tokens") + 1] == "256"
        assert cmd[cmd.index("--max-tokens") + 1] in ("128", "256")
        return "trained"

    with pytest.raises(ValueError, match="sets the batch itself"):
        run_sweep(_sweep_args(tmp_path, train_args=["--update-freq", "4"]), runner=runner)
    run_sweep(_sweep_args(tmp_path, dry_run=True), runner=runner)
    assert not calls and "max_tokens 128 x update_freq 2" in capsys.readouterr().out
    assert not (tmp_path / "sweep").exists()

    records = run_sweep(_sweep_args(tmp_path), runner=runner)
    assert len(calls) == 8 and [r["stat_tokens"] for r in records] == [128, 256, 128, 256]
    assert (tmp_path / "sweep" / "points" / "pn_128.json").exists()
    (tmp_path / "sweep" / "points" / "ln_256.json").unlink()  # one point lost: only it is redone
    records = run_sweep(_sweep_args(tmp_path), runner=runner)
    assert len(calls) == 10 and len(records) == 4
    summary = json.loads((tmp_path / "sweep" / "sweep.json").read_text())
    assert len(summary["points"]) == 4

    from powernorm_fairseq.analysis.plots import plot_sweep

    plot_sweep(records, tmp_path / "fig5.png")
    _png_ok(tmp_path / "fig5.png")


def test_sweep_scores_prepared_data_with_the_pipeline(tmp_path):
    """Data with a prepare.json is scored by pipeline.evaluate; BLEU comes from its record."""
    data = tmp_path / "prepared" / "data-bin"
    data.mkdir(parents=True)
    (data.parent / "prepare.json").write_text("{}")

    def runner(cmd, log_file=None):
        if "powernorm_fairseq.pipeline.evaluate" in cmd:
            out = Path(cmd[cmd.index("--out") + 1])
            out.write_text(json.dumps({"metric": "bleu", "value": 33.3}))
            assert cmd[cmd.index("--data") + 1] == str(data)
        return ""

    records = run_sweep(_sweep_args(tmp_path, data=str(data), norms=["pn"], sizes=[256]),
                        runner=runner)
    assert records[0]["bleu"] == 33.3 and "pipeline.evaluate bleu" in records[0]["eval_cmd"]


def test_sweep_cli_dry_run(tmp_path, capsys):
    _cli("batch_size_sweep").main(["--data", "d", "--out", str(tmp_path / "s"), "--dry-run",
                                   "--experiment", "iwslt14", "--norms", "pn", "--sizes", "512",
                                   "4096", "--", "optimization.max_update=10"])
    out = capsys.readouterr().out
    assert "dataset.max_tokens=512 optimization.update_freq=[8]" in out and "update_freq 8" in out
    assert "optimization.max_update=10" in out and "fairseq_cli.generate" in out


def test_sweep_seed_names_points_and_sets_the_seed(tmp_path):
    """--seed: the seed reaches training (flags or hydra), names the points and is recorded;
    a second seed in the same OUT adds points, and the figure averages them."""
    seen = []

    def runner(cmd, log_file=None):
        seen.append(cmd)
        return "BLEU4 = 20.0, ..." if "fairseq_cli.generate" in cmd else ""

    records = run_sweep(_sweep_args(tmp_path, norms=["pn"], sizes=[256], seed=3), runner=runner)
    assert records[0]["seed"] == 3 and seen[0][-4:-2] == ["--seed", "3"]
    assert (tmp_path / "sweep" / "points" / "pn_256_s3.json").exists()
    run_sweep(_sweep_args(tmp_path, norms=["pn"], sizes=[256]), runner=runner)  # preset's own seed
    assert "--seed" not in seen[2] and (tmp_path / "sweep" / "points" / "pn_256.json").exists()
    with pytest.raises(ValueError, match="--seed sets the seed"):
        run_sweep(_sweep_args(tmp_path, seed=4, train_args=["--seed", "1"]), runner=runner)
    run_sweep(_sweep_args(tmp_path, experiment="multi30k", norms=["pn"], sizes=[128], seed=2,
                          train_args=[], dry_run=True), runner=runner)
    from powernorm_fairseq.analysis.sweep import SweepPoint, train_command

    cmd = train_command(SweepPoint("power", 128, 256, 2), _sweep_args(
        tmp_path, experiment="multi30k", train_args=["optimization.max_update=5"]), tmp_path)
    assert cmd[-4:] == ["dataset.max_tokens=128", "optimization.update_freq=[2]", "common.seed=2",
                        "optimization.max_update=5"]

    from powernorm_fairseq.analysis.plots import plot_sweep

    recs = [{"norm": "power", "stat_tokens": n, "bleu": b}
            for n, b in ((256, 20.0), (256, 22.0), (512, 21.0))]
    plot_sweep(recs, tmp_path / "seeds.png")
    _png_ok(tmp_path / "seeds.png")


def test_sweep_table_means_seeds_and_compares_with_ln():
    from powernorm_fairseq.analysis.sweep import sweep_table

    recs = [{"norm": "power", "stat_tokens": 512, "bleu": 22.0, "seed": 2},
            {"norm": "power", "stat_tokens": 512, "bleu": 20.0},  # the preset's seed: listed first
            {"norm": "layer", "stat_tokens": 512, "bleu": 19.5},
            {"norm": "power", "stat_tokens": 1024, "bleu": 18.0},
            {"norm": "batch", "stat_tokens": 1024, "bleu": None}]  # unfinished: skipped
    lines = sweep_table(recs).splitlines()
    assert lines[0] == "| N (tokens per statistics batch) | LN | PN |"
    assert lines[2] == "| 512 | 19.50 | 21.00 (20.00 / 22.00) |"
    assert lines[3] == "| 1024 | - | 18.00 |"
    assert lines[-2:] == ["| 512 | +1.50 |", "| 1024 | - |"]
    with pytest.raises(ValueError, match="no finished"):
        sweep_table([{"norm": "power", "stat_tokens": 512, "bleu": None}])


def test_columns_are_documented():
    from powernorm_fairseq.analysis import tracking

    for col in COLUMNS:
        assert f"``{col}``" in tracking.__doc__, col


def test_sweep_cli_plot_only_uses_recorded_points(tmp_path, monkeypatch):
    from powernorm_fairseq.analysis import plots

    points = tmp_path / "s" / "points"
    points.mkdir(parents=True)
    for norm, n, bleu in (("batch", 512, 10.0), ("batch", 4096, 12.0), ("power", 512, 13.0)):
        (points / f"{norm}_{n}.json").write_text(json.dumps(
            {"norm": norm, "stat_tokens": n, "effective_tokens": 4096, "bleu": bleu}))
    figures, save = [], plots.save_figure
    monkeypatch.setattr(plots, "save_figure", lambda fig, out, **kw: (figures.append(fig), save(fig, out, **kw)))
    _cli("batch_size_sweep").main(["--data", "d", "--out", str(tmp_path / "s"), "--plot-only"])
    _png_ok(tmp_path / "s" / "fig5_batch_size.png")
    (fig,) = figures  # one line per norm through its recorded points, labelled, in the paper's order
    lines = [(line.get_label(), list(line.get_xdata()), list(line.get_ydata()))
             for line in fig.axes[0].get_lines()]
    assert lines == [("BN", [512, 4096], [10.0, 12.0]), ("PN", [512], [13.0])]
    assert not (tmp_path / "s" / "runs").exists()  # nothing was trained
    with pytest.raises(SystemExit):
        _cli("batch_size_sweep").main(["--data", "d", "--out", str(tmp_path / "empty"),
                                       "--plot-only"])
    (points / "power_4096.json").write_text(json.dumps(
        {"norm": "power", "stat_tokens": 4096, "effective_tokens": 8192, "bleu": 1.0}))
    with pytest.raises(SystemExit):  # points of different effective batches do not mix
        _cli("batch_size_sweep").main(["--data", "d", "--out", str(tmp_path / "s"), "--plot-only"])
