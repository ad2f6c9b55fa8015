"""One run of a campaign: claimed by one process, trained through the pipeline's stages (train,
average, evaluate), its record brought up to date at every epoch's end."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shlex
import socket
import time
from collections.abc import Iterator
from pathlib import Path

from powernorm_fairseq.campaign.records import TRAIN_EPOCH_RE, RunRecord, parse_log, pid_alive
from powernorm_fairseq.campaign.setaside import SetAside
from powernorm_fairseq.campaign.spec import HYPOTHESES, STOP_CAP
from powernorm_fairseq.pipeline import runner
from powernorm_fairseq.pipeline.common import atomic_write_text, git_commit, hardware, hydra_quote


class Run(SetAside, RunRecord):
    """A run of a campaign (``corpus``, ``norm``, ``seed``, the invocation's ``args``).

    ``on_start``: called once the run's training starts (the command line rewrites the status
    table there), None by default."""

    on_start = None

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


    def _evaluated(self, field: str, record: dict | None = None) -> Path | None:
        """The "avg" evaluation's own file ``field`` in the run directory, None when gone."""
        record = self.record if record is None else record
        name = ((record.get("evaluations") or {}).get("avg") or {}).get(field)
        return Path(name) if name and Path(name).is_file() else None

    def hypotheses(self, field: str, record: dict | None = None) -> Path | None:
        """The averaged model's hypotheses file ``field`` (:data:`HYPOTHESES`) of the run, or of
        ``record``, a view of it (its ending at a cap, ``spec.at_cap``): the evaluation's own,
        else the copy kept beside the record; None when neither exists."""
        record = self.record if record is None else record
        kept = (record.get("kept_hypotheses") or {}).get(field)
        copy = self.record_path.with_name(kept) if kept else None
        return self._evaluated(field, record) or (copy if copy is not None and copy.is_file() else None)


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


    def probe_leak(self, log: Path) -> dict:
        """The leak probe of the averaged model (:mod:`powernorm_fairseq.analysis.leak`): how much
        its prediction at t moves when the tokens after t are shuffled; kept as ``leak``."""
        if "leak" in self.record:
            return self.record["leak"]
        out = self.dir / "leak.json"
        argv = ["--path", str(self.checkpoint_for("avg")), "--data", str(self.root / self.spec.prepared / "data-bin"),
                "--out", str(out)]
        self.log("probing the averaged model for a leak")
        wall = self.step("python -m powernorm_fairseq.analysis.leak", argv, log, lambda: runner.probe_leak(argv))
        result = {**json.loads(out.read_text()), "wall_s": round(wall, 1),
                  "command": shlex.join(["python", "-m", "powernorm_fairseq.analysis.leak", *argv])}
        self.save(leak=result)
        return result

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
        if self.on_start is not None:  # the status table shows this run as running from its start
            self.on_start()
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
        if parsed.get("stopped_by") is None and parsed.get("last_epoch") and self.cap() is not None:
            parsed["stopped_by"] = f"{STOP_CAP} ({parsed['last_epoch']} epochs; not converged by the rule)"
        self.save(status="evaluating", **parsed)
        if "avg" in self.campaign.evaluations:
            self.average(log)
        for which in self.campaign.evaluations:
            self.evaluate(which, log)
        if self.campaign.leak_probe:
            self.probe_leak(log)
        self.keep_analyses()
        self.save(status="done", commit=git_commit(), core_hours=self.core_hours())
        self.log("done")

