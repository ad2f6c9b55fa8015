"""Run the paper's norm comparison on a real corpus at CPU scale, run by run, resumably.

Usage (from the project directory, which holds ``data/``, ``runs/`` and ``results/``; ``--root``
names another; ``powernorm-reproduce`` is the same command)::

    python scripts/reproduce.py multi30k --seeds 1,2,3 --jobs 2 --threads 1   # the converged campaign
    python scripts/reproduce.py ptb --seeds 1,2,3 --jobs 2 --threads 1
    python scripts/reproduce.py multi30k --campaign budget --norms ln --seeds 1 # the budget run
    python scripts/reproduce.py ptb --seeds 1,2,3 --jobs 2 --threads 1 --commit  # and commit each finished run
    python scripts/make_results.py          # tables + plots from the records

Campaigns (``--campaign``; every setting of each lives in ``CAMPAIGNS`` below, once):

* ``converged`` (default): the preset ``configs/<prefix>_<norm>.yaml`` trained to convergence as the
  paper does: a checkpoint every epoch, stop after ``PATIENCE`` epochs without a better validation
  loss (the released ``--early-stop 5``; fairseq's ``--patience``), with an epoch cap per corpus.
  Each run is evaluated three ways: the paper's protocol (the average of the last 5 epoch
  checkpoints), the best checkpoint, and the last. For BLEU, each norm's averaged model is then
  compared with LN's of the same seed by sacreBLEU's paired bootstrap, from the translations kept
  beside the records (``<run>.avg.hyp*.txt``).
  Records: ``results/runs/<corpus>/<norm>_s<seed>.json``. Raising a corpus's cap (``CORPORA``)
  reopens the runs the old cap stopped: they train on from their last checkpoint and are
  evaluated again, their earlier ending kept aside (:meth:`Run.reopen`). ``--supersede ln_s2
  --reason ...`` sets a done run's record aside (``superseded/``) so that the same command trains
  it again from update 0, for a run whose test translations were lost (:meth:`Run.supersede`).
* ``mechanism``: issue 36's norms (RMSNorm, GroupScaling alone, Algorithm 2 and PN-V after
  GroupScaling, Dynamic Tanh) with the converged campaign's settings, protocol and seeds, at its
  first cap (Multi30k 30 epochs, PTB 12): records beside the converged ones, the same LN of each
  seed their baseline.
* ``budget``: one run to convergence that keeps every epoch checkpoint (the campaign's sizing
  run). Records: ``results/budget/<corpus>/``.
* ``pilot``: the earlier short fixed budgets (500 / 300 updates, the last 3 update checkpoints
  averaged). Records: ``results/pilot/runs/<corpus>/``. Kept so those records stay reproducible.

For every (norm, seed) it runs, each step skipped when already done, through the pipeline's stages
(:mod:`powernorm_fairseq.pipeline.runner`): train (``pipeline.train`` with the preset and the
campaign's overrides: batch scaled to the world size, a truncated ``checkpoint_last.pt`` repaired,
``launch.json`` written; checkpoints in ``runs/<campaign>/<corpus>/<norm>_s<seed>/``, git-ignored;
rerunning the same command resumes from ``checkpoint_last.pt``), average, evaluate.
The record (status, command, commit, seed, hardware, wall time and core-hours of each segment, the
validation curve, the stopping epoch, the evaluations) is rewritten after every step, and so is the
campaign's status table ``results/status.md`` (done / running / to do, core-hours spent and left).
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import os
import re
import shlex
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from powernorm_fairseq.pipeline import runner
from powernorm_fairseq.pipeline.common import (
    atomic_write_json,
    atomic_write_text,
    checkout_top,
    directory_lock,
    git,
    git_commit,
    hardware,
    hydra_quote,
)
from powernorm_fairseq.presets import PAPER_NORMS, config_dir, preset_names


@dataclass(frozen=True)
class Corpus:
    prefix: str        # presets configs/<prefix>_<norm>.yaml
    prepared: str      # the prepared directory (prepare_<corpus>.sh)
    metric: str        # "bleu" or "ppl" (powernorm_fairseq.pipeline.evaluate)
    max_epoch: int     # the converged campaign's cap (results/README.md: the budget arithmetic)
    earlier_caps: tuple[int, ...] = ()  # caps it had before: the tables show the runs at each too


CORPORA = {
    # 30 until session 17 (every run stopped there, results/README.md); raised for the paper's
    # stopping rule (issue 37): the tables keep each run's ending at 30 too (earlier_caps)
    "multi30k": Corpus("multi30k", "data/multi30k", "bleu", max_epoch=80, earlier_caps=(30,)),
    # the paper's PTB model, the Tensorized Transformer (multi-linear attention), at CPU scale
    "ptb": Corpus("ptb_cpu_tensorized", "data/ptb", "ppl", max_epoch=12),
}
NORMS = PAPER_NORMS  # the converged campaign's
LN = NORMS[0]  # the baseline every norm is compared with
PATIENCE = 5        # the released --early-stop 5
AVERAGE_EPOCHS = 5  # the paper averages the last 5 epoch checkpoints
# what a run's end produced; a done run reopened for a raised epoch cap (Run.reopen) sets them aside
REOPENED = ("evaluations", "paired_bootstrap", "paired_bootstrap_skipped", "embedding_spectrum", "averaged",
            "stopped_by", "commit", "norm_stats", "kept_hypotheses")
# the averaged model's test translations (fields of its "avg" evaluation) that the paired bootstrap
# reads; kept beside the record, since the run directory is lost with a replaced machine
HYPOTHESES = {"hypotheses": "avg.hyp.txt", "hypotheses_tokenized": "avg.hyp.tok.txt"}
CONVERGED_SEEDS = (1, 2, 3)  # the issue's >= 3 seeds; status.md lists every one of them
SUPERSEDED = "superseded"  # records set aside for a retrain (Run.supersede), in the records folder


def _to_convergence(corpus: Corpus, keep_last_epochs: int, max_epoch: int | None = None) -> list[str]:
    """Hydra overrides that turn a fixed-budget preset into a run to convergence."""
    return ["optimization.max_update=0", f"optimization.max_epoch={max_epoch or corpus.max_epoch}",
            f"checkpoint.patience={PATIENCE}", "checkpoint.save_interval_updates=0",
            "checkpoint.keep_interval_updates=-1", f"checkpoint.keep_last_epochs={keep_last_epochs}"]


@dataclass(frozen=True)
class Campaign:
    records: str                 # results/<...>/<corpus>/<norm>_s<seed>.json
    overrides: object            # Corpus -> list of hydra overrides
    evaluations: tuple[str, ...]  # which checkpoints are evaluated (see Run.checkpoint_for)
    average: tuple[str, int]     # ("epoch" | "update", how many) for the "avg" evaluation
    significance: bool = False   # paired bootstrap against LN of the same seed (BLEU)
    prefixes: tuple = ()         # (corpus, preset prefix) pairs that differ from CORPORA's
    tracked: tuple = ()          # (corpus, seed) pairs whose runs record the norm statistics
    norms: tuple = NORMS         # its norm configurations (configs/norm/), in its tables' order
    complete: bool = False       # its status table lists every norm x CONVERGED_SEEDS, run or not

    def prefix(self, corpus: str) -> str:
        return dict(self.prefixes).get(corpus, CORPORA[corpus].prefix)


def first_cap(corpus: Corpus) -> int:
    """The corpus's first cap: where the converged campaign's capped comparison stands."""
    return (*corpus.earlier_caps, corpus.max_epoch)[0]


CAMPAIGNS = {
    # Multi30k seed 1 of every norm records the first encoder norm's statistics (Figs. 2-4)
    "converged": Campaign("results/runs", lambda c: _to_convergence(c, AVERAGE_EPOCHS),
                          ("avg", "best", "last"), ("epoch", AVERAGE_EPOCHS), significance=True,
                          tracked=(("multi30k", 1),), complete=True),
    # issue 36: PN's ingredients apart and the norms of today, with the converged campaign's
    # settings, protocol and seeds at its capped comparison (Multi30k 30 epochs, PTB 12); its
    # records sit beside the converged ones (the same LN of each seed is their baseline)
    "mechanism": Campaign("results/runs", lambda c: _to_convergence(c, AVERAGE_EPOCHS, max_epoch=first_cap(c)),
                          ("avg", "best", "last"), ("epoch", AVERAGE_EPOCHS), significance=True,
                          norms=("rms", "group_rms", "pnpaper_gs", "dyt", "pnv_gs"), complete=True),
    # keeps every epoch checkpoint, with a higher cap: the run that sizes the campaign
    "budget": Campaign("results/budget", lambda c: _to_convergence(c, -1, max_epoch=80),
                       ("avg", "best", "last"), ("epoch", AVERAGE_EPOCHS)),
    # the pilot's PTB model was fairseq's standard transformer_lm_pn (configs/ptb_cpu_<norm>.yaml)
    "pilot": Campaign("results/pilot/runs", lambda c: [], ("avg",), ("update", 3),
                      prefixes=(("ptb", "ptb_cpu"),)),
}

VALID_RE = re.compile(r"epoch (\d+) \| valid on 'valid' subset \| loss ([\d.]+) .*?\| num_updates (\d+)")
TRAIN_EPOCH_RE = re.compile(r"\[train\]\[INFO\] - epoch (\d+) \| .*?\| wps ([\d.]+) .*?\| num_updates (\d+)"
                            r".*?\| train_wall (\d+)")
INNER_WPS_RE = re.compile(r"\[train_inner\].*?wps=([\d.]+),")
DONE_RE = re.compile(r"done training in ([\d.]+) seconds")
EARLY_STOP_RE = re.compile(r"early stop since valid performance hasn't improved for last (\d+) runs")


def parse_log(log: Path) -> dict:
    """Validation curve, stopping and training speed from a fairseq training log (all segments)."""
    text = log.read_text(errors="replace") if log.exists() else ""
    valid, by_epoch = {}, {}
    for epoch, loss, upd in VALID_RE.findall(text):
        valid[int(upd)] = float(loss)
        by_epoch[int(epoch)] = float(loss)
    epochs = {}
    for e, w, u, t in TRAIN_EPOCH_RE.findall(text):  # a resumed epoch is logged again: keep the last
        epochs[int(e)] = {"epoch": int(e), "wps": float(w), "num_updates": int(u), "train_wall": int(t)}
    inner = sorted(float(w) for w in INNER_WPS_RE.findall(text))
    out = {
        # fairseq's own training time, summed over resumed segments (excludes start-up and the
        # final validation), so a segment whose driver was interrupted still counts
        "fairseq_train_s": round(sum(float(s) for s in DONE_RE.findall(text)), 1),
        "valid_loss": [[u, valid[u]] for u in sorted(valid)],
        "valid_loss_by_epoch": [[e, by_epoch[e]] for e in sorted(by_epoch)],
        "epochs": [epochs[e] for e in sorted(epochs)],
        "median_train_wps": inner[len(inner) // 2] if inner else None,
    }
    if by_epoch:
        best = min(by_epoch, key=lambda e: (by_epoch[e], e))
        out.update(last_epoch=max(by_epoch), best_epoch=best, best_valid_loss=by_epoch[best])
    if epochs:
        last = epochs[max(epochs)]
        walls = sum(e["train_wall"] for e in epochs.values())
        out["train_s_per_update"] = round(walls / last["num_updates"], 3) if last["num_updates"] else None
    m = EARLY_STOP_RE.search(text)
    out["stopped_by"] = f"{STOP_PATIENCE} ({m.group(1)} epochs without a better validation loss)" if m else None
    return out


# the record's keys parse_log writes (what a training log says of its run)
LOG_FIELDS = ("fairseq_train_s", "valid_loss", "valid_loss_by_epoch", "epochs", "median_train_wps",
              "last_epoch", "best_epoch", "best_valid_loss", "train_s_per_update", "stopped_by")
# what a run's training and evaluation put in its record: set aside when that training is lost
TRAINED = (*LOG_FIELDS, "train_segments", "train_wall_s", "started_commit", "averaged", "evaluations",
           "eval_segments", "core_hours")

# what a run retrained from update 0 for a raised cap (Run.reopen without a checkpoint) keeps of
# its earlier training under earlier_caps, beside REOPENED: the run as it stood at the old cap
RETRAINED = (*TRAINED, "hardware", "command", "preset")

# how a finished converged run stopped: the start of its record's ``stopped_by``
STOP_PATIENCE, STOP_CAP = "patience", "epoch cap"


def stopped_by(record: dict, reason: str) -> bool:
    """Whether ``record`` stopped for ``reason`` (:data:`STOP_PATIENCE` or :data:`STOP_CAP`)."""
    return str(record.get("stopped_by") or "").startswith(reason)


def recorded_cap(record: dict) -> int | None:
    """The epoch cap a record's run trained to: its ``max_epoch``, else its training command's."""
    if record.get("max_epoch"):
        return record["max_epoch"]
    caps = re.findall(r"optimization\.max_epoch=(\d+)", record.get("command", ""))
    return int(caps[-1]) if caps else None


def at_cap(record: dict, cap: int | None) -> dict | None:
    """The run of ``record`` as it stood at the epoch cap ``cap`` (None: as it is): the record
    itself when it trains to that cap, else its ending at that cap (``earlier_caps``, written
    when a raised cap reopened it: :meth:`Run.reopen`), a done run whose curve stops at ``cap``;
    None when the run has no ending at ``cap`` (it never trained to it). A record that names no
    cap is taken as it is."""
    if cap is None or recorded_cap(record) in (None, cap):
        return record
    ending = next((e for e in record.get("earlier_caps", []) if e.get("max_epoch") == cap), None)
    if ending is None:
        return None
    view = {**record, **ending, "status": "done"}
    if not ending.get("retrained"):  # trained on from that ending: its curve goes on past the cap
        view["valid_loss_by_epoch"] = [p for p in record.get("valid_loss_by_epoch", []) if p[0] <= cap]
        view["epochs"] = [e for e in record.get("epochs", []) if e["epoch"] <= cap]
        last_update = max((e["num_updates"] for e in view["epochs"]), default=0)
        view["valid_loss"] = [p for p in record.get("valid_loss", []) if p[0] <= last_update]
        if view["valid_loss_by_epoch"]:
            best = min(view["valid_loss_by_epoch"], key=lambda p: (p[1], p[0]))
            view.update(last_epoch=view["valid_loss_by_epoch"][-1][0], best_epoch=best[0], best_valid_loss=best[1])
    for key in ("earlier_caps", "continued_from"):
        view.pop(key, None)
    return view


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _moved(value, moved: dict[str, str]):
    """``value`` (a record's JSON value) with every string that is the path of a moved file
    (a key of ``moved``) replaced by its new path. Exact matches in a walk: the pointers follow
    their files, while the commands stay as they ran (and a path JSON escapes is still found)."""
    if isinstance(value, dict):
        return {k: _moved(v, moved) for k, v in value.items()}
    if isinstance(value, list):
        return [_moved(v, moved) for v in value]
    return moved.get(value, value) if isinstance(value, str) else value


class Run:
    def __init__(self, corpus: str, norm: str, seed: int, args):
        self.corpus, self.norm, self.seed, self.args = corpus, norm, seed, args
        self.spec = CORPORA[corpus]
        self.campaign = CAMPAIGNS[args.campaign]
        self.name = f"{norm}_s{seed}"
        self.root = project_root(args)
        sub = "" if args.campaign == "pilot" else f"{args.campaign}/"  # the pilot's runs predate campaigns
        self.dir = self.root / "runs" / f"{sub}{corpus}" / self.name
        self.record_path = self.root / self.campaign.records / corpus / f"{self.name}.json"
        self.record = self._read()
        self._set: set[str] = set()  # the record's keys this Run has written (save)
        self.preset = f"{self.campaign.prefix(corpus)}_{norm}"
        self.lock = self.dir / "run.lock"

    def _read(self) -> dict:
        return json.loads(self.record_path.read_text()) if self.record_path.exists() else {}

    def save(self, **updates) -> None:
        """Write ``updates`` into the record, merged with the record file as it is now: another
        process (a ``--collect`` beside a training, a second job on the corpus) may have written
        it since this Run read it. The keys this Run has set are its own; every other key is the
        file's, and ``self.record`` becomes the merged record."""
        self.record.update(updates)
        self._set.update(updates)
        self._write()

    def drop(self, *keys: str) -> None:
        """Remove ``keys`` from the record and its file (``save`` would take them back from the file)."""
        for key in keys:
            self.record.pop(key, None)
        self._set.difference_update(keys)
        self._write(drop=keys)

    def _own(self) -> dict:
        """The record's keys this Run has set, with its values."""
        return {key: self.record[key] for key in self._set if key in self.record}

    def _write(self, drop: tuple[str, ...] = ()) -> None:
        with directory_lock(self.record_path.parent):
            merged = self._read()
            for key in drop:
                merged.pop(key, None)
            merged.update(self._own())
            self.record = merged
            atomic_write_json(self.record_path, merged)

    def refresh(self) -> None:
        """Re-read the record file (another process may have written it), keeping this Run's keys."""
        self.record = {**self._read(), **self._own()}

    def cap(self) -> int | None:
        """The epoch cap this invocation trains to (the last ``optimization.max_epoch`` override:
        the campaign's, then the caller's ``--override``); None without one (the pilot)."""
        caps = [int(o.split("=", 1)[1]) for o in [*self.campaign.overrides(self.spec), *self.args.override]
                if o.startswith("optimization.max_epoch=")]
        return caps[-1] if caps else None

    def recorded_cap(self) -> int | None:
        """The epoch cap the record's run trained to (its training command's)."""
        return recorded_cap(self.record)

    def capped_below(self) -> int | None:
        """The cap a done run stopped at, when that is below this invocation's cap (the cap was
        raised since): the run goes on training from its last checkpoint. None otherwise, also
        for a run the stopping rule stopped (raising the cap does not change where it stops)."""
        if self.record.get("status") != "done" or not stopped_by(self.record, STOP_CAP):
            return None
        recorded, cap = self.recorded_cap(), self.cap()
        return recorded if recorded and cap and cap > recorded else None

    def reopen(self, recorded: int) -> None:
        """Reopen a done run for a raised cap, losing nothing: what its end produced (averaged
        checkpoint, ``eval_*`` files, the kept norm statistics) moves to ``cap<recorded>/`` beside
        it, and the record keeps the earlier ending's fields under ``earlier_caps``. Its evaluation
        core-hours stay counted (``eval_segments`` keys ``<which>@cap<recorded>``). A reopened LN
        run also sets aside the paired bootstraps that compared its earlier ending.

        With ``checkpoint_last.pt`` the run trains on from it (``continued_from`` in the ending
        says from which epoch and commit). Without it (a replaced machine; only with
        ``--retrain-capped``) the run trains again from update 0, and its ending keeps the
        earlier training whole (curve, segments, hardware, command: :data:`RETRAINED`), so that
        the tables still read the run at the old cap (``results.at_cap``); its core-hours stay
        counted as spent (:meth:`earlier_hours`)."""
        retrain = not (self.dir / "checkpoint_last.pt").exists()
        kept = self.dir / f"cap{recorded}"
        kept.mkdir(parents=True, exist_ok=True)
        moved = {}
        for f in [self.checkpoint_for("avg"), *self.dir.glob("eval_*")]:
            if f.is_file():
                os.replace(f, kept / f.name)
                moved[str(f)] = str(kept / f.name)
        fields = (*REOPENED, *RETRAINED) if retrain else REOPENED
        ending = _moved({k: self.record[k] for k in fields if k in self.record}, moved)
        how = {"when": time.strftime("%Y-%m-%d %H:%M:%S"), "host": socket.gethostname(), "commit": git_commit()}
        if retrain:
            ending["retrained"] = {**how, "why": f"{self.dir} had no checkpoint_last.pt to train on from "
                                   "(lost with a replaced machine): trained again from update 0 to the new cap"}
        else:
            ending["continued_from"] = {**how, "checkpoint": str(self.dir / "checkpoint_last.pt"),
                                        "epoch": self.record.get("last_epoch"),
                                        "trained_from_commit": self.record.get("started_commit")}
        beside, tag = self.record_path.parent, f"cap{recorded}"
        if new := self._set_aside_file(self.stats_record.name, tag, beside):
            ending["norm_stats"] = new
        for field, name in (self.record.get("kept_hypotheses") or {}).items():
            if new := self._set_aside_file(name, tag, beside):
                ending["kept_hypotheses"][field] = new
        segments = {k if "@" in k else f"{k}@cap{recorded}": v
                    for k, v in (self.record.get("eval_segments") or {}).items()}
        self.save(earlier_caps=[*self.record.get("earlier_caps", []), {"max_epoch": recorded, **ending}],
                  eval_segments=segments)
        self.drop(*fields)
        (self.dir / "train.done").unlink(missing_ok=True)
        self.set_aside_bootstraps_against()
        self.log(f"reopened: done at the {recorded}-epoch cap, now {self.cap()}; "
                 + ("training again from update 0 (no checkpoint to train on from)" if retrain
                    else "training on from its last checkpoint"))

    @staticmethod
    def earlier_hours(record: dict) -> float:
        """Core-hours of earlier endings whose training a retrain replaced (``earlier_caps``
        entries with ``retrained``): spent, though no longer the record's own."""
        return sum(e.get("core_hours", 0.0) for e in record.get("earlier_caps", []) if e.get("retrained"))

    def set_aside_bootstraps_against(self) -> None:
        """For an LN run whose ending changes (reopened, superseded): the other norms' paired
        bootstraps of its seed compared the earlier ending; each moves to the other record's
        ``earlier_paired_bootstrap``, and the next bootstrap compares the new one."""
        if self.norm != LN:
            return
        for norm in NORMS[1:]:
            other = Run(self.corpus, norm, self.seed, self.args)
            if "paired_bootstrap" in other.record:
                other.save(earlier_paired_bootstrap=[*other.record.get("earlier_paired_bootstrap", []),
                                                     other.record["paired_bootstrap"]])
                other.drop("paired_bootstrap")

    @property
    def superseded_dir(self) -> Path:
        """Where superseded records of this corpus go (:meth:`supersede`): a folder of the records
        folder, so that no ``*.json`` glob of the records takes one for a current run."""
        return self.record_path.parent / SUPERSEDED

    def supersede(self, reason: str) -> str:
        """Set this done run's record aside so that the campaign trains the run again from
        update 0, losing nothing; returns what was done. For a run whose test translations are
        lost (a replaced machine), whose pairs with the other norms the paired bootstrap cannot
        test: the retrain keeps its translations beside its new record.

        The record, and the files kept beside it (translations, norm statistics), move to
        ``superseded/<run>.<time>.*``, the record with ``superseded`` (when, why, where) and its
        pointers renamed; its core-hours stay counted as spent (``write_status``), and the tables
        read it until the retrain is done (``results.load``), then list both values
        (``results.superseded_lines``). Refused, with nothing
        moved, while another process holds the run, when the run is not done, and when its run
        directory still holds files of its training (a retrain would resume from them or mix
        their logs): those are the user's to move, never deleted here."""
        with self.claim() as holder:
            refused = self.supersede_refused(holder)
            if refused:
                raise SystemExit(refused)
            stamp = time.strftime("%Y%m%d%H%M%S")
            aside = self.superseded_dir
            aside.mkdir(exist_ok=True)
            record = dict(self.record)
            if record.get("kept_hypotheses"):
                record["kept_hypotheses"] = {field: new for field, name in record["kept_hypotheses"].items()
                                             if (new := self._set_aside_file(name, stamp, aside))}
            if record.get("norm_stats"):
                record["norm_stats"] = self._set_aside_file(record["norm_stats"], stamp, aside)
                if record["norm_stats"] is None:
                    record.pop("norm_stats")
            record["superseded"] = {"when": time.strftime("%Y-%m-%d %H:%M:%S"), "reason": reason,
                                    "host": socket.gethostname(), "by_commit": git_commit()}
            target = aside / f"{self.name}.{stamp}.json"
            atomic_write_json(target, record)
            self.record_path.unlink()
            self.record, self._set = {}, set()
        self.set_aside_bootstraps_against()
        return (f"record moved to {target.relative_to(self.root)}; the campaign's command trains "
                f"{self.name} again from update 0")

    def supersede_refused(self, holder: int | None) -> str | None:
        """Why :meth:`supersede` would refuse this run now (None: it would not); ``holder``: the
        pid of the process that holds the run (:meth:`holder`, or what :meth:`claim` yields)."""
        if holder is not None:
            return f"--supersede {self.name}: process {holder} holds it; wait for it to end"
        if self.record.get("status") != "done":
            return (f"--supersede {self.name}: its record is {self.record.get('status') or 'missing'}, not done; "
                    "only a done run is superseded (rerun the campaign's command to finish it)")
        left = sorted(f.name for f in self.dir.iterdir() if f != self.lock) if self.dir.is_dir() else []
        if left:
            return (f"--supersede {self.name}: {self.dir} still holds {', '.join(left)} of its training; a "
                    "retrain there would resume from it. Move the directory aside yourself (nothing is "
                    "deleted here), then run --supersede again")
        return None

    def _set_aside_file(self, name: str, tag: str, folder: Path) -> str | None:
        """Move the file ``name`` kept beside the record (``<run>.<what>``) to
        ``folder/<run>.<tag>.<what>``: a superseded record's stamp (:meth:`supersede`) or a
        reopened run's ``cap<N>`` (:meth:`reopen`). Returns the new name, for the record that
        points at it (None when the file is gone already)."""
        source = self.record_path.with_name(name)
        if not source.is_file():
            return None
        new = f"{self.name}.{tag}.{name.removeprefix(self.name + '.')}"
        os.replace(source, folder / new)
        return new

    def log(self, msg: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {self.corpus}/{self.name}: {msg}", flush=True)

    def threads(self) -> int:
        """Threads of this invocation's runs; for a recorded run (status, collect) the ones it
        recorded, so that a call with other settings does not recount its core-hours."""
        recorded = (self.record.get("hardware") or {}).get("threads")
        if recorded and not self.args.threads:
            return recorded
        return self.args.threads or int(os.environ.get("OMP_NUM_THREADS", 0)) or (os.cpu_count() or 1)

    def step(self, what: str, argv: list[str], log: Path, fn) -> float:
        """Run one stage, ``fn()``, after writing its command line (``what`` + ``argv``) to
        ``log``; returns its wall time. A stage's refusal or failure is a RuntimeError."""
        t0 = time.time()
        with open(log, "a") as f:
            f.write(f"\n# {time.strftime('%Y-%m-%d %H:%M:%S')} $ {shlex.join([what, *argv])}\n")
        try:
            fn()
        except SystemExit as e:  # a stage's message; one failed run must not stop the others
            raise RuntimeError(f"{what}: {e.code}") from None
        return time.time() - t0

    def train_argv(self, data: Path) -> list[str]:
        """``pipeline.train`` arguments: the preset, this run's seed and directories, the
        campaign's overrides, then the caller's."""
        return runner.train_argv(
            self.campaign.prefix(self.corpus), self.norm, data, self.dir,
            [f"common.seed={self.seed}", *self.campaign.overrides(self.spec),
             *(["++model.track_norm_stats=" + hydra_quote(self.dir / "norm_stats.csv")]
               if self.tracks() else []),
             *self.args.override])

    def tracks(self) -> bool:
        """Whether this run records its norm statistics: asked for (``--track-norm-stats``), or
        a (corpus, seed) of the campaign's ``tracked``, so that a resume without the flag goes on
        recording."""
        return bool(self.args.track_norm_stats) or (self.corpus, self.seed) in self.campaign.tracked

    def core_hours(self, record: dict | None = None) -> float:
        """Wall time x threads of the finished training segments and the evaluations. While a
        segment runs (or after one was killed) fairseq's own per-epoch training time from the log
        stands in for it, whichever is larger: a lower bound, not an estimate."""
        return round(sum(self.split_hours(record)), 3)

    def split_hours(self, record: dict | None = None) -> tuple[float, float]:
        """``core_hours`` as (training, evaluation) core-hours, unrounded."""
        record = self.record if record is None else record
        segments = record.get("train_segments", [])
        # the log's training time ran at the threads its record names, not this call's: its
        # last segment's (unnamed counts 1, as below), else the record's, else this invocation's
        hardware = (record.get("hardware") or {}).get("threads")
        threads = (segments[-1].get("threads") or 1) if segments else hardware or self.threads()
        train = sum(s["wall_s"] * (s.get("threads") or 1) for s in segments)
        logged = sum(e.get("train_wall", 0) for e in record.get("epochs") or []) * threads
        evals = sum(s["wall_s"] * (s.get("threads") or 1) for s in (record.get("eval_segments") or {}).values())
        return max(train, logged) / 3600, evals / 3600

    def progress(self, state: str) -> dict:
        """The record as its training log stands now (not saved): a running or interrupted run
        shows the epochs and the training time it has logged since its record was last written."""
        log = self.dir / "train.log"
        if state in ("done", "to do") or not log.exists():
            return self.record
        return {**self.record, **parse_log(log)}

    def state(self) -> str:
        """done / running / interrupted / failed / to do, for the status table."""
        status = self.record.get("status")
        if status in (None, "to do"):
            return "to do"
        if status in ("done", "failed"):
            return status
        if self.holder() is not None:
            return "running"
        if self.lost():
            return "lost (no checkpoint to resume from: rerun the command to restart it)"
        if not self.resumable():
            # killed before its first epoch's checkpoint: there is nothing to resume, and nothing lost
            return "interrupted before its first checkpoint (rerun the command to start it at update 0)"
        return "interrupted (rerun the command to resume)"

    def resumable(self) -> bool:
        """Whether the run directory holds something to go on from: ``checkpoint_last.pt``, or the
        end of its training (``train.done``)."""
        return (self.dir / "checkpoint_last.pt").exists() or (self.dir / "train.done").exists()

    def close_killed_segment(self) -> None:
        """A training segment still open in the record (its job was killed before it could close
        it: SIGKILL, a session's end) is marked killed; we hold the run, so its job is gone. Its
        wall time stands at its last epoch's end, the last time it wrote the record."""
        segments = self.record.get("train_segments") or []
        if any(s.get("open") for s in segments):
            for s in segments:
                if s.pop("open", False):
                    s["killed"] = "its job was killed; wall time to its last epoch's end"
            self.save(train_segments=segments)

    def lost(self) -> bool:
        """Whether this unfinished run's training is lost: its record has trained (segments, or
        the epochs a killed segment logged), but its run directory holds neither
        ``checkpoint_last.pt`` nor the end of training (the machine was replaced, or the directory
        deleted), so the run restarts at update 0."""
        trained = self.record.get("train_segments") or self.record.get("epochs")
        return (self.record.get("status") not in (None, "to do", "done") and bool(trained)
                and not self.resumable())

    def set_aside_lost(self) -> None:
        """Before a lost run restarts (:meth:`lost`): what its lost training put in the record
        (segments, curve, evaluations of its checkpoints) moves to an entry of ``lost``, so the
        restarted run's record holds only what its own training did, and nothing is dropped;
        the campaign's spent core-hours still count the lost ones (:meth:`lost_hours`)."""
        kept = {k: self.record[k] for k in TRAINED if k in self.record}
        kept["core_hours"] = self.core_hours()
        self.save(lost=[*self.record.get("lost", []),
                        {"noticed": time.strftime("%Y-%m-%d %H:%M:%S"), "host": socket.gethostname(), **kept}])
        self.drop(*TRAINED)
        self.log(f"its earlier training ({kept['core_hours']:.2f} core-hours, to epoch "
                 f"{kept.get('last_epoch', 0)}) is lost with its checkpoints: restarting at update 0, "
                 "the lost segments kept in the record's 'lost'")

    @staticmethod
    def lost_hours(record: dict) -> float:
        """Core-hours of the training a run's ``record`` lost and restarted (``lost`` entries)."""
        return sum(entry.get("core_hours", 0.0) for entry in record.get("lost", []))

    def collect(self) -> None:
        """Refresh what a record takes from the training log (validation curve, speed), and for a
        finished run what the analyses need (:meth:`keep_analyses`)."""
        log = self.dir / "train.log"
        if log.exists():
            parsed = parse_log(log)
            if parsed.get("stopped_by") is None:  # the log has no early stop: keep the record's
                parsed.pop("stopped_by")           # (a run done by the epoch cap says so there)
            self.save(**parsed)
            self.save(core_hours=self.core_hours())
        if self.record.get("status") == "done":
            self.keep_analyses()

    @property
    def stats_record(self) -> Path:
        """Where a finished tracked run's norm statistics go: beside its record."""
        return self.record_path.with_name(f"{self.name}.norm_stats.csv")

    def keep_analyses(self) -> None:
        """Keep in the records what the paper's analyses read from a finished run, so that
        ``make_results`` and the paired bootstrap need no run directory: the tracked norm
        statistics (Figs. 2-4; ``runs/.../norm_stats.csv`` copied beside the record), the
        normalized singular values of the averaged model's word embedding (Fig. 6;
        ``embedding_spectrum`` in the record) and, for BLEU, the averaged model's test
        translations (:data:`HYPOTHESES`, copied beside the record as ``<run>.avg.hyp*.txt``)."""
        self.keep_hypotheses()
        stats = self.dir / "norm_stats.csv"
        if stats.is_file() and not self.stats_record.exists():
            atomic_write_text(self.stats_record, stats.read_text())
        # also when only the field went missing (a record written before Run.save merged with
        # the file): every collect restores what the record lacks
        if self.stats_record.exists() and self.record.get("norm_stats") != self.stats_record.name:
            self.save(norm_stats=self.stats_record.name)
        avg = self.checkpoint_for("avg")
        if "embedding_spectrum" not in self.record and avg.is_file():
            from powernorm_fairseq.analysis.spectrum import load_embedding, normalized_spectrum

            weight, key = load_embedding(avg)
            values = normalized_spectrum(weight)
            self.save(embedding_spectrum={"checkpoint": "avg", "key": key,
                                          "shape": list(weight.shape),
                                          "values": [round(float(v), 6) for v in values]})

    def keep_hypotheses(self) -> None:
        """Copy the averaged model's hypotheses files beside the record (``kept_hypotheses`` names
        the copies): a replaced machine takes the run directory, and with it any later paired
        bootstrap against this run (LN's seed-2 translations were lost that way)."""
        kept = dict(self.record.get("kept_hypotheses") or {})
        for field, suffix in HYPOTHESES.items():
            source, copy = self._evaluated(field), self.record_path.with_name(f"{self.name}.{suffix}")
            if field not in kept and source is not None:
                atomic_write_text(copy, source.read_text())
            if copy.is_file():
                kept[field] = copy.name
        if kept and kept != self.record.get("kept_hypotheses"):
            self.save(kept_hypotheses=kept)

    def _evaluated(self, field: str) -> Path | None:
        """The "avg" evaluation's own file ``field`` in the run directory, None when gone."""
        name = ((self.record.get("evaluations") or {}).get("avg") or {}).get(field)
        return Path(name) if name and Path(name).is_file() else None

    def hypotheses(self, field: str) -> Path | None:
        """The averaged model's hypotheses file ``field`` (:data:`HYPOTHESES`): the evaluation's
        own, else the copy kept beside the record; None when neither exists."""
        kept = (self.record.get("kept_hypotheses") or {}).get(field)
        copy = self.record_path.with_name(kept) if kept else None
        return self._evaluated(field) or (copy if copy is not None and copy.is_file() else None)

    def checkpoint_for(self, which: str) -> Path:
        return {"avg": self.dir / "checkpoint_avg.pt", "best": self.dir / "checkpoint_best.pt",
                "last": self.dir / "checkpoint_last.pt"}[which]

    def average(self, log: Path) -> None:
        avg = self.checkpoint_for("avg")
        kind, n = self.campaign.average
        if avg.exists():
            return
        self.log(f"averaging the last {n} {kind} checkpoints")
        self.step("powernorm-average", ["--dir", str(self.dir), f"--num-{kind}-checkpoints", str(n),
                                        "--output", str(avg)], log,
                  lambda: runner.average(self.dir, n, kind, avg))
        self.save(averaged=f"last {n} {kind} checkpoints")

    def evaluate(self, which: str, log: Path) -> dict:
        evaluations = self.record.setdefault("evaluations", {})
        if which in evaluations:
            return evaluations[which]
        out = self.dir / f"eval_{which}.json"
        argv = runner.evaluate_argv(self.spec.metric, self.root / self.spec.prepared,
                                    self.checkpoint_for(which), out)
        self.log(f"evaluating the {which} checkpoint")
        wall = self.step("powernorm-evaluate", argv, log, lambda: runner.evaluate(argv))
        evaluation = json.loads(out.read_text())
        evaluation["eval_command"] = shlex.join(["python", "-m", "powernorm_fairseq.pipeline.evaluate", *argv])
        evaluations[which] = evaluation
        segs = self.record.setdefault("eval_segments", {})
        segs[which] = {"wall_s": round(wall, 1), "threads": self.threads(), "commit": git_commit()}
        self.save(evaluations=evaluations, eval_segments=segs, core_hours=self.core_hours())
        return evaluation

    @contextlib.contextmanager
    def claim(self) -> Iterator[int | None]:
        """Hold this run for the block: an exclusive ``flock`` on ``run.lock`` (with this process's
        pid in it, for the status table), removed at the end. Yields None when it is held, else
        the pid of the process that holds it: then the run is left to that process, since two
        trainings of one run directory would overwrite each other's checkpoints. A lock left by a
        killed process holds nothing (the kernel releases a flock with its process); one written
        by code before this lock (pid only, no flock) counts as held while its pid lives."""
        self.dir.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(self.lock, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                yield self.holder() or -1
                return
            try:  # the holder before us removed the file after we opened it: lock the new one
                same = os.fstat(fd).st_ino == os.stat(self.lock).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        try:
            holder = self.holder()
            if holder is not None and holder != os.getpid():
                yield holder
                return
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()} {socket.gethostname()}\n".encode())
            self.record = self._read()  # as the last holder left it
            try:
                yield None
            finally:  # before the flock goes (a waiter re-checks the inode), also after a failure
                self.lock.unlink(missing_ok=True)
        finally:
            os.close(fd)

    def holder(self) -> int | None:
        """The live pid written in ``run.lock``, or None."""
        try:
            pid = int(self.lock.read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None
        return pid if pid > 0 and pid_alive(pid) else None

    def run(self) -> bool:
        """Train, average and evaluate what is left of this run; False when another process
        holds it (left to that process, which also commits its record)."""
        with self.claim() as holder:
            if holder is not None:
                self.log(f"running in another process (pid {holder}); left to it")
                return False
            self._run()
            return True

    def _run(self) -> None:
        recorded = self.capped_below()
        if recorded and not (self.dir / "checkpoint_last.pt").exists() and \
                not getattr(self.args, "retrain_capped", False):  # its record stays as it is
            self.log(f"done at the {recorded}-epoch cap, now {self.cap()}, but {self.dir} has no "
                     "checkpoint_last.pt to train on from: left done (`--retrain-capped` trains it again "
                     "from update 0 to the new cap, its ending at this cap kept under earlier_caps)")
            return
        if recorded:
            self.reopen(recorded)
        elif self.record.get("status") == "done":
            self.log("done already (delete the record to rerun)")
            return
        self.close_killed_segment()
        if self.lost():
            self.set_aside_lost()
        data = self.root / self.spec.prepared / "data-bin"
        self.drop("error")  # from an earlier failed attempt of this run
        log = self.dir / "train.log"
        argv = self.train_argv(data)
        segments = self.record.get("train_segments", [])
        # a run that starts at update 0 starts at this commit, whatever an earlier start that left
        # no checkpoint (a replaced machine, killed before its record named any training) said
        resumes = self.resumable()
        self.save(corpus=self.corpus, norm=self.norm, seed=self.seed, campaign=self.args.campaign,
                  preset=f"configs/{self.preset}.yaml", max_epoch=self.cap(),
                  command=shlex.join(["python", "-m", "powernorm_fairseq.pipeline.train", *argv]),
                  status="training", hardware=hardware(self.args.threads),
                  started_commit=(self.record.get("started_commit") if resumes else None) or git_commit())
        write_status(self.args)  # the table shows this run as running from its start
        if not (self.dir / "train.done").exists():
            stats = self.dir / "norm_stats.csv"
            if self.tracks() and stats.exists() and not (self.dir / "checkpoint_last.pt").exists():
                # killed before its first checkpoint: the run restarts at update 0, and the
                # tracker refuses to continue a file of another start; keep it aside
                stats.rename(stats.with_name(f"norm_stats.before-restart-{time.strftime('%Y%m%d%H%M%S')}.csv"))
            self.log("training")
            segment = {"started": time.strftime("%Y-%m-%d %H:%M:%S"), "wall_s": 0.0,
                       "threads": self.threads(), "commit": git_commit(), "open": True}
            t0 = time.time()

            def record_segment() -> None:
                segment["wall_s"] = round(time.time() - t0, 1)
                trained = [*segments, segment]
                fields = dict(train_segments=trained, train_wall_s=round(sum(s["wall_s"] for s in trained), 1),
                              **parse_log(log))
                self.save(**fields, core_hours=self.core_hours({**self.record, **fields}))

            def progress(line: str) -> None:
                # each epoch's end brings the record up to date: a job killed without running the
                # `finally` below (SIGKILL, a session's end) leaves its training in the record
                if TRAIN_EPOCH_RE.search(line):
                    try:
                        record_segment()
                    except OSError as e:  # the record catches up at the segment's end; train on
                        self.log(f"could not bring the record up to date at an epoch's end ({e})")

            try:
                # fairseq's output goes to train.log (pipeline.train writes it), not the console
                self.step("powernorm-train", argv, log, lambda: runner.train(argv, echo=progress))
            finally:
                segment.pop("open", None)
                record_segment()
            (self.dir / "train.done").write_text("")
        parsed = parse_log(log)
        if parsed.get("stopped_by") is None and parsed.get("last_epoch") and \
                self.args.campaign != "pilot":
            parsed["stopped_by"] = f"{STOP_CAP} ({parsed['last_epoch']} epochs; not converged by the rule)"
        self.save(status="evaluating", **parsed)
        if "avg" in self.campaign.evaluations:
            self.average(log)
        for which in self.campaign.evaluations:
            self.evaluate(which, log)
        self.keep_analyses()
        self.save(status="done", commit=git_commit(), core_hours=self.core_hours())
        self.log("done")


def significance(runs: list[Run]) -> None:
    """Paired bootstrap (sacreBLEU, 1000 samples) of each norm's averaged model against LN's of the
    same seed, on the test set, for the tokenized (paper) and the detokenized BLEU; stored in the
    norm's record as ``paired_bootstrap``. Needs both runs done; skipped when already there."""
    from powernorm_fairseq.analysis.stats import paired_bootstrap_bleu
    from powernorm_fairseq.pipeline.common import read_lines
    from powernorm_fairseq.pipeline.evaluate import RECIPES, load_prepared

    for run in runs:  # another process (or a reopened LN run) may have changed them
        run.refresh()
    by_key = {(r.corpus, r.norm, r.seed): r for r in runs}
    for run in runs:
        base = by_key.get((run.corpus, LN, run.seed))
        if run.norm == LN or base is None or run.spec.metric != "bleu" or "paired_bootstrap" in run.record:
            continue
        if run.record.get("status") != "done" or base.record.get("status") != "done":
            continue
        _, prep = load_prepared(run.root / run.spec.prepared)
        # the same casing as the evaluation's own BLEU (its recipe)
        lower = not RECIPES[run.record["evaluations"]["avg"]["recipe"]]["case_sensitive"]
        result, missing = {"vs": f"{LN}_s{run.seed}", "checkpoint": "avg"}, []
        for key, field, refs, tok in (("bleu_detok", "hypotheses", prep["references"]["detok"], "13a"),
                                      ("bleu_tokenized", "hypotheses_tokenized", prep["references"]["tok"], "none")):
            hyp, hyp_base = run.hypotheses(field), base.hypotheses(field)
            if hyp is None or hyp_base is None:
                missing += [r.name for r, h in ((run, hyp), (base, hyp_base)) if h is None and r.name not in missing]
                continue
            result[key] = paired_bootstrap_bleu(read_lines(refs), read_lines(hyp_base), read_lines(hyp),
                                                tokenize=tok, lowercase=lower)
        if len(result) > 2:
            run.save(paired_bootstrap=result)
            run.log(f"paired bootstrap vs LN: p = {result.get('bleu_tokenized', {}).get('p_value')}")
        if missing:  # the tables say why this pair has no p-value; a later call tries again
            names = " and ".join(missing)
            reason = (f"the test translations of {names} are lost (a replaced machine); retrain "
                      f"{names} (reproduce --supersede {names.replace(' and ', ',')}) to test this pair")
            if run.record.get("paired_bootstrap_skipped") != reason:  # said once, not at every call
                run.save(paired_bootstrap_skipped=reason)
                run.log(f"paired bootstrap vs LN skipped: {reason}")
        elif "paired_bootstrap_skipped" in run.record:
            run.drop("paired_bootstrap_skipped")


def supersede(args) -> None:
    """``--supersede``: set each named done run's record aside (:meth:`Run.supersede`), all names
    checked before any record moves; with ``--commit`` the move is committed."""
    if not (args.reason or "").strip():
        raise SystemExit("--supersede: give --reason 'why' (kept in the set-aside record, and the tables show it)")
    if args.campaign != "converged":
        raise SystemExit(f"--supersede: only the converged campaign's runs are superseded, not {args.campaign}'s")
    runs = []
    for name in args.supersede.split(","):
        norm, _, seed = name.strip().rpartition("_s")
        if norm not in NORMS or not seed.isdigit():
            raise SystemExit(f"--supersede: {name!r} is not a run name <norm>_s<seed> (norms: {', '.join(NORMS)})")
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
    (``unfinished``: campaign -> corpus -> runs not done), two jobs of 1 thread on the 2 cores.
    Two jobs may run one corpus's command: a run one job holds is left to it by the other."""
    corpora = [c for c, n in unfinished.get("converged", {}).items() if n]
    retrain = unfinished.get("retrain", {})  # done at an earlier cap, their checkpoints gone
    commands = [f"    python scripts/reproduce.py {c} --seeds 1,2,3 --threads 1 --commit"
                + (" --retrain-capped" if retrain.get(c) else "") for c in corpora]
    commands += [f"    python scripts/reproduce.py {c} --campaign mechanism --seeds 1,2,3 --threads 1 --commit"
                 for c, n in unfinished.get("mechanism", {}).items() if n]
    if unfinished.get("budget", {}).get("multi30k"):  # the sizing run, after the campaign
        commands.append("    python scripts/reproduce.py multi30k --campaign budget --norms ln --seeds 1 --threads 1")
    if not commands:
        return ["Nothing is left to run.", ""]
    spare = max(corpora, key=lambda c: unfinished["converged"][c]) if corpora else None
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
                     if p.stem.rpartition("_s")[0] in spec.norms or campaign in ("budget", "pilot")}
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
    from powernorm_fairseq.pipeline import results  # imports this module

    results.main(["--root", os.fspath(root)])


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


def project_root(args) -> Path:
    """The project directory of ``args.root`` (default the current one), absolute: the commands
    and records name absolute paths, as they did when the root was the script's checkout."""
    return Path(os.path.abspath(getattr(args, "root", None) or "."))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="powernorm-reproduce", description=__doc__,
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
