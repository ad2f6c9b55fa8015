"""The status table of every campaign, ``results/status.md``: done / running / to do, the
core-hours spent and left, and the commands that resume what is unfinished."""

from __future__ import annotations

import argparse
import json
import time

from powernorm_fairseq.campaign.records import project_root
from powernorm_fairseq.campaign.run import Run
from powernorm_fairseq.campaign.spec import CAMPAIGNS, CONVERGED_SEEDS, CORPORA, SUPERSEDED
from powernorm_fairseq.pipeline.common import atomic_write_text


def cost_per_run(done_hours: list[float]) -> float | None:
    """The estimate of one run's core-hours: the mean of the runs done so far (None before any);
    the README's measured campaign cost uses it, and the status table's "left" for a run
    without an epoch cap."""
    return sum(done_hours) / len(done_hours) if done_hours else None


def cost_left(done: list[tuple[float, float, int]], left: list[tuple[int, int | None]]) -> float | None:
    """Core-hours the runs not done still need, estimated from the done ones.

    ``done``: (training core-hours, evaluation core-hours, epochs trained) of each done run;
    ``left``: (epochs trained so far, epoch cap or None) of each run not done. A capped run needs
    ``cap - trained`` more epochs at the done runs' training core-hours per epoch, plus one
    evaluation at their mean (an upper bound where the stopping rule ends it before the cap; a
    run part-trained, or reopened by a raised cap, counts only its remaining epochs). One
    without a cap counts the done runs' mean whole cost. None before any run is done."""
    if not done:
        return None
    epochs = sum(e for _, _, e in done)
    per_epoch = sum(t for t, _, _ in done) / epochs if epochs else 0.0
    per_eval = sum(v for _, v, _ in done) / len(done)
    whole = cost_per_run([t + v for t, v, _ in done])
    return sum(max(cap - trained, 0) * per_epoch + per_eval if cap else whole for trained, cap in left)


def resume_lines(unfinished: dict[str, dict[str, int]]) -> list[str]:
    """The status table's closing paragraph: the commands that resume what is unfinished
    (``unfinished``: campaign -> corpus -> runs not done; ``"retrain"`` -> corpus -> done runs a
    raised cap trains again from update 0), two jobs of 1 thread on the 2 cores, each campaign's
    as its ``resume`` says. Two jobs may run one corpus's command: a run one job holds is left to
    it by the other."""
    retrain, commands = unfinished.get("retrain", {}), []
    for name, campaign in CAMPAIGNS.items():
        if campaign.resume is None:
            continue
        for corpus, n in unfinished.get(name, {}).items():
            if n and corpus in (campaign.resume_corpora or (corpus,)):
                extra = " --retrain-capped" if retrain.get(corpus) and name == next(iter(CAMPAIGNS)) else ""
                commands.append(f"    python scripts/reproduce.py {corpus} {campaign.resume}{extra}")
    if not commands:
        return ["Nothing is left to run.", ""]
    first = unfinished.get(next(iter(CAMPAIGNS)), {})  # the default campaign's runs left
    spare = max((c for c, n in first.items() if n), key=lambda c: first[c], default=None)
    return ["Resume everything unfinished with the same commands, in two jobs of 1 thread each (each "
            "skips what is done, continues a run from its last checkpoint and commits each finished "
            "run's record; a run one job holds is left to it by the other, so two jobs may run the "
            f"same command{f', as soon as one has nothing else: {spare} has the most runs left' if spare else ''}):",
            "", *commands, ""]


STATUS_STAMP = "Last changed "  # status.md's last line: when its content last changed


def write_status(args) -> None:
    """Rewrite ``results/status.md`` (when its content changes): every run of every campaign that
    has a record or is asked for now, with its state, stopping epoch and core-hours; totals spent
    and estimated left; last, the time the content last changed."""
    lines = ["# Run status", "",
             "Written by `scripts/reproduce.py` after every step (and by `--status`). "
             "Core-hours = wall time x threads of every training and evaluation segment.", ""]
    unfinished = {}  # campaign -> corpus -> runs not done
    retrain = unfinished["retrain"] = {}  # corpus -> done runs that a raised cap trains again from 0
    for campaign, spec in CAMPAIGNS.items():
        rows, spent, lost, superseded, done_runs, todo = [], 0.0, 0.0, 0.0, {}, {}
        for corpus in CORPORA:
            # campaigns may share a records folder: each lists its own norms
            names = {p.stem for p in (project_root(args) / spec.records / corpus).glob("*.json")
                     if p.stem.rpartition("_s")[0] in spec.norms}
            if campaign == args.campaign and corpus == args.corpus:
                names |= {f"{n}_s{s}" for n in args.norms for s in args.seed_list}
            if spec.complete:  # the whole campaign, whichever corpus this call runs
                names |= {f"{n}_s{s}" for n in spec.norms for s in CONVERGED_SEEDS}
            retrains = set()  # runs whose earlier record was set aside: this row is its retrain
            for old in sorted((project_root(args) / spec.records / corpus / SUPERSEDED).glob("*.json")):
                rec = json.loads(old.read_text())  # set aside for a retrain: its hours were spent
                if rec["norm"] not in spec.norms:
                    continue
                retrains.add(f"{rec['norm']}_s{rec['seed']}")  # as results.superseded_lines pairs them
                superseded += rec.get("core_hours") or 0.0
                lost += Run.lost_hours(rec)
                spent += Run.lost_hours(rec)
            for name in sorted(names, key=lambda n: (spec.norms.index(n.rpartition("_s")[0])
                                                     if n.rpartition("_s")[0] in spec.norms else 99,
                                                     int(n.rpartition("_s")[2]))):
                norm, _, seed = name.rpartition("_s")
                ns = argparse.Namespace(**{**vars(args), "campaign": campaign})
                run = Run(corpus, norm, int(seed), ns)
                state = run.state()
                rec = run.progress(state)
                hours = run.core_hours(rec)
                gone = state != "running" and run.lost()  # it restarts at update 0
                lost += run.lost_hours(rec) + (hours if gone else 0.0)
                spent += hours + run.lost_hours(rec) + run.earlier_hours(rec)
                trained = 0 if gone else int(rec.get("last_epoch") or 0)
                if state == "done":
                    done_runs.setdefault(corpus, []).append((*run.split_hours(rec), trained))
                if state != "done" or run.capped_below():  # a raised cap reopens it at the next call
                    todo.setdefault(corpus, []).append((trained, run.cap()))
                if run.capped_below() and not (run.dir / "checkpoint_last.pt").exists():
                    retrain[corpus] = retrain.get(corpus, 0) + 1
                shown = f"{state} (retrain; old record in {SUPERSEDED}/)" if name in retrains else state
                rows.append(f"| {corpus} | {name} | {shown} | {rec.get('last_epoch', '-')} | "
                            f"{rec.get('best_epoch', '-')} | {rec.get('stopped_by') or '-'} | {hours:.2f} |")
        unfinished[campaign] = {corpus: len(runs) for corpus, runs in todo.items()}
        if not rows:
            continue
        left = []
        for corpus, runs in todo.items():
            per = done_runs.get(corpus)
            left.append(f"{corpus}: {len(runs)} run(s) not done, about {cost_left(per, runs):.1f} core-hours "
                        f"(their epochs to the cap at the cost per epoch of its {len(per)} done run(s))" if per else
                        f"{corpus}: {len(runs)} run(s) not done (no done run yet to estimate from)")
        lines += [f"## Campaign `{campaign}`", "",
                  "| corpus | run | state | last epoch | best epoch | stopped by | core-hours |",
                  "|---|---|---|---|---|---|---|", *rows, "",
                  f"Spent: {spent + superseded:.2f} core-hours"
                  + (f", of which {lost:.2f} on training lost with its checkpoints (a replaced machine; "
                     "those runs restart at update 0)" if lost else "")
                  + (f"{' and' if lost else ', of which'} {superseded:.2f} on superseded runs (set aside "
                     f"for a retrain: results/runs/<corpus>/{SUPERSEDED}/)" if superseded else "")
                  + ". Left: " + ("; ".join(left) or "nothing") + ".", ""]
    lines += resume_lines(unfinished)
    # Rewritten only when a line above changes, so that the call that ends a job (after its
    # --commit) leaves the committed table as it is rather than a checkout modified by a timestamp
    path = project_root(args) / "results" / "status.md"
    body = "\n".join(lines) + "\n"
    if path.is_file() and path.read_text().rsplit(STATUS_STAMP, 1)[0] == body:
        return
    atomic_write_text(path, f"{body}{STATUS_STAMP}{time.strftime('%Y-%m-%d %H:%M:%S %Z')}.\n")

