"""A run's record: what its training log says, the record file (merged under a lock), and its
core-hours. :class:`RunRecord` is the state of one run; :class:`~powernorm_fairseq.campaign.run.Run`
trains it."""

from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path

from powernorm_fairseq.campaign.spec import CAMPAIGNS, CORPORA, STOP_PATIENCE, recorded_cap
from powernorm_fairseq.pipeline.common import atomic_write_json, directory_lock

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


def project_root(args) -> Path:
    """The project directory of ``args.root`` (default the current one), absolute: the commands
    and records name absolute paths, as they did when the root was the script's checkout."""
    return Path(os.path.abspath(getattr(args, "root", None) or "."))



class RunRecord:
    """The record of one run (``<campaign records>/<corpus>/<norm>_s<seed>.json``): read, merged
    and written under a lock, and its accounting (threads, core-hours, state of its log)."""

    def __init__(self, corpus: str, norm: str, seed: int, args):
        self.corpus, self.norm, self.seed, self.args = corpus, norm, seed, args
        self.spec = CORPORA[corpus]
        self.campaign = CAMPAIGNS[args.campaign]
        self.name = f"{norm}_s{seed}"
        self.root = project_root(args)
        runs = args.campaign if self.campaign.runs is None else self.campaign.runs
        sub = f"{runs}/" if runs else ""
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


    def log(self, msg: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {self.corpus}/{self.name}: {msg}", flush=True)


    def threads(self) -> int:
        """Threads of this invocation's runs; for a recorded run (status, collect) the ones it
        recorded, so that a call with other settings does not recount its core-hours."""
        recorded = (self.record.get("hardware") or {}).get("threads")
        if recorded and not self.args.threads:
            return recorded
        return self.args.threads or int(os.environ.get("OMP_NUM_THREADS", 0)) or (os.cpu_count() or 1)


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


    @staticmethod
    def lost_hours(record: dict) -> float:
        """Core-hours of the training a run's ``record`` lost and restarted (``lost`` entries)."""
        return sum(entry.get("core_hours", 0.0) for entry in record.get("lost", []))


    @staticmethod
    def earlier_hours(record: dict) -> float:
        """Core-hours of earlier endings whose training a retrain replaced (``earlier_caps``
        entries with ``retrained``): spent, though no longer the record's own."""
        return sum(e.get("core_hours", 0.0) for e in record.get("earlier_caps", []) if e.get("retrained"))

