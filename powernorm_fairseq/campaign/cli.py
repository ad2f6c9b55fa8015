"""``powernorm-reproduce`` / ``scripts/reproduce.py``: the campaigns' command line."""

from __future__ import annotations

import argparse
import os
import threading
from concurrent.futures import ThreadPoolExecutor

from powernorm_fairseq import campaign
from powernorm_fairseq.campaign.bootstrap import significance
from powernorm_fairseq.campaign.commit import commit_records
from powernorm_fairseq.campaign.records import project_root
from powernorm_fairseq.campaign.run import Run
from powernorm_fairseq.campaign.spec import CAMPAIGNS, CORPORA, NORMS, SUPERSEDED
from powernorm_fairseq.campaign.status import write_status
from powernorm_fairseq.pipeline.common import checkout_top
from powernorm_fairseq.presets import config_dir, preset_names


def supersede(args) -> None:
    """``--supersede``: set each named done run's record aside (:meth:`Run.supersede`), all names
    checked before any record moves; with ``--commit`` the move is committed."""
    if not (args.reason or "").strip():
        raise SystemExit("--supersede: give --reason 'why' (kept in the set-aside record, and the tables show it)")
    if not CAMPAIGNS[args.campaign].complete:
        raise SystemExit(f"--supersede: only the runs of a campaign of every norm and seed (converged, "
                         f"mechanism) are superseded, not {args.campaign}'s")
    runs = []
    for name in args.supersede.split(","):
        norm, _, seed = name.strip().rpartition("_s")
        norms = CAMPAIGNS[args.campaign].norms
        if norm not in norms or not seed.isdigit():
            raise SystemExit(f"--supersede: {name!r} is not a run name <norm>_s<seed> (norms: {', '.join(norms)})")
        runs.append(Run(args.corpus, norm, int(seed), args))
    refused = [r for run in runs if (r := run.supersede_refused(run.holder()))]
    if refused:
        raise SystemExit("\n".join(refused))
    for run in runs:
        record = run.record_path
        run.log(run.supersede(args.reason.strip()))
        write_status(args)  # before the commit, which takes the status table with the move
        if args.commit:
            run.log(commit_records(run.root, record, f"Campaign converged: {run.corpus} {run.name} superseded "
                                   f"({args.reason.strip()}); the campaign trains it again (reproduce --supersede)"))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="powernorm-reproduce", description=campaign.__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("corpus", choices=sorted(CORPORA))
    p.add_argument("--campaign", choices=sorted(CAMPAIGNS), default="converged",
                   help="converged (default): the paper's norms by the stopping rule, 3 evaluations; "
                   "mechanism: PN's ingredients and the norms of today at the converged campaign's first "
                   "cap; budget: the sizing run; pilot: the earlier short fixed budgets")
    p.add_argument("--norms", default=None,
                   help="comma list of norm configurations (configs/norm/<norm>.yaml; the presets "
                   "<prefix>_<norm>, prefix multi30k or ptb_cpu_tensorized; the pilot's PTB runs used "
                   "ptb_cpu); default: the campaign's")
    p.add_argument("--seeds", default="1,2,3", help="comma list of seeds")
    p.add_argument("--jobs", type=int, default=1, help="runs at the same time")
    p.add_argument("--threads", type=int, default=0, help="OMP_NUM_THREADS per run (0 = inherit)")
    p.add_argument("--override", nargs="*", default=[], help="extra hydra overrides for training")
    p.add_argument("--track-norm-stats", action="store_true",
                   help="also record the norm statistics of the first encoder norm (Figs. 2-4) in "
                   "runs/<campaign>/<corpus>/<run>/norm_stats.csv; tracking does not change training")
    p.add_argument("--collect", action="store_true",
                   help="train nothing: refresh the records from the training logs")
    p.add_argument("--status", action="store_true", help="train nothing: rewrite results/status.md")
    p.add_argument("--root", default=".",
                   help="the project directory: data/<corpus> (prepared), runs/ and results/ "
                   "(default: the current directory)")
    p.add_argument("--commit", action="store_true",
                   help="as each run finishes, regenerate the tables (scripts/make_results.py) and "
                   "git-commit results/ and README.md in the --root checkout, so that a machine "
                   "replaced later loses only the runs in progress; nothing else is committed")
    p.add_argument("--supersede", metavar="RUNS",
                   help="train nothing: set the records of these done runs (comma list, e.g. ln_s2) "
                   f"aside in results/runs/<corpus>/{SUPERSEDED}/, so that the campaign's command "
                   "trains them again from update 0 (for a run whose test translations were lost); "
                   "needs --reason")
    p.add_argument("--reason", help="--supersede: why, kept in the set-aside record")
    p.add_argument("--retrain-capped", action="store_true",
                   help="a done run that a since raised epoch cap reopens, but whose checkpoints are gone "
                   "(a replaced machine), trains again from update 0 to the new cap; its ending at the old "
                   "cap, training included, stays in its record under earlier_caps (without this flag "
                   "such a run is left done)")
    args = p.parse_args(argv)
    if args.commit and checkout_top(project_root(args)) != project_root(args).resolve():
        raise SystemExit(f"--commit: {project_root(args)} is not the top of a git checkout; "
                         "run from the project's checkout (or name it with --root), or drop --commit")
    args.norms = args.norms.split(",") if args.norms else list(CAMPAIGNS[args.campaign].norms)
    args.seed_list = [int(s) for s in args.seeds.split(",")]
    prefix = CAMPAIGNS[args.campaign].prefix(args.corpus)
    unknown = [n for n in args.norms if f"{prefix}_{n}" not in preset_names()]
    if unknown:
        raise SystemExit(f"--norms: no preset {prefix}_<norm> for {', '.join(unknown)} (a norm is a "
                         f"configuration {config_dir()}/norm/<norm>.yaml; choose from {', '.join(NORMS)}, ...)")
    if args.threads:  # every stage's children inherit it (pipeline.common.subprocess_env)
        os.environ["OMP_NUM_THREADS"] = str(args.threads)
    runs = [Run(args.corpus, norm, seed, args) for seed in args.seed_list for norm in args.norms]
    if args.supersede:
        supersede(args)
        return
    if args.status:
        if not (project_root(args) / "results").is_dir():  # not a project directory: write nothing
            raise SystemExit(f"--status: {project_root(args)} has no results/ directory, so no campaign "
                             "has run here; run from the project directory or pass --root DIR")
        write_status(args)
        return
    compare = CAMPAIGNS[args.campaign].significance
    if args.collect:
        for run in runs:
            run.collect()
        if compare:  # a pair finished by an older process gets its bootstrap here
            significance(runs)
        write_status(args)
        return
    write_status(args)
    failed = []
    one_at_a_time = threading.Lock()  # significance() saves other runs' records

    def job(run: Run) -> None:
        run.refresh()  # another process may have finished it since this one started
        run.on_start = lambda: write_status(args)
        done_before = run.record.get("status") == "done"
        # a run another process holds is its to commit: its record here is that run in progress
        if train(run) and args.commit:
            # a run done before this call changes only by a field (its paired bootstrap, say):
            # the message must not announce a newly finished run
            what = ("done before: a field of its record updated" if done_before else
                    f"{run.record.get('status')} ({run.record.get('last_epoch', '-')} epochs, "
                    f"{run.core_hours():.2f} core-hours; stopped by {run.record.get('stopped_by') or '-'})")
            with one_at_a_time:
                run.log(commit_records(run.root, run.record_path, (
                    f"Campaign {args.campaign}: {run.corpus} {run.name} {what}: its record, the status "
                    "table and the regenerated tables (reproduce --commit)")))

    def train(run: Run) -> bool:
        """Whether this process held ``run`` (trained it, found it done, or saw it fail)."""
        try:
            held = run.run()
        except Exception as e:  # one failed run must not stop the others; its record says so
            run.save(status="failed", error=str(e))
            run.log(f"FAILED: {e}")
            failed.append(run.name)
            return True
        finally:
            write_status(args)
        if held and compare:  # as soon as a norm and LN of its seed are both done, not after all the runs
            with one_at_a_time:
                significance(runs)
        return held

    with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        list(pool.map(job, runs))
    write_status(args)
    if failed:
        raise SystemExit(f"failed runs: {', '.join(failed)}")



if __name__ == "__main__":
    main()
