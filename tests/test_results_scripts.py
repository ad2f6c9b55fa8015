"""scripts/reproduce.py and scripts/make_results.py (powernorm_fairseq.campaign: cli and make, and
.results): log parsing and tables built from records only."""

import collections
import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# the campaign's modules behind each script (powernorm_fairseq.campaign)
MODULES = {"reproduce": ("cli", "spec", "records", "setaside", "run", "bootstrap", "status", "commit"),
           "make_results": ("make", "view", "figures", "tables", "analyses", "budget", "pilot", "mechanism",
                            "leak_table", "spec")}


class _Script:
    """The modules behind ``scripts/<name>.py`` as one namespace, as the one module they were: a
    name is read from the first module that has it, and a patch of a name reaches every module
    that holds the same object (monkeypatch sets, and restores, through here)."""

    def __init__(self, names):
        object.__setattr__(self, "_modules", [importlib.import_module(f"powernorm_fairseq.campaign.{n}")
                                              for n in names])

    def __getattr__(self, name):
        for module in self._modules:
            if hasattr(module, name):
                return getattr(module, name)
        raise AttributeError(name)

    def __setattr__(self, name, value):
        old = getattr(self, name)
        for module in self._modules:
            if getattr(module, name, None) is old:
                setattr(module, name, value)

    @property
    def __dict__(self):  # what monkeypatch reads to restore a patched name: the modules' names
        return collections.ChainMap(*(vars(m) for m in self._modules))


def load_script(name):
    """The modules behind ``scripts/<name>.py``."""
    return _Script(MODULES[name])


LOG = """\
[2026-11-22 07:23:37,072][train_inner][INFO] - epoch 001:     25 / 124 loss=12.786, nll_loss=12.678, ppl=6553.6, wps=431.7, ups=0.12, wpb=3424.5, num_updates=25
[2026-11-22 07:26:27,618][train_inner][INFO] - epoch 001:     50 / 124 loss=10.883, nll_loss=10.557, ppl=1506.91, wps=538.4, ups=0.15, wpb=3604.8, num_updates=50
[2026-11-22 07:32:17,540][valid][INFO] - epoch 001 | valid on 'valid' subset | loss 8.539 | nll_loss 7.755 | ppl 215.96 | wps 1790.4 | wpb 2560.3 | bsz 169 | num_updates 100
[2026-11-22 07:34:06,440][valid][INFO] - epoch 001 | valid on 'valid' subset | loss 8.234 | nll_loss 7.411 | ppl 170.14 | wps 2082.8 | wpb 2560.3 | bsz 169 | num_updates 124 | best_loss 8.234
[2026-11-22 07:34:06,500][train][INFO] - epoch 001 | loss 11.2 | nll_loss 11.0 | ppl 2000 | wps 500.5 | ups 0.15 | wpb 3400 | bsz 240 | num_updates 124 | lr 0.001 | gnorm 1.0 | train_wall 800 | wall 820
[2026-11-22 07:40:00,000][fairseq_cli.train][INFO] - done training in 100.5 seconds
[2026-11-22 07:50:00,000][fairseq_cli.train][INFO] - done training in 20.0 seconds
"""


def test_parse_log_reads_curve_speed_and_time(tmp_path):
    reproduce = load_script("reproduce")
    log = tmp_path / "train.log"
    log.write_text(LOG)
    parsed = reproduce.parse_log(log)
    assert parsed["valid_loss"] == [[100, 8.539], [124, 8.234]]
    assert parsed["median_train_wps"] == 538.4
    assert parsed["fairseq_train_s"] == 120.5  # resumed segments add up
    assert parsed["epochs"] == [{"epoch": 1, "wps": 500.5, "num_updates": 124, "train_wall": 800}]
    assert parsed["valid_loss_by_epoch"] == [[1, 8.234]]  # the end-of-epoch validation wins
    assert parsed["train_s_per_update"] == round(800 / 124, 3)
    assert parsed["stopped_by"] is None


CONVERGED_LOG = "".join(
    f"[2026-12-01 10:00:00,000][valid][INFO] - epoch {e:03d} | valid on 'valid' subset | loss {v} | "
    f"nll_loss 1 | ppl 2 | num_updates {124 * e}\n"
    f"[2026-12-01 10:00:01,000][train][INFO] - epoch {e:03d} | loss 5 | wps 900.0 | ups 1 | "
    f"num_updates {124 * e} | lr 0.001 | train_wall 100 | wall 101\n"
    for e, v in enumerate([6.0, 5.0, 4.5, 4.6, 4.7, 4.55, 4.8, 4.9], start=1)
) + ("[2026-12-01 10:00:02,000][fairseq_cli.train][INFO] - early stop since valid performance "
     "hasn't improved for last 5 runs\n")


def test_parse_log_reads_the_stopping_rule(tmp_path):
    reproduce = load_script("reproduce")
    log = tmp_path / "train.log"
    log.write_text(CONVERGED_LOG)
    parsed = reproduce.parse_log(log)
    assert (parsed["last_epoch"], parsed["best_epoch"], parsed["best_valid_loss"]) == (8, 3, 4.5)
    assert parsed["stopped_by"].startswith("patience (5 epochs")
    assert parsed["train_s_per_update"] == round(800 / (124 * 8), 3)


def test_converged_campaign_overrides_are_the_papers_rule():
    reproduce = load_script("reproduce")
    ov = reproduce.CAMPAIGNS["converged"].overrides(reproduce.CORPORA["multi30k"])
    assert "checkpoint.patience=5" in ov and "checkpoint.save_interval_updates=0" in ov
    assert "checkpoint.keep_last_epochs=5" in ov and "optimization.max_update=0" in ov
    assert f"optimization.max_epoch={reproduce.CORPORA['multi30k'].max_epoch}" in ov
    assert reproduce.CAMPAIGNS["converged"].evaluations == ("avg", "best", "last")
    assert reproduce.CAMPAIGNS["pilot"].overrides(reproduce.CORPORA["ptb"]) == []


def test_status_table_tells_running_interrupted_and_to_do(tmp_path, monkeypatch):
    import dataclasses

    reproduce = load_script("reproduce")
    # the arithmetic below is at a 30-epoch cap (Multi30k's until issue 37 raised it)
    monkeypatch.setitem(reproduce.CORPORA, "multi30k", dataclasses.replace(reproduce.CORPORA["multi30k"], max_epoch=30))
    recs = tmp_path / "results" / "runs" / "multi30k"
    recs.mkdir(parents=True)
    seg = {"wall_s": 7200.0, "threads": 1}
    (recs / "ln_s1.json").write_text(json.dumps({"norm": "ln", "seed": 1, "status": "done",
                                                 "train_segments": [seg], "last_epoch": 30}))
    (recs / "bn_s1.json").write_text(json.dumps({"norm": "bn", "seed": 1, "status": "training",
                                                 "train_segments": [{"wall_s": 3600.0, "threads": 1}]}))
    (recs / "pn_s1.json").write_text(json.dumps({"norm": "pn", "seed": 1, "status": "training"}))
    lock = tmp_path / "runs" / "converged" / "multi30k" / "bn_s1" / "run.lock"
    lock.parent.mkdir(parents=True)
    lock.write_text(f"{os.getpid()} host\n")  # a live process holds it
    # its log has gone on since the record was written: the table shows the log's progress
    (lock.parent / "train.log").write_text(CONVERGED_LOG)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    lock = tmp_path / "runs" / "converged" / "multi30k" / "pn_s1" / "run.lock"
    lock.parent.mkdir(parents=True)
    lock.write_text(f"{dead} host\n")
    args = reproduce.argparse.Namespace(campaign="converged", corpus="multi30k", norms=["ln", "bn", "pn", "pnv"],
                                        seed_list=[1], threads=1, track_norm_stats=False, override=[],
                                        root=str(tmp_path))
    reproduce.write_status(args)
    status = (tmp_path / "results" / "status.md").read_text()
    assert "| multi30k | ln_s1 | done | 30 |" in status and "| 2.00 |" in status
    # nothing changed: a later call (the one that ends a job, after its --commit) leaves the
    # table as it is, its time included, instead of a checkout modified by a timestamp
    with monkeypatch.context() as later:
        later.setattr(reproduce.time, "strftime", lambda fmt, *a: "2099-01-01 00:00:00 UTC")
        reproduce.write_status(args)
    assert (tmp_path / "results" / "status.md").read_text() == status
    assert "| multi30k | bn_s1 | running | 8 | 3 |" in status
    # PN was killed before its first checkpoint: there is nothing to resume, it starts again
    assert "| multi30k | pn_s1 | interrupted before its first checkpoint (rerun the command to start it at update 0) |" in status
    assert "| multi30k | pnv_s1 | to do |" in status
    assert "Spent: 3.00 core-hours" in status
    (lock.parent / "checkpoint_last.pt").write_bytes(b"")  # with a checkpoint it resumes
    reproduce.write_status(args)
    assert "| multi30k | pn_s1 | interrupted (rerun the command to resume) |" in \
        (tmp_path / "results" / "status.md").read_text()
    (lock.parent / "checkpoint_last.pt").unlink()
    # every run of the campaign is listed (5 norms x 3 seeds per corpus), not only this call's
    # left: each run's epochs to the 30-epoch cap at LN's 2/30 core-hours per epoch, so the
    # running BN (8 epochs in) counts 22 of them, the 12 runs to do and the interrupted PN 30
    assert "multi30k: 14 run(s) not done, about 27.5 core-hours (their epochs to the cap" in status
    assert "| ptb | pnpaper_s3 | to do |" in status and "ptb: 15 run(s) not done" in status
    # the resume commands name the corpora with runs left (and the job with the most runs to spare)
    assert "reproduce.py multi30k --seeds 1,2,3 --threads 1 --commit" in status
    assert "reproduce.py ptb --seeds 1,2,3 --threads 1 --commit" in status and "ptb has the most runs left" in status
    reproduce = load_script("reproduce")
    assert reproduce.resume_lines({"converged": {"multi30k": 7}, "budget": {}})[2:] == [
        "    python scripts/reproduce.py multi30k --seeds 1,2,3 --threads 1 --commit", ""]
    assert reproduce.resume_lines({"converged": {}, "budget": {}}) == ["Nothing is left to run.", ""]


def converged_record(norm, seed, bleu, **extra):
    ev = {w: {"value": bleu + d, "bleu_tokenized": {"score": bleu + d, "signature": "nrefs:1|tok:none"},
              "bleu_detok": {"score": bleu + d - 0.5}} for w, d in (("avg", 0.0), ("best", -0.2), ("last", -0.4))}
    return {"norm": norm, "seed": seed, "status": "done", "evaluations": ev, "last_epoch": 30 + seed,
            "best_epoch": 25 + seed, "core_hours": 1.5, "stopped_by": "patience (5 epochs ...)",
            "valid_loss_by_epoch": [[1, 6.0], [2, 5.0 - seed * 0.01]], "hardware": {"cpu": "test", "threads": 1},
            "train_segments": [{"commit": "abc"}], **extra}


@pytest.fixture
def results_dir(tmp_path):
    make_results = load_script("make_results")
    (tmp_path / "README.md").write_text("intro\n<!-- results:begin -->\nSTALE-CONTENT\n<!-- results:end -->\nrest\n")
    runs = tmp_path / "results" / "runs" / "multi30k"
    runs.mkdir(parents=True)
    # LN 20, 21, 22; PN +1.0, +1.2, +1.1 (a consistent gain); BN -1, +1, 0 (noise)
    for seed, (ln, pn, bn) in enumerate([(20.0, 21.0, 19.0), (21.0, 22.2, 22.0), (22.0, 23.1, 22.0)], start=1):
        (runs / f"ln_s{seed}.json").write_text(json.dumps(converged_record("ln", seed, ln)))
        pb = {"bleu_tokenized": {"p_value": 0.001, "signature": "bs:1000", "system": {"score": pn},
                                 "baseline": {"score": ln}}}
        (runs / f"pn_s{seed}.json").write_text(json.dumps(converged_record("pn", seed, pn, paired_bootstrap=pb)))
        (runs / f"bn_s{seed}.json").write_text(json.dumps(converged_record("bn", seed, bn)))
    pilot = tmp_path / "results" / "pilot" / "runs" / "multi30k"
    pilot.mkdir(parents=True)
    (pilot / "pnpaper_s1.json").write_text(json.dumps({
        "norm": "pnpaper", "seed": 1, "status": "done", "known_fault": "fault 1",
        "evaluation": {"bleu_tokenized": {"score": 19.0}, "bleu_detok": {"score": 18.9}},
        "valid_loss": [[100, 6.0], [200, 5.5]]}))
    return make_results, tmp_path


def test_converged_tables_name_a_difference_only_when_the_interval_excludes_zero(results_dir, monkeypatch):
    make_results, root = results_dir
    figures, save = {}, make_results._save_fig
    monkeypatch.setattr(make_results, "_save_fig", lambda fig, out: (figures.update({out.name: fig}), save(fig, out)))
    make_results.main(["--root", str(root)])
    table = (root / "results" / "table1_multi30k.md").read_text()
    assert "| LN | 35.5 | 29.5 | 21.00 ± 1.00 (3 seeds, range 20.00-22.00) |" in table
    # PN - LN = 1.1 +- t(0.975, 2) * 0.1 / sqrt(3) = 1.10 [0.85, 1.35]
    assert "+1.10 [+0.85, +1.35] (3 seeds): PN > LN (better)" in table
    assert "BN | +0.00 [" in table and "no significant difference at this scale" in table
    assert "s1: 21.00 vs 20.00, p = 0.001" in table
    assert "- Does PN (reference variant) beat LN? PN > LN (better)" in table
    assert "s1: 31 (26)" in table  # stopping and best epoch per seed
    assert "Stopping: 9 finished run(s): 9 stopped by the patience rule (converged), 0 at the 30-epoch cap" in table
    assert (root / "results" / "multi30k_valid_loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the curves: each norm's mean over its seeds per epoch (epoch 2: 5.0 - 0.01 x mean seed 2)
    curves = {line.get_label(): (list(line.get_xdata()), list(line.get_ydata()))
              for line in figures["multi30k_valid_loss.png"].axes[0].get_lines()}
    assert curves == {f"{n} (3 seeds)": ([1, 2], [6.0, pytest.approx(4.98)]) for n in ("LN", "BN", "PN")}
    readme = (root / "README.md").read_text()
    assert "STALE-CONTENT" not in readme and "PN > LN (better)" in readme and readme.endswith("rest\n")
    assert "| norm - LN (higher BLEU is better) |" in readme  # what the sign means
    ptb = (root / "results" / "table2_ptb.md").read_text()
    assert "| LN | 53.2 | 20.9 | not run |" in ptb and "- Does BN fall behind LN? not run yet" in ptb
    pilot = (root / "results" / "pilot" / "table1_multi30k.md").read_text()
    assert "PN (paper variant) (trained with fault 1) | 19.00 (1 seed)" in pilot


def test_converged_tables_name_the_seed_pairs_trained_on_different_cpus(results_dir):
    make_results, root = results_dir
    make_results.main(["--root", str(root)])
    assert "each seed pair above trained both its runs on the same CPU model" in \
        (root / "results" / "table1_multi30k.md").read_text()
    bn = root / "results" / "runs" / "multi30k" / "bn_s2.json"
    bn.write_text(json.dumps({**json.loads(bn.read_text()), "hardware": {"cpu": "AMD EPYC", "threads": 1}}))
    make_results.main(["--root", str(root)])
    table = (root / "results" / "table1_multi30k.md").read_text()
    assert "different CPU models (same initialisation and data order, different floating-point kernels): " \
        "BN s2 (AMD EPYC) vs LN s2 (test)." in table


def test_make_results_help_writes_nothing(tmp_path):
    before = {p: p.stat().st_mtime_ns for p in (REPO / "results").rglob("*") if p.is_file()}
    readme = (REPO / "README.md").read_text()
    out = subprocess.run([sys.executable, str(REPO / "scripts" / "make_results.py"), "--help"],
                         capture_output=True, text=True, cwd=tmp_path)
    assert out.returncode == 0 and "usage" in out.stdout
    assert {p: p.stat().st_mtime_ns for p in (REPO / "results").rglob("*") if p.is_file()} == before
    assert (REPO / "README.md").read_text() == readme





def _composed(name: str, overrides: list[str]) -> dict:
    """The fairseq config hydra composes from preset ``name`` and ``overrides``."""
    from fairseq.dataclass.initialize import add_defaults, hydra_init
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from omegaconf import OmegaConf

    import powernorm_fairseq.models  # noqa: F401  (the plugin's model dataclasses)
    from powernorm_fairseq.presets import materialize

    hydra_init(name)
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(materialize()), version_base="1.1"):  # the presets hydra loads
        cfg = compose(name, overrides=overrides)
    add_defaults(cfg)
    return OmegaConf.to_container(cfg)


@pytest.mark.parametrize("corpus,campaign,norm", [("multi30k", "converged", "pnpaper"),
                                                  ("ptb", "converged", "bn")])
def test_campaign_training_resolves_to_the_preset_with_the_campaign_overrides(tmp_path, corpus, campaign, norm):
    """A campaign's run trains through pipeline.train (batch scaling, repair, launch record) and
    still resolves to the config its records were trained with before: the preset plus the data,
    seed, save dir and the campaign's overrides (the command the campaign started with)."""
    from powernorm_fairseq.pipeline import train

    reproduce = load_script("reproduce")
    args = reproduce.argparse.Namespace(campaign=campaign, threads=1, track_norm_stats=True, override=[],
                                        root=str(tmp_path))
    run = reproduce.Run(corpus, norm, 2, args)
    data = tmp_path / run.spec.prepared / "data-bin"
    opts, overrides = train.parse_args(run.train_argv(data))
    assert (opts.experiment, opts.norm, opts.data, opts.save_dir) == (run.campaign.prefix(corpus), norm,
                                                                     str(data), str(run.dir))
    opts.data, opts.save_dir = data, run.dir
    hydra_args, batch = train.build_preset_command(opts, overrides, world=1)
    assert batch["effective"] == batch["target"] and batch["update_freq"] == 1
    name = hydra_args[hydra_args.index("--config-name") + 1]
    assert name == f"{run.campaign.prefix(corpus)}_{norm}"
    before = [f"task.data={data}", f"common.seed={run.seed}", f"checkpoint.save_dir={run.dir}",
              *run.campaign.overrides(run.spec), f"++model.track_norm_stats={run.dir / 'norm_stats.csv'}"]
    now = [a for a in hydra_args if "=" in a and not a.startswith("hydra.")]
    assert _composed(name, now) == _composed(name, before)


def test_budget_arithmetic_uses_the_measured_epoch_cost_and_the_cap():
    make_results = load_script("make_results")
    cap = make_results.spec.CORPORA["multi30k"].max_epoch
    epochs = [{"epoch": e, "train_wall": 1000 if e == 1 else 200 + e, "num_updates": 124 * e}
              for e in range(1, cap + 11)]
    curve = [[e, 5.0 - 0.01 * min(e, cap + 5)] for e in range(1, cap + 11)]
    rec = {"status": "done", "epochs": epochs, "valid_loss_by_epoch": curve, "best_epoch": cap + 5,
           "last_epoch": cap + 10, "stopped_by": "patience", "hardware": {"threads": 1}}
    line = make_results.budget_arithmetic("multi30k", rec, 15)
    walls = sorted(200 + e for e in range(2, cap + 11))  # epoch 1 left out
    quiet, median = walls[len(walls) // 4], walls[len(walls) // 2]
    assert f"an epoch costs {quiet} s" in line and f"median {median} s" in line
    assert f"{15 * cap * quiet / 3600:.1f} core-hours of training ({15 * cap * median / 3600:.1f} at the" in line
    assert f"its best up to epoch {cap} was {5.0 - 0.01 * cap:.3f}, +0.050 from its best" in line
    running = make_results.budget_arithmetic("multi30k", {**rec, "status": "training"}, 15)
    assert "has not finished" in running and "from its best" not in running
    # the record cannot tell a running budget run from one whose checkpoints were lost
    assert "so far" not in running and "`status.md` says whether it is running" in running


def test_the_campaigns_tracked_runs_record_norm_stats_without_the_flag(tmp_path):
    """Multi30k seed 1 of the converged campaign records the norm statistics (Figs. 2-4) even when
    resumed by a command without --track-norm-stats; other runs only with the flag."""
    reproduce = load_script("reproduce")

    def tracked(corpus, seed, flag=False, campaign="converged"):
        args = reproduce.argparse.Namespace(campaign=campaign, threads=1, track_norm_stats=flag,
                                            override=[], root=str(tmp_path))
        run = reproduce.Run(corpus, "bn", seed, args)
        return any("track_norm_stats=" in a for a in run.train_argv(tmp_path / "data-bin"))

    assert tracked("multi30k", 1)
    assert not tracked("multi30k", 2) and not tracked("ptb", 1) and not tracked("multi30k", 1, campaign="budget")
    assert tracked("multi30k", 2, flag=True)


def test_collect_keeps_a_capped_runs_stopping_note(tmp_path):
    reproduce = load_script("reproduce")
    args = reproduce.argparse.Namespace(campaign="converged", threads=1, track_norm_stats=False,
                                        override=[], root=str(tmp_path))
    run = reproduce.Run("ptb", "ln", 1, args)
    run.dir.mkdir(parents=True)
    (run.dir / "train.log").write_text(LOG)  # no early stop in the log
    run.save(status="done", stopped_by="epoch cap (12 epochs; not converged by the rule)")
    run.collect()
    assert run.record["stopped_by"].startswith("epoch cap")


STATS_HEADER = "step,micro,layer,norm,tokens,d,mu_dist,var_dist,psi2_dist,g_mu,g_var,g_psi2,gamma_mean,gamma_max,lambda,nu\n"


def _stats_csv(norm: str, steps: int = 20) -> str:
    return STATS_HEADER + "".join(
        f"{i},0,encoder.layers.0.self_attn_layer_norm,{norm},100,8,{0.1 + i / 100},{0.2 + i / 50},"
        f"{0.3},{1e-4},{2e-4},{3e-4},,,,\n" for i in range(steps))


def test_a_finished_runs_analyses_are_kept_in_the_records(tmp_path):
    """collect of a finished run copies its tracked statistics beside the record and stores its
    averaged model's embedding spectrum, so make_results needs no run directory (issue 15)."""
    import torch

    reproduce = load_script("reproduce")
    args = reproduce.argparse.Namespace(campaign="converged", threads=1, track_norm_stats=False,
                                        override=[], root=str(tmp_path))
    run = reproduce.Run("multi30k", "bn", 1, args)
    run.dir.mkdir(parents=True)
    (run.dir / "norm_stats.csv").write_text(_stats_csv("batch"))
    torch.manual_seed(0)
    weight = torch.randn(30, 6)
    torch.save({"model": {"encoder.embed_tokens.weight": weight}}, run.dir / "checkpoint_avg.pt")
    run.save(status="training")
    run.collect()  # unfinished: nothing kept yet
    assert "embedding_spectrum" not in run.record and not run.stats_record.exists()
    run.save(status="done")
    run.collect()
    assert run.stats_record.read_text() == _stats_csv("batch")
    assert run.record["norm_stats"] == "bn_s1.norm_stats.csv"
    spectrum = run.record["embedding_spectrum"]
    expected = torch.linalg.svdvals(weight.double())
    assert spectrum["shape"] == [30, 6] and spectrum["values"][0] == 1.0
    assert spectrum["values"] == pytest.approx((expected / expected[0]).tolist(), abs=1e-6)
    saved = json.loads(run.record_path.read_text())
    assert saved["embedding_spectrum"] == spectrum
    # a record written without them (by code before Run.save merged): the next collect restores both
    stale = {k: v for k, v in saved.items() if k not in ("norm_stats", "embedding_spectrum")}
    reproduce.atomic_write_json(run.record_path, stale)
    run = reproduce.Run("multi30k", "bn", 1, args)
    run.collect()
    assert run.record["norm_stats"] == "bn_s1.norm_stats.csv" and run.record["embedding_spectrum"] == spectrum


def test_make_results_draws_the_analyses_from_the_converged_records(tmp_path, monkeypatch):
    from powernorm_fairseq.analysis import plots

    make_results = load_script("make_results")
    figures, save = {}, plots.save_figure
    monkeypatch.setattr(plots, "save_figure", lambda fig, out, **kw: (figures.update({Path(out).name: fig}),
                                                                      save(fig, out, **kw)))
    results = tmp_path / "results"
    runs = results / "runs" / "multi30k"
    runs.mkdir(parents=True)
    (results / "analysis.md").write_text("# A\n<!-- converged:begin -->\nSTALE\n<!-- converged:end -->\npilot\n")
    spectra = {"ln": [1.0, 0.5, 0.25, 0.1, 0.05], "pn": [1.0, 0.6, 0.4, 0.3, 0.2]}
    for norm in ("ln", "pn"):
        for seed in (1, 2):
            (runs / f"{norm}_s{seed}.json").write_text(json.dumps({
                "norm": norm, "seed": seed, "status": "done",
                "embedding_spectrum": {"values": [v * (1 if seed == 1 else 0.9) if i else 1.0
                                                  for i, v in enumerate(spectra[norm])]}}))
    lines = make_results.build_analyses(tmp_path)
    assert any("Figs. 2-4" in line and "waiting" in line and "BN and PN-V" in line for line in lines)
    curves = json.loads((results / "fig6_embedding_spectrum_converged.json").read_text())["values"]
    assert curves["LN (2 seeds)"] == pytest.approx([1.0, 0.475, 0.2375, 0.095, 0.0475])
    assert (results / "fig6_embedding_spectrum_converged.png").read_bytes()[:4] == b"\x89PNG"
    for norm, name in (("bn", "batch"), ("pnv", "power_v")):
        (runs / f"{norm}_s1.json").write_text(json.dumps({
            "norm": norm, "seed": 1, "status": "done", "last_epoch": 30,
            "norm_stats": f"{norm}_s1.norm_stats.csv"}))
        (runs / f"{norm}_s1.norm_stats.csv").write_text(_stats_csv(name))
    lines = make_results.build_analyses(tmp_path)
    assert (results / "fig4_norm_stats_converged.png").read_bytes()[:4] == b"\x89PNG"
    assert (results / "fig2_3_mean_stats_converged.png").is_file()
    # Fig. 4 plots each norm's own statistic: sigma^2 for BN and psi^2 for PN-V (not its shadow sigma^2)
    assert figures["fig4_norm_stats_converged.png"].axes[0].get_ylabel() == \
        plots.COLUMN_LABELS["var_dist"] + " / " + plots.COLUMN_LABELS["psi2_dist"]
    assert "BN seed 1, 30 epochs, `bn_s1.norm_stats.csv`" in "\n".join(lines)
    # each run's own statistic (PN-V: psi^2, constant 0.3 here; BN: sigma^2, 0.2 + step/50), from
    # the CSV's norm column: the record's short name "pnv" once fell back to sigma^2 for PN-V
    assert "| PN-V | `psi2_dist` | 0.3 (0.3) | 0.3 (0.3) |" in "\n".join(lines)
    assert "| BN | `var_dist` | 0.23 (0.26) | 0.31 (0.34) |" in "\n".join(lines)
    assert not (results / "pn_stability_converged.png").exists()  # no tracked PN run yet
    # PN's Gamma and nu from a tracked PN run (the paper variant's untracked record is left out)
    (runs / "pn_s1.json").write_text(json.dumps({
        "norm": "pn", "seed": 1, "status": "done", "last_epoch": 30, "norm_stats": "pn_s1.norm_stats.csv",
        "embedding_spectrum": {"values": spectra["pn"]}}))
    (runs / "pn_s1.norm_stats.csv").write_text(STATS_HEADER + "".join(
        f"{i},0,encoder.layers.0.self_attn_layer_norm,power,100,8,0.1,0.2,0.3,1e-4,2e-4,3e-4,1.0,"
        f"{1 + i / 10},1e-5,{i * 1e-6}\n" for i in range(20)))
    (runs / "pnpaper_s1.json").write_text(json.dumps({"norm": "pnpaper", "seed": 1, "status": "done"}))
    lines = make_results.build_analyses(tmp_path)
    assert figures["pn_stability_converged.png"].axes[0].get_ylabel() == plots.COLUMN_LABELS["gamma_max"]
    assert "PN (reference variant) seed 1, 30 epochs, `pn_s1.norm_stats.csv`" in "\n".join(lines)
    assert "| PN (reference variant) | `gamma_max` | 1.15 (1.3) | 1.55 (1.7) |" in "\n".join(lines)
    assert "PN (paper variant) seed" not in "\n".join(lines)
    make_results.update_between(results / "analysis.md", "converged", lines)
    text = (results / "analysis.md").read_text()
    assert "STALE" not in text and "fig4_norm_stats_converged.png" in text and text.endswith("pilot\n")


def test_measured_cost_projects_the_campaign_from_its_finished_runs(tmp_path):
    make_results = load_script("make_results")
    runs = tmp_path / "results" / "runs" / "multi30k"
    runs.mkdir(parents=True)
    (runs / "ln_s1.json").write_text(json.dumps(converged_record("ln", 1, 20.0, core_hours=3.0)))
    (runs / "bn_s1.json").write_text(json.dumps(converged_record("bn", 1, 20.0, core_hours=2.0)))
    (runs / "pn_s1.json").write_text(json.dumps(converged_record("pn", 1, 20.0, status="training")))
    line = make_results.measured_cost(tmp_path, 15)
    assert "multi30k: 2.50 core-hours per run over 2 finished run(s), 37.5 for 15 runs" in line
    assert "ptb: no finished run yet" in line and "whole campaign" not in line
    ptb = tmp_path / "results" / "runs" / "ptb"
    ptb.mkdir()
    (ptb / "ln_s1.json").write_text(json.dumps(converged_record("ln", 1, 20.0, core_hours=1.0)))
    assert "the whole campaign about 52 core-hours" in make_results.measured_cost(tmp_path, 15)


def _bleu_campaign(root: Path) -> Path:
    """A prepared Multi30k with one-line references under ``root``; returns its records folder."""
    prep = root / "data" / "multi30k"
    prep.mkdir(parents=True)
    for name in ("ref.tok", "ref.detok"):
        (prep / name).write_text("a b\n")
    (prep / "prepare.json").write_text(json.dumps({"references": {"tok": str(prep / "ref.tok"),
                                                                  "detok": str(prep / "ref.detok")}}))
    recs = root / "results" / "runs" / "multi30k"
    recs.mkdir(parents=True)
    return recs


def test_collect_adds_the_paired_bootstrap_once_a_norm_and_ln_of_its_seed_are_done(tmp_path, monkeypatch):
    """The bootstrap against LN must not wait for the end of a whole invocation (which a session
    may never reach): --collect and every finished run compute it for each done pair."""
    reproduce = load_script("reproduce")
    import powernorm_fairseq.analysis.stats as stats

    recs = _bleu_campaign(tmp_path)
    for norm in ("ln", "bn", "pn"):
        hyp = tmp_path / f"{norm}.hyp"
        hyp.write_text("a b\n")
        ev = {"avg": {"recipe": "multi30k", "hypotheses": str(hyp), "hypotheses_tokenized": str(hyp)}}
        status = "training" if norm == "pn" else "done"
        (recs / f"{norm}_s1.json").write_text(json.dumps({"norm": norm, "seed": 1, "status": status,
                                                          "evaluations": ev}))
    calls = []
    monkeypatch.setattr(stats, "paired_bootstrap_bleu",
                        lambda refs, base, hyp, tokenize, lowercase: calls.append(tokenize) or {"p_value": 0.5})
    reproduce.main(["multi30k", "--root", str(tmp_path), "--norms", "ln,bn,pn", "--seeds", "1", "--collect"])
    bn = json.loads((recs / "bn_s1.json").read_text())
    assert bn["paired_bootstrap"]["vs"] == "ln_s1" and bn["paired_bootstrap"]["bleu_tokenized"]["p_value"] == 0.5
    assert sorted(calls) == ["13a", "none"]  # BN only: LN is the baseline, PN is not done
    assert "paired_bootstrap" not in json.loads((recs / "pn_s1.json").read_text())


def test_the_paired_bootstrap_survives_a_replaced_machine(tmp_path, monkeypatch):
    """A finished run's translations are kept beside its record (committed with it), so a norm
    that finishes after the machine was replaced is still tested against LN of its seed. Before,
    LN's translations lived only in its run directory: lost with the machine (Multi30k LN seed 2),
    every later pair of that seed had no p-value, and the tables did not say why."""
    import shutil

    import powernorm_fairseq.analysis.stats as stats

    reproduce = load_script("reproduce")
    make_results = load_script("make_results")
    recs = _bleu_campaign(tmp_path)

    def finish(norm: str) -> None:
        """``norm`` seed 1 done on the machine of now: its translations in its run directory."""
        run_dir = tmp_path / "runs" / "converged" / "multi30k" / f"{norm}_s1"
        run_dir.mkdir(parents=True)
        ev = {}
        for field, suffix in (("hypotheses", "hyp.txt"), ("hypotheses_tokenized", "hyp.tok.txt")):
            (run_dir / f"eval_avg.{suffix}").write_text(f"{norm} {field}\n")
            ev[field] = str(run_dir / f"eval_avg.{suffix}")
        (recs / f"{norm}_s1.json").write_text(json.dumps({
            "norm": norm, "seed": 1, "status": "done", "evaluations": {"avg": {"recipe": "multi30k", **ev}}}))

    seen = []
    monkeypatch.setattr(stats, "paired_bootstrap_bleu", lambda refs, base, hyp, tokenize, lowercase: seen.append(
        (base, hyp)) or {"p_value": 0.5, "system": {"score": 1.0}, "baseline": {"score": 2.0}})
    collect = ["multi30k", "--root", str(tmp_path), "--norms", "ln,bn,pn", "--seeds", "1", "--collect"]
    finish("ln")
    reproduce.main(collect)  # LN done: its translations are kept beside its record
    shutil.rmtree(tmp_path / "runs")  # the machine is replaced: run directories gone, records kept
    finish("bn")
    reproduce.main(collect)
    bn = json.loads((recs / "bn_s1.json").read_text())
    assert bn["paired_bootstrap"]["bleu_tokenized"]["p_value"] == 0.5 and "paired_bootstrap_skipped" not in bn
    assert sorted(seen) == [(["ln hypotheses"], ["bn hypotheses"]),
                            (["ln hypotheses_tokenized"], ["bn hypotheses_tokenized"])]
    assert json.loads((recs / "ln_s1.json").read_text())["kept_hypotheses"] == {
        "hypotheses": "ln_s1.avg.hyp.txt", "hypotheses_tokenized": "ln_s1.avg.hyp.tok.txt"}
    assert (recs / "bn_s1.avg.hyp.tok.txt").read_text() == "bn hypotheses_tokenized\n"
    # LN's translations lost entirely (a run finished before they were kept): the pair is left
    # untested, and the record and the tables say why instead of leaving the seed out silently
    for f in recs.glob("ln_s1.avg.*"):
        f.unlink()
    finish("pn")
    reproduce.main(collect)
    pn = json.loads((recs / "pn_s1.json").read_text())
    assert "paired_bootstrap" not in pn and pn["paired_bootstrap_skipped"] == \
        "the test translations of ln_s1 are lost (a replaced machine); retrain ln_s1 " \
        "(reproduce --supersede ln_s1) to test this pair"
    lines = make_results.bootstrap_lines({"pn": [pn]})
    assert lines[0].startswith("- PN (reference variant) vs LN") and \
        "s1: not tested, the test translations of ln_s1 are lost" in lines[0]


def test_a_record_saved_by_two_processes_keeps_both_updates(tmp_path):
    """A training process and a ``--collect`` (or a second job on the corpus) each hold a copy of
    one run's record, read at their start. Each save keeps what the other wrote since: the keys a
    Run set are its own, the rest come from the file. Before, the later save wrote its whole stale
    copy, and a collect finishing after the run's last save turned a done record back to
    "evaluating", so that the next command re-ran the run's evaluations."""
    reproduce = load_script("reproduce")
    args = reproduce.argparse.Namespace(campaign="converged", threads=1, track_norm_stats=False,
                                        override=[], root=str(tmp_path))
    trainer = reproduce.Run("multi30k", "bn", 1, args)
    trainer.save(status="evaluating", error="from an earlier attempt")
    collector = reproduce.Run("multi30k", "bn", 1, args)  # reads the record as it is now
    trainer.save(status="done", evaluations={"avg": {"bleu": 1.0}})
    trainer.drop("error")
    collector.save(core_hours=2.5, valid_loss=[[1, 4.0]])  # its copy says "evaluating", has "error"
    on_disk = json.loads(trainer.record_path.read_text())
    assert on_disk["status"] == "done" and on_disk["evaluations"] == {"avg": {"bleu": 1.0}}
    assert on_disk["core_hours"] == 2.5 and "error" not in on_disk
    assert collector.record == on_disk  # and the collector now holds the merged record
    trainer.save(core_hours=3.0)  # a key both set: the latest save's value
    assert json.loads(trainer.record_path.read_text())["core_hours"] == 3.0
    assert json.loads(trainer.record_path.read_text())["valid_loss"] == [[1, 4.0]]


def _fake_stages(reproduce, monkeypatch, train) -> None:
    """Stand-ins for a run's stages: ``train`` trains, averaging writes a tiny model, each
    evaluation scores 31.0, and the paired bootstrap is left out."""
    import torch

    monkeypatch.setattr(reproduce.runner, "train", train)
    monkeypatch.setattr(reproduce.runner, "average", lambda d, n, kind, out: torch.save(
        {"model": {"encoder.embed_tokens.weight": torch.eye(3)}}, out))
    monkeypatch.setattr(reproduce.runner, "evaluate", lambda argv: Path(
        argv[argv.index("--out") + 1]).write_text(json.dumps({"value": 31.0, "recipe": "multi30k"})))
    monkeypatch.setattr(reproduce, "significance", lambda runs: None)


def test_a_run_another_process_is_training_is_left_to_it(tmp_path, monkeypatch):
    """The same command started twice (a second terminal, or two jobs given overlapping seeds)
    must not train one run directory twice at once, which would overwrite its checkpoints: a run
    whose ``run.lock`` another live process holds is left to it, record untouched; once that
    process is gone (killed: its flock goes with it) the same command resumes the run."""
    reproduce = load_script("reproduce")
    run_dir = tmp_path / "runs" / "converged" / "multi30k" / "ln_s1"
    run_dir.mkdir(parents=True)
    lock = run_dir / "run.lock"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import fcntl, os, sys, time\n"
         "fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT); fcntl.flock(fd, fcntl.LOCK_EX)\n"
         "os.write(fd, f'{os.getpid()} host\\n'.encode()); print('held', flush=True); time.sleep(120)",
         str(lock)], stdout=subprocess.PIPE, text=True)
    trained = []
    _fake_stages(reproduce, monkeypatch, lambda argv, echo=None: trained.append(argv))
    record = tmp_path / "results" / "runs" / "multi30k" / "ln_s1.json"
    command = ["multi30k", "--root", str(tmp_path), "--norms", "ln", "--seeds", "1"]
    try:
        assert holder.stdout.readline().strip() == "held"
        reproduce.main(command)
        assert trained == [] and not record.exists()
        assert lock.read_text().split()[0] == str(holder.pid)  # its lock is not taken or removed
    finally:
        holder.kill()
        holder.wait()
    # a lock written without a flock (by the code before it), with a live pid, is held too
    lock.write_text(f"{os.getppid()} host\n")
    reproduce.main(command)
    assert trained == [] and not record.exists()
    # the holder is gone: its pid is dead and nothing holds the flock, so the run trains
    lock.write_text(f"{holder.pid} host\n")
    reproduce.main(command)
    assert len(trained) == 1 and json.loads(record.read_text())["status"] == "done"
    assert not lock.exists()


def test_a_run_whose_checkpoints_were_lost_restarts_with_a_record_of_its_own(tmp_path, monkeypatch):
    """A replaced machine (or a deleted run directory) loses an unfinished run's checkpoints while
    its record, committed, survives. Rerun, the run restarts at update 0; its record must then hold
    only what the new training does: the lost segments must not count in its wall time and
    core-hours, nor an evaluation of a lost checkpoint stand in for the new one's. What was lost
    moves to ``lost`` (nothing is dropped) and the status table says so. A done run at a since
    raised cap without its checkpoint is left done, not retrained from 0 or marked failed."""
    import dataclasses

    reproduce = load_script("reproduce")
    recs = tmp_path / "results" / "runs" / "multi30k"
    recs.mkdir(parents=True)
    old = {"wall_s": 3600.0, "threads": 1, "commit": "old"}
    (recs / "ln_s1.json").write_text(json.dumps({
        "norm": "ln", "seed": 1, "status": "evaluating", "train_segments": [old], "started_commit": "old",
        "last_epoch": 12, "valid_loss_by_epoch": [[12, 4.4]], "evaluations": {"avg": {"value": 99.0}}}))
    capped = {"status": "done", "stopped_by": "epoch cap (30 epochs; not converged by the rule)",
              "command": "... optimization.max_epoch=30", "last_epoch": 30, "evaluations": {"avg": {"value": 7.0}}}
    (recs / "bn_s1.json").write_text(json.dumps({"norm": "bn", "seed": 1, **capped}))
    # killed in its first segment: only the epochs it logged (a collect read them) say it trained
    (recs / "pnv_s1.json").write_text(json.dumps({"norm": "pnv", "seed": 1, "status": "training", "last_epoch": 2,
                                                  "epochs": [{"epoch": 2, "train_wall": 1800}]}))
    # started on a machine since replaced, before its record named any training (PTB PN-paper s3)
    (recs / "pn_s1.json").write_text(json.dumps({"norm": "pn", "seed": 1, "status": "training",
                                                 "started_commit": "old"}))
    args = reproduce.argparse.Namespace(campaign="converged", corpus="multi30k", norms=["ln"], seed_list=[1],
                                        threads=1, track_norm_stats=False, override=[], root=str(tmp_path))
    reproduce.write_status(args)
    status = (tmp_path / "results" / "status.md").read_text()
    assert "| multi30k | ln_s1 | lost (no checkpoint to resume from" in status
    assert "| multi30k | pnv_s1 | lost (no checkpoint to resume from" in status
    assert "of which 1.50 on training lost" in status

    trained = []

    def train(argv, echo=None):
        trained.append(argv)
        (Path(argv[argv.index("--save-dir") + 1]) / "train.log").write_text(CONVERGED_LOG)

    _fake_stages(reproduce, monkeypatch, train)
    monkeypatch.setitem(reproduce.CORPORA, "multi30k",
                        dataclasses.replace(reproduce.CORPORA["multi30k"], max_epoch=40))
    reproduce.main(["multi30k", "--root", str(tmp_path), "--norms", "ln,bn,pnv,pn", "--seeds", "1", "--threads", "1"])

    assert len(trained) == 3  # LN, PN-V and PN restarted; BN, without a checkpoint to train on from, is not
    assert json.loads((recs / "pn_s1.json").read_text())["started_commit"] != "old"
    ln = json.loads((recs / "ln_s1.json").read_text())
    assert ln["status"] == "done" and ln["evaluations"]["avg"]["value"] == 31.0
    assert len(ln["train_segments"]) == 1 and ln["train_segments"][0]["commit"] != "old"
    assert ln["started_commit"] != "old" and ln["last_epoch"] == 8 and ln["core_hours"] < 1.0
    (lost,) = ln["lost"]
    assert lost["train_segments"] == [old] and lost["core_hours"] == 1.0 and lost["last_epoch"] == 12
    assert lost["evaluations"] == {"avg": {"value": 99.0}} and lost["valid_loss_by_epoch"] == [[12, 4.4]]
    assert set(reproduce.parse_log(tmp_path / "runs" / "converged" / "multi30k" / "ln_s1" / "train.log")) \
        <= set(reproduce.LOG_FIELDS)
    assert json.loads((recs / "bn_s1.json").read_text()) == {"norm": "bn", "seed": 1, **capped}
    status = (tmp_path / "results" / "status.md").read_text()
    assert "| multi30k | ln_s1 | done |" in status and "of which 1.50 on training lost" in status
    assert json.loads((recs / "pnv_s1.json").read_text())["lost"][0]["core_hours"] == 0.5


def test_a_superseded_run_is_trained_again_and_its_old_record_kept(tmp_path, monkeypatch):
    """``--supersede``: a done run whose test translations were lost (Multi30k LN s2, on a machine
    since replaced) can be trained again from update 0 without losing its record: the record and
    the files kept beside it move to ``superseded/`` (pointers renamed, reason kept), the bootstraps
    against it move to ``earlier_paired_bootstrap``, its core-hours stay spent, the next command
    trains the run afresh, and the tables list both values. Refused, with nothing moved, without a
    reason, for a run not done, and while the run directory holds files of its training."""
    reproduce, make_results = load_script("reproduce"), load_script("make_results")
    recs = tmp_path / "results" / "runs" / "multi30k"
    recs.mkdir(parents=True)
    ev = {"avg": {"bleu_tokenized": {"score": 30.0}, "hypotheses": "/gone/eval_avg.hyp.txt"}}
    ln = {"norm": "ln", "seed": 1, "status": "done", "core_hours": 2.0, "evaluations": ev, "lost": [{"core_hours": 0.5}],
          "hardware": {"cpu": "Intel", "threads": 1}, "norm_stats": "ln_s1.norm_stats.csv",
          "kept_hypotheses": {"hypotheses_tokenized": "ln_s1.avg.hyp.tok.txt"}}
    (recs / "ln_s1.json").write_text(json.dumps(ln))
    (recs / "ln_s1.norm_stats.csv").write_text("statistics\n")
    (recs / "ln_s1.avg.hyp.tok.txt").write_text("translations\n")
    (recs / "bn_s1.json").write_text(json.dumps({"norm": "bn", "seed": 1, "status": "done",
                                                 "paired_bootstrap": {"vs": "ln_s1", "p": 0.01}}))
    (recs / "pn_s1.json").write_text(json.dumps({"norm": "pn", "seed": 1, "status": "training"}))
    run_dir = tmp_path / "runs" / "converged" / "multi30k" / "ln_s1"
    run_dir.mkdir(parents=True)
    (run_dir / "checkpoint_last.pt").write_text("its training\n")
    before = sorted(p.name for p in recs.iterdir())
    base = ["multi30k", "--root", str(tmp_path), "--supersede"]
    for argv, said in ((["ln_s1"], "--reason"), (["ln_s1", "--reason", "lost"], "checkpoint_last.pt"),
                       (["ln_s1,pn_s1", "--reason", "lost"], "pn_s1: its record is training"),
                       (["ln_1", "--reason", "lost"], "not a run name")):
        with pytest.raises(SystemExit, match=said):
            reproduce.main([*base, *argv])
        assert sorted(p.name for p in recs.iterdir()) == before and json.loads((recs / "ln_s1.json").read_text()) == ln
    assert (run_dir / "checkpoint_last.pt").read_text() == "its training\n"  # never deleted for the user

    (run_dir / "checkpoint_last.pt").unlink()  # the user moved it aside (here: a replaced machine)
    reproduce.main([*base, "ln_s1", "--reason", "its test translations are lost"])
    assert not (recs / "ln_s1.json").exists()
    (old,) = (recs / "superseded").glob("ln_s1.*.json")
    stamp = old.name.split(".")[1]
    kept = json.loads(old.read_text())
    assert kept["superseded"]["reason"] == "its test translations are lost"
    assert {k: v for k, v in kept.items() if k not in ("superseded", "norm_stats", "kept_hypotheses")} == \
        {k: v for k, v in ln.items() if k not in ("norm_stats", "kept_hypotheses")}
    assert kept["norm_stats"] == f"ln_s1.{stamp}.norm_stats.csv"
    assert kept["kept_hypotheses"] == {"hypotheses_tokenized": f"ln_s1.{stamp}.avg.hyp.tok.txt"}
    assert (recs / "superseded" / kept["norm_stats"]).read_text() == "statistics\n"
    assert (recs / "superseded" / kept["kept_hypotheses"]["hypotheses_tokenized"]).read_text() == "translations\n"
    assert not list(recs.glob("ln_s1.*"))
    bn = json.loads((recs / "bn_s1.json").read_text())
    assert "paired_bootstrap" not in bn and bn["earlier_paired_bootstrap"] == [{"vs": "ln_s1", "p": 0.01}]
    status = (tmp_path / "results" / "status.md").read_text()
    assert "| multi30k | ln_s1 | to do (retrain; old record in superseded/) |" in status
    assert "Spent: 2.50 core-hours" in status
    assert "of which 0.50 on training lost with its checkpoints" in status and "and 2.00 on superseded runs" in status
    with pytest.raises(SystemExit, match="its record is missing"):  # said twice: nothing more moves
        reproduce.main([*base, "ln_s1", "--reason", "again"])
    # until the retrain is done the tables keep the superseded record: no finished seed goes missing
    (standin,) = make_results.load(recs, tmp_path)["ln"]
    assert standin["_file"] == f"results/runs/multi30k/superseded/{old.name}" and standin["_retrain"] == "to do"
    assert (recs / standin["norm_stats"]).read_text() == "statistics\n"
    assert make_results.status_line([standin]) == "s1: done (superseded; its retrain: to do)"

    trained = []

    def train(argv, echo=None):
        trained.append(argv)
        (Path(argv[argv.index("--save-dir") + 1]) / "train.log").write_text(CONVERGED_LOG)

    _fake_stages(reproduce, monkeypatch, train)
    monkeypatch.setattr(reproduce.runner, "evaluate", lambda argv: Path(argv[argv.index("--out") + 1]).write_text(
        json.dumps({"bleu_tokenized": {"score": 31.5}, "recipe": "multi30k"})))
    reproduce.main(["multi30k", "--root", str(tmp_path), "--norms", "ln", "--seeds", "1", "--threads", "1"])
    new = json.loads((recs / "ln_s1.json").read_text())
    assert len(trained) == 1 and new["status"] == "done" and "superseded" not in new and "lost" not in new
    runs = make_results.load(recs, tmp_path)
    (line,) = [x for x in make_results.superseded_lines(recs, runs, "bleu_tokenized", "BLEU") if x.startswith("- ")]
    assert line.startswith(f"- LN s1 (`superseded/{old.name}`): BLEU 30.00 on Intel, 1 thread(s); superseded ")
    assert "its test translations are lost. Its retrain: BLEU 31.50 on " in line and "(retrain - superseded: +1.50)" in line
    assert make_results.load(recs, tmp_path)["ln"] == [{**new, "_file": "results/runs/multi30k/ln_s1.json"}]


def test_supersede_with_commit_leaves_the_checkout_clean(tmp_path, monkeypatch):
    """``--supersede ... --commit`` commits the move together with the status table that shows the
    run to do again: before, the table was rewritten after the commit and left uncommitted."""
    reproduce, make_results = load_script("reproduce"), load_script("make_results")

    def git(*argv):
        return subprocess.run(["git", "-C", str(tmp_path), *argv], check=True, capture_output=True,
                              text=True).stdout.strip()

    git("init", "-q")
    git("config", "user.email", "t@example.com")
    git("config", "user.name", "t")
    recs = tmp_path / "results" / "runs" / "multi30k"
    recs.mkdir(parents=True)
    (recs / "ln_s1.json").write_text(json.dumps({"norm": "ln", "seed": 1, "status": "done", "core_hours": 1.0}))
    (tmp_path / "README.md").write_text("readme\n")
    git("add", ".")
    git("commit", "-q", "-m", "start")
    monkeypatch.setattr(make_results, "main", lambda argv: None)
    reproduce.main(["multi30k", "--root", str(tmp_path), "--supersede", "ln_s1", "--reason", "lost", "--commit"])
    assert git("status", "--porcelain", "--", "results") == ""
    assert "| multi30k | ln_s1 | to do (retrain; old record in superseded/) |" in git("show", "HEAD:results/status.md")


def test_a_killed_jobs_training_stays_in_the_record(tmp_path, monkeypatch):
    """A job killed without running its cleanup (SIGKILL, a session's end) must leave the training
    it did in the run's record: each epoch's end writes the open segment (wall time, epochs), and
    the next job to hold the run marks that segment killed and keeps counting it."""
    reproduce = load_script("reproduce")
    record = tmp_path / "results" / "runs" / "multi30k" / "ln_s1.json"
    seen = {}

    def train(argv, echo):
        save = Path(argv[argv.index("--save-dir") + 1])
        with open(save / "train.log", "a") as log:
            for line in CONVERGED_LOG.splitlines(keepends=True):
                log.write(line)
                log.flush()
                echo(line.rstrip("\n"))
                if "[train][INFO] - epoch 002" in line:  # what a SIGKILL here would leave
                    seen["killed"] = json.loads(record.read_text())
        (save / "checkpoint_last.pt").write_bytes(b"")

    _fake_stages(reproduce, monkeypatch, train)
    command = ["multi30k", "--root", str(tmp_path), "--norms", "ln", "--seeds", "1", "--threads", "1"]
    reproduce.main(command)
    killed = seen["killed"]
    (segment,) = killed["train_segments"]
    assert segment["open"] is True and segment["threads"] == 1 and "killed" not in segment
    assert killed["status"] == "training" and killed["last_epoch"] == 2
    assert killed["core_hours"] >= 200 / 3600  # the two epochs' logged training time at least
    done = json.loads(record.read_text())
    assert [s.get("open") for s in done["train_segments"]] == [None] and done["status"] == "done"

    # the job was killed there: the record stands as it left it; the next job resumes the run
    run_dir = tmp_path / "runs" / "converged" / "multi30k" / "ln_s1"
    (run_dir / "train.done").unlink()
    record.write_text(json.dumps({**killed, "train_segments": [{**segment, "wall_s": 1800.0}]}))
    reproduce.main(command)
    first, second = json.loads(record.read_text())["train_segments"]
    assert "open" not in first and first["killed"].startswith("its job was killed") and first["wall_s"] == 1800.0
    assert "open" not in second and "killed" not in second
    assert json.loads(record.read_text())["core_hours"] >= 0.5


def test_commit_lands_each_finished_runs_record_and_nothing_else(tmp_path, monkeypatch):
    """``--commit``: a finished run's record, the status table and the regenerated tables are
    committed as soon as the run ends (a machine replaced later loses only the runs in progress),
    and nothing else: the user's staged and unstaged work stays as it was. A run already done
    commits nothing; a root that is not a checkout is refused before anything trains."""
    reproduce, make_results = load_script("reproduce"), load_script("make_results")

    def git(*argv):
        return subprocess.run(["git", "-C", str(tmp_path), *argv], check=True, capture_output=True,
                              text=True).stdout.strip()

    outside = tmp_path.parent / f"{tmp_path.name}_not_a_checkout"
    with pytest.raises(SystemExit, match="--commit: .* not the top of a git checkout"):
        reproduce.main(["multi30k", "--root", str(outside), "--norms", "ln", "--seeds", "1", "--commit"])
    assert not outside.exists()

    git("init", "-q")
    git("config", "user.email", "t@example.com")
    git("config", "user.name", "t")
    (tmp_path / "results").mkdir()
    for name in ("README.md", "notes.txt", "results/table.md"):
        (tmp_path / name).write_text("before\n")
    git("add", ".")
    git("commit", "-q", "-m", "start")
    (tmp_path / "notes.txt").write_text("staged\n")
    git("add", "notes.txt")
    (tmp_path / "notes.txt").write_text("staged, then edited\n")

    _fake_stages(reproduce, monkeypatch, lambda argv, echo=None: (
        Path(argv[argv.index("--save-dir") + 1]) / "train.log").write_text(CONVERGED_LOG))
    monkeypatch.setattr(make_results, "main", lambda argv: (
        Path(argv[argv.index("--root") + 1]) / "results" / "table.md").write_text("regenerated\n"))
    command = ["multi30k", "--root", str(tmp_path), "--norms", "ln", "--seeds", "1", "--threads", "1", "--commit"]
    reproduce.main(command)

    assert git("rev-list", "--count", "HEAD") == "2"
    assert "multi30k ln_s1 done" in git("log", "-1", "--format=%s")
    assert set(git("show", "--name-only", "--format=", "HEAD").split()) == {
        "results/runs/multi30k/ln_s1.json", "results/status.md", "results/table.md"}
    assert git("show", "HEAD:results/table.md") == "regenerated"
    assert git("diff", "--cached", "--name-only") == "notes.txt"  # the user's work, untouched
    assert (tmp_path / "notes.txt").read_text() == "staged, then edited\n"
    assert git("show", ":notes.txt") == "staged"

    reproduce.main(command)  # done already: its record is unchanged, nothing is committed
    assert git("rev-list", "--count", "HEAD") == "2"
    # done already, but a field of its record changes (a paired bootstrap's note): committed, and
    # the message says so instead of announcing a newly finished run
    monkeypatch.setattr(reproduce, "significance", lambda runs: [r.save(paired_bootstrap_skipped="why")
                                                                  for r in runs])
    reproduce.main(command)
    assert git("rev-list", "--count", "HEAD") == "3"
    assert "multi30k ln_s1 done before: a field of its record updated" in git("log", "-1", "--format=%s")
    assert "epochs" not in git("log", "-1", "--format=%s")
    # a run another live process is training (its lock; its record "training", not committed):
    # left to that process, which commits it when it ends; a second job must not commit it now
    bn_dir = tmp_path / "runs" / "converged" / "multi30k" / "bn_s1"
    bn_dir.mkdir(parents=True)
    (bn_dir / "run.lock").write_text(f"{os.getppid()} host\n")
    (tmp_path / "results" / "runs" / "multi30k" / "bn_s1.json").write_text(
        json.dumps({"norm": "bn", "seed": 1, "status": "training"}))
    reproduce.main([*command[:3], "--norms", "bn", *command[5:]])
    assert git("rev-list", "--count", "HEAD") == "3"


def test_a_run_done_at_a_raised_epoch_cap_trains_on_and_keeps_its_earlier_ending(tmp_path, monkeypatch):
    """Raising a corpus's cap (``CORPORA[...].max_epoch``) reopens the runs the old cap stopped,
    not those the stopping rule stopped: training goes on from the last checkpoint (the LR
    schedule does not depend on the cap), they are averaged and evaluated again, and what the
    earlier ending produced is set aside, not overwritten: its checkpoint and eval files in
    ``cap<N>/``, its fields under ``earlier_caps``, its evaluation core-hours still counted, and the
    paired bootstraps against the reopened LN run under ``earlier_paired_bootstrap``. The record's
    pointers follow the files they name, under a root whose path JSON escapes too (a text replace
    of the serialised record missed it), while its commands stay as they ran."""
    import dataclasses

    tmp_path = tmp_path / "Läufe"  # json.dumps writes the ä as \u00e4

    reproduce = load_script("reproduce")
    monkeypatch.setitem(reproduce.CORPORA, "multi30k",
                        dataclasses.replace(reproduce.CORPORA["multi30k"], max_epoch=40))
    recs = tmp_path / "results" / "runs" / "multi30k"
    recs.mkdir(parents=True)
    run_dir = tmp_path / "runs" / "converged" / "multi30k" / "ln_s1"
    command = f"python -m powernorm_fairseq.pipeline.evaluate bleu --out {run_dir}/eval_avg.json"
    ev = {"avg": {"value": 30.0, "hypotheses": str(run_dir / "eval_avg.hyp.txt"),
                  "checkpoint": str(run_dir / "checkpoint_avg.pt"), "command": command}}
    done = {"status": "done", "command": "python -m powernorm_fairseq.pipeline.train ... optimization.max_epoch=30",
            "stopped_by": "epoch cap (30 epochs; not converged by the rule)", "evaluations": ev,
            "eval_segments": {"avg": {"wall_s": 3600.0, "threads": 1}}, "embedding_spectrum": {"values": [1.0]},
            "commit": "abc", "norm_stats": "ln_s1.norm_stats.csv", "last_epoch": 30}
    (recs / "ln_s1.json").write_text(json.dumps({"norm": "ln", "seed": 1, **done,
                                                 "kept_hypotheses": {"hypotheses": "ln_s1.avg.hyp.txt"}}))
    (recs / "ln_s1.norm_stats.csv").write_text("earlier statistics\n")
    (recs / "ln_s1.avg.hyp.txt").write_text("earlier kept translations\n")
    (recs / "bn_s1.json").write_text(json.dumps({"norm": "bn", "seed": 1, **done, "stopped_by": "patience (5 ...)",
                                                 "paired_bootstrap": {"vs": "ln_s1", "p": 0.01}}))
    run_dir.mkdir(parents=True)
    for name in ("checkpoint_avg.pt", "checkpoint_last.pt", "eval_avg.json", "eval_avg.hyp.txt", "train.done",
                 "train.log"):
        (run_dir / name).write_text(f"earlier {name}\n")
    trained, averaged, evaluated = [], [], []
    monkeypatch.setattr(reproduce.runner, "train", lambda argv, echo=None: trained.append(argv))
    import torch

    monkeypatch.setattr(reproduce.runner, "average", lambda d, n, kind, out: averaged.append(out) or torch.save(
        {"model": {"encoder.embed_tokens.weight": torch.eye(3)}}, out))
    monkeypatch.setattr(reproduce.runner, "evaluate", lambda argv: evaluated.append(argv) or Path(
        argv[argv.index("--out") + 1]).write_text(json.dumps({"value": 31.0, "recipe": "multi30k"})))
    monkeypatch.setattr(reproduce, "significance", lambda runs: None)
    args = reproduce.argparse.Namespace(campaign="converged", corpus="multi30k", norms=["ln", "bn"], seed_list=[1],
                                        threads=1, track_norm_stats=False, override=[], root=str(tmp_path))
    reproduce.write_status(args)  # before the call that reopens it, "left" counts LN's 10 more epochs
    assert "multi30k: 14 run(s) not done" in (tmp_path / "results" / "status.md").read_text()
    reproduce.main(["multi30k", "--root", str(tmp_path), "--norms", "ln,bn", "--seeds", "1"])

    assert len(trained) == 1 and "optimization.max_epoch=40" in trained[0]  # LN only: BN converged
    assert len(averaged) == 1 and len(evaluated) == 3
    ln = json.loads((recs / "ln_s1.json").read_text())
    assert ln["status"] == "done" and ln["max_epoch"] == 40 and ln["evaluations"]["avg"]["value"] == 31.0
    (earlier,) = ln["earlier_caps"]
    assert earlier["max_epoch"] == 30 and earlier["evaluations"]["avg"]["value"] == 30.0
    assert earlier["evaluations"]["avg"]["hypotheses"] == str(run_dir / "cap30" / "eval_avg.hyp.txt")
    assert earlier["evaluations"]["avg"]["checkpoint"] == str(run_dir / "cap30" / "checkpoint_avg.pt")
    assert earlier["evaluations"]["avg"]["command"] == command
    assert earlier["embedding_spectrum"] == {"values": [1.0]} and earlier["commit"] == "abc"
    for name in ("checkpoint_avg.pt", "eval_avg.json", "eval_avg.hyp.txt"):
        assert (run_dir / "cap30" / name).read_text() == f"earlier {name}\n"
    assert earlier["norm_stats"] == "ln_s1.cap30.norm_stats.csv"
    assert (recs / "ln_s1.cap30.norm_stats.csv").read_text() == "earlier statistics\n"
    # the kept translations of the earlier ending move aside with it (the new one has none here)
    assert earlier["kept_hypotheses"] == {"hypotheses": "ln_s1.cap30.avg.hyp.txt"} and "kept_hypotheses" not in ln
    assert (recs / "ln_s1.cap30.avg.hyp.txt").read_text() == "earlier kept translations\n"
    assert not (recs / "ln_s1.avg.hyp.txt").exists()
    assert ln["eval_segments"]["avg@cap30"]["wall_s"] == 3600.0 and "avg" in ln["eval_segments"]
    assert ln["core_hours"] >= 1.0  # the earlier evaluation's hour is still counted
    bn = json.loads((recs / "bn_s1.json").read_text())
    assert "paired_bootstrap" not in bn and bn["earlier_paired_bootstrap"] == [{"vs": "ln_s1", "p": 0.01}]
    assert bn["evaluations"] == ev and "earlier_caps" not in bn
    # the same command again: nothing to do
    reproduce.main(["multi30k", "--root", str(tmp_path), "--norms", "ln,bn", "--seeds", "1"])
    assert len(trained) == 1


def test_a_capped_run_whose_checkpoints_are_gone_retrains_for_a_raised_cap_keeping_its_capped_ending(
        tmp_path, monkeypatch):
    """Issue 37: with ``--retrain-capped``, a run done at a since raised cap whose checkpoints are
    gone (a replaced machine) trains again from update 0 to the new cap. Its ending at the old cap
    stays whole under ``earlier_caps`` (evaluations, curve, segments, hardware, command), marked
    ``retrained``; its kept translations move aside as ``cap30``; its core-hours stay spent; and the
    tables read the run at the old cap (``results.load`` with the cap) while it retrains and after.
    A continued run says from which checkpoint, epoch and commit (``continued_from``)."""
    import dataclasses

    reproduce, results = load_script("reproduce"), load_script("make_results")
    monkeypatch.setitem(reproduce.CORPORA, "multi30k", dataclasses.replace(
        reproduce.CORPORA["multi30k"], max_epoch=40, earlier_caps=(30,)))
    recs = tmp_path / "results" / "runs" / "multi30k"
    recs.mkdir(parents=True)
    capped = {"norm": "bn", "seed": 1, "status": "done", "max_epoch": 30, "last_epoch": 30, "best_epoch": 30,
              "stopped_by": "epoch cap (30 epochs; not converged by the rule)", "started_commit": "old",
              "command": "python -m powernorm_fairseq.pipeline.train ... optimization.max_epoch=30",
              "hardware": {"cpu": "Old CPU", "threads": 1}, "train_segments": [{"wall_s": 7200.0, "threads": 1}],
              "valid_loss_by_epoch": [[29, 4.3], [30, 4.2]], "core_hours": 2.0,
              "evaluations": {"avg": {"value": 7.0}}, "kept_hypotheses": {"hypotheses": "bn_s1.avg.hyp.txt"}}
    (recs / "bn_s1.json").write_text(json.dumps(capped))
    (recs / "bn_s1.avg.hyp.txt").write_text("capped translations\n")
    seen_while_training = []

    def train(argv, echo=None):
        assert "optimization.max_epoch=40" in argv
        seen_while_training.append(results.load(recs, tmp_path, 30)["bn"][0])
        (Path(argv[argv.index("--save-dir") + 1]) / "train.log").write_text(CONVERGED_LOG)

    _fake_stages(reproduce, monkeypatch, train)
    command = ["multi30k", "--root", str(tmp_path), "--norms", "bn", "--seeds", "1", "--threads", "1"]
    reproduce.main(command)  # without the flag: left done, nothing trained
    assert json.loads((recs / "bn_s1.json").read_text()) == capped and not seen_while_training
    reproduce.main([*command, "--retrain-capped"])

    (during,) = seen_while_training
    assert during["status"] == "done" and during["evaluations"]["avg"]["value"] == 7.0
    assert during["last_epoch"] == 30 and during["hardware"]["cpu"] == "Old CPU"
    bn = json.loads((recs / "bn_s1.json").read_text())
    assert bn["status"] == "done" and bn["max_epoch"] == 40 and bn["evaluations"]["avg"]["value"] == 31.0
    assert bn["last_epoch"] == 8 and bn["stopped_by"].startswith("patience")
    assert bn["started_commit"] != "old" and len(bn["train_segments"]) == 1
    (earlier,) = bn["earlier_caps"]
    assert earlier["max_epoch"] == 30 and earlier["retrained"]["why"].startswith(str(tmp_path))
    for key in ("evaluations", "valid_loss_by_epoch", "train_segments", "hardware", "command", "core_hours",
                "started_commit", "stopped_by", "last_epoch"):
        assert earlier[key] == capped[key], key
    assert earlier["kept_hypotheses"] == {"hypotheses": "bn_s1.cap30.avg.hyp.txt"}
    assert (recs / "bn_s1.cap30.avg.hyp.txt").read_text() == "capped translations\n"
    after = results.load(recs, tmp_path, 30)["bn"][0]
    assert after["evaluations"]["avg"]["value"] == 7.0 and after["last_epoch"] == 30
    assert results.load(recs, tmp_path, 40)["bn"][0]["evaluations"]["avg"]["value"] == 31.0
    # stopped by the patience rule at cap 40: the same run at any higher cap; a capped one is not
    assert results.load(recs, tmp_path, 50)["bn"][0]["last_epoch"] == 8
    assert reproduce.at_cap({"max_epoch": 40, "stopped_by": "epoch cap (40 epochs; ...)"}, 50) is None
    status = (tmp_path / "results" / "status.md").read_text()
    spent = float(status.split("Spent: ")[1].split(" core-hours")[0])
    assert spent >= 2.0 + bn["core_hours"] - 0.01  # the retrained ending's hours still count

    # a continued run (its checkpoint is there) names its starting point, and its view at the old
    # cap stops its curve there
    assert reproduce.at_cap({"max_epoch": 40}, 30) is None
    ln = {**capped, "norm": "ln", "kept_hypotheses": {}}
    (recs / "ln_s1.json").write_text(json.dumps(ln))
    run_dir = tmp_path / "runs" / "converged" / "multi30k" / "ln_s1"
    run_dir.mkdir(parents=True)
    (run_dir / "checkpoint_last.pt").write_text("")
    monkeypatch.setattr(reproduce.runner, "train", lambda argv, echo=None: (run_dir / "train.log").write_text(
        "".join(f"[x][valid][INFO] - epoch {e:03d} | valid on 'valid' subset | loss {5 - e / 100} | "
                f"num_updates {10 * e}\n[x][train][INFO] - epoch {e:03d} | loss 5 | wps 9.0 | "
                f"num_updates {10 * e} | train_wall 1\n" for e in range(1, 36))))
    reproduce.main([*command[:3], "--norms", "ln", *command[5:]])
    ln = json.loads((recs / "ln_s1.json").read_text())
    (earlier,) = ln["earlier_caps"]
    assert earlier["continued_from"]["epoch"] == 30 and earlier["continued_from"]["trained_from_commit"] == "old"
    assert "retrained" not in earlier and ln["train_segments"][0] == capped["train_segments"][0]
    view = reproduce.at_cap(ln, 30)
    assert view["last_epoch"] == 30 and view["valid_loss_by_epoch"][-1][0] == 30
    assert view["evaluations"] == {"avg": {"value": 7.0}} and reproduce.at_cap(ln, 40) is ln


def test_every_finished_converged_run_stopped_where_the_rule_says():
    """The committed records obey the stopping rule: a run stopped by patience stops at the first
    epoch ending ``PATIENCE`` validations without a better loss, and a run stopped by its cap never
    had such a streak before it (a run resumed before compat's item 9 could have trained past it)."""
    reproduce = load_script("reproduce")
    records = sorted((REPO / "results" / "runs").glob("*/*_s*.json"))
    finished = [r for r in map(lambda p: json.loads(p.read_text()), records) if r.get("status") == "done"]
    assert finished, "no finished converged run in results/runs"
    for r in finished:
        curve = r["valid_loss_by_epoch"]
        best, streak, rule_epoch = None, 0, None
        for epoch, loss in curve:
            if best is None or loss < best:
                best, streak = loss, 0
            else:
                streak += 1
                if streak == reproduce.PATIENCE and rule_epoch is None:
                    rule_epoch = epoch
        name = f"{r['corpus']}/{r['norm']}_s{r['seed']}"
        assert curve[-1][0] == r["last_epoch"], name
        if r["stopped_by"].startswith("patience"):
            assert rule_epoch == r["last_epoch"], name
        else:
            assert r["stopped_by"].startswith("epoch cap") and rule_epoch is None, name


def test_core_hours_count_a_records_own_threads_not_the_status_calls(tmp_path, monkeypatch):
    """A record that names no threads (the early pilots): its logged training time counts at its
    segments' threads, so ``--status`` without ``--threads`` on a 2-core machine counts the same
    core-hours as with ``--threads 1``, not twice them."""
    reproduce = load_script("reproduce")
    recs = tmp_path / "results" / "pilot" / "runs" / "multi30k"
    recs.mkdir(parents=True)
    (recs / "bn_s1.json").write_text(json.dumps({
        "norm": "bn", "seed": 1, "status": "done", "train_segments": [{"wall_s": 3600.0}],
        "epochs": [{"epoch": 1, "train_wall": 3400}]}))
    monkeypatch.setattr(reproduce.os, "cpu_count", lambda: 2)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    hours = {}
    for threads in (None, 1):
        args = reproduce.argparse.Namespace(campaign="pilot", corpus="multi30k", norms=["bn"], seed_list=[1],
                                            threads=threads, track_norm_stats=False, override=[],
                                            root=str(tmp_path))
        hours[threads] = reproduce.Run("multi30k", "bn", 1, args).core_hours()
    assert hours[None] == hours[1] == 1.0


def test_status_outside_a_project_writes_nothing(tmp_path, monkeypatch):
    """Issue 38 item 9: ``powernorm-reproduce multi30k --status`` in any directory created
    results/status.md there; outside a project directory it is refused, nothing written."""
    reproduce = load_script("reproduce")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit, match="--status: .* has no results/ directory"):
        reproduce.main(["multi30k", "--status"])
    assert list(tmp_path.iterdir()) == []


def test_the_mechanism_table_crosses_the_ingredients_and_answers_with_holm(tmp_path):
    """Issue 36 item 4: rows = per-token scaling, columns = batch statistic, LN, RMSNorm, DyT and
    the released PN beside; each cell the mean +- sd and its difference from LN with t, p and
    Holm; the five questions as one Holm family, a direction named only where it holds."""
    make_results = load_script("make_results")
    runs = tmp_path / "results" / "runs" / "multi30k"
    runs.mkdir(parents=True)
    (tmp_path / "README.md").write_text("<!-- results:begin -->\n<!-- results:end -->\n")
    scores = {"ln": (20.0, 21.0, 22.0), "pnpaper": (20.5, 21.4, 22.6), "group_rms": (21.0, 22.2, 23.1),
              "pnpaper_gs": (21.1, 22.1, 23.0), "pn": (21.0, 22.0, 23.2), "rms": (20.0, 21.1, 21.9),
              "dyt": (18.0, 19.1, 20.0)}
    for norm, values in scores.items():
        for seed, v in enumerate(values, start=1):
            (runs / f"{norm}_s{seed}.json").write_text(json.dumps(converged_record(norm, seed, v)))
    lines = make_results.build_mechanism("multi30k", make_results.TABLES["multi30k"], tmp_path)
    page = (tmp_path / "results" / "mechanism_multi30k.md").read_text()
    assert "| none | - (no norm; not run) | PN-V: not run | PN-paper: 21.50 ± 1.05" in page
    # GS - LN: +1.0, +1.2, +1.1 (consistent): a direction after Holm; DyT - LN: -2.0, -1.9, -2.0
    assert "GS - LN (GroupScaling alone against LN): +1.10 [+0.85, +1.35] (3 seeds), t = 19.05, p = 0.003" in page
    assert "GS > LN (better)" in page and "DyT < LN (worse)" in page
    assert "RMS - LN (RMSNorm against LN): +0.00" in page and "no significant difference" in page
    assert len(lines) == 1 and "results/mechanism_multi30k.md" in lines[0]


def test_the_leak_campaign_trains_the_authors_attention_and_its_table_reads_the_probe(tmp_path):
    """Issue 36 item 6: the leak campaign is the main campaign's PTB settings with the causal mask
    of the multi-linear attention off; its table sets each run's test PPL and probe beside the
    masked run of the same seed."""
    reproduce, make_results = load_script("reproduce"), load_script("make_results")
    overrides = reproduce.CAMPAIGNS["leak"].overrides(reproduce.CORPORA["ptb"])
    assert "model.multilinear_unmasked=true" in overrides and "optimization.max_epoch=12" in overrides
    assert reproduce.CAMPAIGNS["leak"].leak_probe and reproduce.CAMPAIGNS["leak"].norms == ("ln", "pn")
    leak = tmp_path / "results" / "leak" / "ptb"
    leak.mkdir(parents=True)
    masked = tmp_path / "results" / "runs" / "ptb"
    masked.mkdir(parents=True)
    ev = lambda v: {"avg": {"value": v}}  # noqa: E731
    (leak / "ln_s1.json").write_text(json.dumps({"norm": "ln", "seed": 1, "status": "done", "evaluations": ev(40.0),
                                                 "leak": {"mean_abs": 0.25, "max_abs": 2.0}}))
    (masked / "ln_s1.json").write_text(json.dumps({"norm": "ln", "seed": 1, "status": "done", "evaluations": ev(170.0)}))
    (line,) = make_results.build_leak(tmp_path)
    assert "LN s1: test PPL 40.00 unmasked against 170.00 masked, the probe's mean |delta log p| 0.250 nats" in line
    assert "| PN (reference variant) | 1 | - | - | - | to do |" in (tmp_path / "results" / "leak_ptb.md").read_text()


def test_benchmark_report_compares_two_norm_speed_records(tmp_path):
    """``benchmarks/report.py --compare BEFORE AFTER``: one table, ``before -> after`` per norm and
    shape, printed from the records (a norm only one record has shows '-')."""
    def record(commit, ratios):
        rows = [{"norm": norm, "shape": "30x64x128", "pad": 0.3, "ratio_to_layernorm": r, "cpu_ms": 0.3}
                for norm, r in ratios.items()]
        return {"threads": 1, "commit": commit, "fused_kernels": True, "rows": rows}

    before, after = tmp_path / "before.json", tmp_path / "after.json"
    before.write_text(json.dumps(record("aaaa", {"torch.nn.LayerNorm": 1.0, "batch": 1.93})))
    after.write_text(json.dumps(record("bbbb", {"torch.nn.LayerNorm": 1.0, "batch": 1.61, "rms": 1.07})))
    out = subprocess.run([sys.executable, str(REPO / "benchmarks/report.py"), "--compare", str(before), str(after)],
                         capture_output=True, text=True, check=True).stdout
    assert "| `batch` | 1.93 -> 1.61 |" in out and "| `rms` | - -> 1.07 |" in out
    assert "aaaa -> bbbb" in out and "LayerNorm` |" not in out


def test_train_speed_measures_the_norm_configurations_it_is_given(monkeypatch):
    """``benchmarks/train_speed.py --norms``: LN and each named configuration (configs/norm/), every
    site of encoder and decoder; an unknown name fails at parsing, naming the choices."""
    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
    train_speed = importlib.import_module("train_speed")
    sets = train_speed.norm_flag_sets(["rms", "pnv"])
    assert list(sets)[0] == "LN" and len(sets) == 3
    flags = " ".join(sets[list(sets)[1]])
    assert "--encoder-norm rms" in flags and "--decoder-norm rms" in flags
    assert train_speed.parse_args([]).norms == list(train_speed.DEFAULT_NORMS)
    with pytest.raises(SystemExit):
        train_speed.parse_args(["--norms", "rms", "no_such_norm"])
    # the quickstart's (and the released code's) placement: the norm in the encoder only
    encoder_only = " ".join(train_speed.norm_flag_sets(["rms"], ("encoder",))["RMS"])
    assert "--encoder-norm rms" in encoder_only and "--decoder-norm" not in encoder_only


def test_step_speed_ratio_is_ln_time_over_the_norms_with_an_interval_around_it(monkeypatch):
    """``benchmarks/step_speed.py``: words per second from total time, the ratio to LN, and a
    bootstrap interval over the rounds that holds the ratio (same keys for the CPU and wall clocks)."""
    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
    step_speed = importlib.import_module("step_speed")
    times = {"LN": [1.0, 1.1, 0.9, 1.0] * 5, "PN": [1.25, 1.3, 1.2, 1.25] * 5}
    out = step_speed.summarize(times, words=400, seed=1, wps="wall_wps", ratio="wall_ratio")
    assert out["wall_wps_LN"] == pytest.approx(20.0) and out["wall_wps_PN"] == pytest.approx(16.0)
    assert out["wall_ratio_PN"] == pytest.approx(0.8)
    low, high = out["wall_ratio_ci95_PN"]
    assert low <= 0.8 <= high and high - low < 0.05 and "wall_ratio_LN" not in out


def test_the_readme_names_no_comparison_while_only_ln_is_done(results_dir):
    """A cap whose only finished runs are LN's gives the README one line, not a table of 'not run'
    cells (which pushed the README past its length limit)."""
    make_results, root = results_dir
    runs = root / "results" / "runs" / "multi30k"
    for path in runs.glob("*.json"):
        if not path.name.startswith("ln_"):
            path.unlink()
    make_results.main(["--root", str(root)])
    readme = (root / "README.md").read_text()
    assert "No norm to compare with LN yet (finished: LN s1, LN s2, LN s3;" in readme
    assert "| norm - LN" not in readme.split("**PTB")[0]
    assert "3 finished run(s): 3 stopped by the patience rule (converged)" in readme
    # the raised cap (80 epochs) stays one line until all of its 15 runs are done
    assert "*By the patience rule, cap raised to 80 epochs:*\n\nIn progress: 3 of 15 runs finished;" in readme


def test_a_reopened_runs_paired_bootstrap_is_read_only_at_the_cap_it_compared():
    """A raised cap sets a norm's bootstrap against LN aside (LN's ending changed); the norm's new
    bootstrap compares the endings at the new cap. The table at the first cap must read the set-aside
    one (it names no cap: computed at the first), not the new one; the table at the new cap must not
    read the set-aside one while the run trains on (it compared the capped endings)."""
    from powernorm_fairseq.campaign.spec import at_cap

    first = {"vs": "ln_s1", "checkpoint": "avg", "p": 0.3}  # computed before any cap was raised
    ending = {"max_epoch": 30, "stopped_by": "epoch cap (30 epochs)", "evaluations": {"avg": {"value": 7.0}},
              "retrained": {"why": "no checkpoint"}}
    done = {"corpus": "multi30k", "norm": "bn", "status": "done", "max_epoch": 80,
            "stopped_by": "patience (5 epochs)", "paired_bootstrap": {"vs": "ln_s1", "cap": 80, "p": 0.01},
            "earlier_paired_bootstrap": [first], "earlier_caps": [ending]}
    assert at_cap(done, 30)["paired_bootstrap"] == first
    assert at_cap(done, 80)["paired_bootstrap"] == {"vs": "ln_s1", "cap": 80, "p": 0.01}
    training = {**done, "status": "training", "stopped_by": None}
    del training["paired_bootstrap"]
    assert "paired_bootstrap" not in at_cap(training, 80)
    assert at_cap(training, 30)["paired_bootstrap"] == first
    # a run never reopened reads its own bootstrap at its cap
    capped = {"corpus": "multi30k", "status": "done", "max_epoch": 30, "paired_bootstrap": first}
    assert at_cap(capped, 30)["paired_bootstrap"] == first and at_cap(capped, None) is capped
