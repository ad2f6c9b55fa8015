"""What a run sets aside, losing nothing: its ending at a raised cap (:meth:`SetAside.reopen`), its
whole record for a retrain (:meth:`SetAside.supersede`), its training lost with a replaced machine
(:meth:`SetAside.set_aside_lost`). A mixin of :class:`~powernorm_fairseq.campaign.run.Run`."""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path

from powernorm_fairseq.campaign.records import RETRAINED, TRAINED, _moved
from powernorm_fairseq.campaign.spec import LN, NORMS, REOPENED, STOP_CAP, SUPERSEDED, stopped_by
from powernorm_fairseq.pipeline.common import atomic_write_json, git_commit


class SetAside:
    """Set-aside operations of a run (needs :class:`~powernorm_fairseq.campaign.records.RunRecord`
    and the run's ``dir``, ``claim``, ``checkpoint_for``, ``stats_record``)."""

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


    def set_aside_bootstraps_against(self) -> None:
        """For an LN run whose ending changes (reopened, superseded): the other norms' paired
        bootstraps of its seed compared the earlier ending; each moves to the other record's
        ``earlier_paired_bootstrap``, and the next bootstrap compares the new one (a table at
        the earlier cap still reads it there: ``spec.at_cap``)."""
        if self.norm != LN:
            return
        for norm in NORMS[1:]:
            other = type(self)(self.corpus, norm, self.seed, self.args)
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

