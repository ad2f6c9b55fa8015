#!/usr/bin/env python
"""Run the paper's norm comparison on a real corpus at CPU scale, run by run, resumably.

Usage::

    python scripts/reproduce.py multi30k --norms ln,bn,pnv,pn,pnpaper --seeds 1,2 --jobs 2
    python scripts/reproduce.py ptb --norms ln,bn,pnv,pn,pnpaper --seeds 1
    python scripts/make_results.py          # tables + plots from the records

For every (norm, seed) it runs, each step skipped when already done:

1. train: the preset ``configs/multi30k_<norm>.yaml`` / ``configs/ptb_cpu_<norm>.yaml`` through ``powernorm_fairseq.hydra_train``
   (checkpoints in ``runs/<corpus>/<norm>_s<seed>/``, git-ignored). Rerunning the same command
   resumes from ``checkpoint_last.pt``, so a killed run loses at most the updates since its last
   checkpoint (the presets save every 100 updates).
2. average: the last ``--average`` update checkpoints with ``scripts/average_checkpoints.py``.
3. evaluate: ``scripts/evaluate_bleu.sh`` (translation) or ``scripts/evaluate_ppl.sh`` (LM).

and writes ``results/runs/<corpus>/<norm>_s<seed>.json`` (tracked in git): status, command,
commit, seed, hardware, wall time of each training segment, the validation curve, training speed
and the evaluation record. The record is rewritten after every step, so the tables fill in run by
run and an unfinished run says so.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shlex
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from powernorm_fairseq.pipeline.common import atomic_write_json, git_commit  # noqa: E402

CORPORA = {
    # corpus: (preset prefix configs/<prefix>_<norm>.yaml, prepared dir, evaluation script)
    "multi30k": ("multi30k", "data/multi30k", "scripts/evaluate_bleu.sh"),
    "ptb": ("ptb_cpu", "data/ptb", "scripts/evaluate_ppl.sh"),
    # the paper's model (multi-linear attention), configs/ptb_cpu_tensorized_<norm>.yaml
    "ptb_tensorized": ("ptb_cpu_tensorized", "data/ptb", "scripts/evaluate_ppl.sh"),
}
VALID_RE = re.compile(r"valid on 'valid' subset \| loss ([\d.]+) .*?\| num_updates (\d+)")
TRAIN_EPOCH_RE = re.compile(r"\[train\]\[INFO\] - epoch (\d+) \| .*?\| wps ([\d.]+) .*?\| num_updates (\d+)"
                            r".*?\| train_wall (\d+)")
INNER_WPS_RE = re.compile(r"\[train_inner\].*?wps=([\d.]+),")
DONE_RE = re.compile(r"done training in ([\d.]+) seconds")


def hardware(threads: int | None) -> dict:
    """What the run ran on (recorded beside every number)."""
    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import torch

    return {"cpu": cpu, "cores": os.cpu_count(), "threads": threads or int(os.environ.get("OMP_NUM_THREADS", 0)) or None,
            "torch": torch.__version__, "python": platform.python_version(), "gpu": None}


def parse_log(log: Path) -> dict:
    """Validation curve and training speed from a fairseq training log."""
    text = log.read_text(errors="replace") if log.exists() else ""
    valid = {}
    for loss, upd in VALID_RE.findall(text):
        valid[int(upd)] = float(loss)
    epochs = [{"epoch": int(e), "wps": float(w), "num_updates": int(u), "train_wall": int(t)}
              for e, w, u, t in TRAIN_EPOCH_RE.findall(text)]
    inner = [float(w) for w in INNER_WPS_RE.findall(text)]
    inner.sort()
    return {
        # fairseq's own training time, summed over resumed segments (excludes start-up and the
        # final validation), so a segment whose driver was interrupted still counts
        "fairseq_train_s": round(sum(float(s) for s in DONE_RE.findall(text)), 1),
        "valid_loss": [[u, valid[u]] for u in sorted(valid)],
        "epochs": epochs,
        "median_train_wps": inner[len(inner) // 2] if inner else None,
    }


class Run:
    def __init__(self, corpus: str, norm: str, seed: int, args):
        self.corpus, self.norm, self.seed, self.args = corpus, norm, seed, args
        self.name = f"{norm}_s{seed}"
        self.dir = REPO / "runs" / corpus / self.name
        self.record_path = REPO / "results" / "runs" / corpus / f"{self.name}.json"
        self.record = json.loads(self.record_path.read_text()) if self.record_path.exists() else {}
        self.preset = f"{CORPORA[corpus][0]}_{norm}"

    def save(self, **updates) -> None:
        self.record.update(updates)
        atomic_write_json(self.record_path, self.record)

    def log(self, msg: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {self.corpus}/{self.name}: {msg}", flush=True)

    def sh(self, cmd: list[str], log: Path) -> float:
        env = dict(os.environ, PYTHONPATH=str(REPO))
        if self.args.threads:
            env["OMP_NUM_THREADS"] = str(self.args.threads)
        t0 = time.time()
        with open(log, "a") as f:
            f.write(f"\n# {time.strftime('%Y-%m-%d %H:%M:%S')} $ {shlex.join(cmd)}\n")
            f.flush()
            rc = subprocess.run(cmd, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT).returncode
        if rc != 0:
            raise RuntimeError(f"{cmd[0]} ... exited with {rc}; see {log}")
        return time.time() - t0

    def train_cmd(self, data: Path) -> list[str]:
        return [sys.executable, "-m", "powernorm_fairseq.hydra_train",
                "--config-name", self.preset,
                f"task.data={data}", f"common.seed={self.seed}",
                f"checkpoint.save_dir={self.dir}", f"hydra.run.dir={self.dir / 'hydra'}",
                *(["++model.track_norm_stats=" + str(self.dir / "norm_stats.csv")]
                  if self.args.track_norm_stats else []),
                *self.args.override]

    def collect(self) -> None:
        """Refresh what a record takes from the training log (validation curve, speed); an
        unfinished run is marked as such, with how far it got."""
        log = self.dir / "train.log"
        if not log.exists():
            return
        parsed = parse_log(log)
        if self.record.get("status") == "done":
            self.save(**parsed)
            return
        last = parsed["valid_loss"][-1][0] if parsed["valid_loss"] else 0
        self.save(**parsed, status="unfinished",
                  progress=f"last validation at update {last}; rerun the same command to resume")
        self.log(f"unfinished, {self.record['progress']}")

    def run(self) -> None:
        if self.record.get("status") == "done":
            self.log("done already (delete the record to rerun)")
            return
        _, prepared, eval_script = CORPORA[self.corpus]
        prepared = REPO / prepared
        data = prepared / "data-bin"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.record.pop("error", None)  # from an earlier failed attempt of this run
        log = self.dir / "train.log"
        cmd = self.train_cmd(data)
        segments = self.record.get("train_segments", [])
        self.save(corpus=self.corpus, norm=self.norm, seed=self.seed, preset=f"configs/{self.preset}.yaml",
                  command=shlex.join(["python", *cmd[1:]]), status="training", hardware=hardware(self.args.threads),
                  started_commit=git_commit())
        if not (self.dir / "train.done").exists():
            self.log("training")
            start = time.strftime("%Y-%m-%d %H:%M:%S")
            commit = git_commit()
            try:
                wall = self.sh(cmd, log)
            finally:
                parsed = parse_log(log)
            segments.append({"started": start, "wall_s": round(wall, 1), "commit": commit})
            (self.dir / "train.done").write_text("")
            self.save(train_segments=segments, train_wall_s=round(sum(s["wall_s"] for s in segments), 1), **parsed)
        avg = self.dir / "checkpoint_avg.pt"
        if not avg.exists():
            self.log(f"averaging the last {self.args.average} checkpoints")
            self.sh([sys.executable, "scripts/average_checkpoints.py", "--dir", str(self.dir),
                     "--num-update-checkpoints", str(self.args.average), "--output", str(avg)], log)
        self.save(averaged=f"last {self.args.average} update checkpoints (every 100 updates)", status="evaluating")
        self.log("evaluating")
        out = self.dir / "eval.json"
        eval_cmd = ["bash", eval_script, "--data", str(prepared), "--checkpoint", str(avg), "--out", str(out)]
        wall = self.sh(eval_cmd, log)
        evaluation = json.loads(out.read_text())
        self.save(evaluation=evaluation, eval_wall_s=round(wall, 1), eval_command=shlex.join(eval_cmd),
                  status="done", commit=git_commit())
        self.log(f"done: {json.dumps({k: v for k, v in evaluation.items() if 'bleu' in k or k in ('metric', 'value')})[:200]}")

    def evaluate_last(self) -> None:
        """Evaluate ``checkpoint_last.pt`` (the final weights, not averaged) of a finished run
        into the record's ``evaluation_last``; skipped when done already or when the checkpoint
        is gone (checkpoints live outside the repository)."""
        if self.record.get("status") != "done" or "evaluation_last" in self.record:
            return
        ckpt = self.dir / "checkpoint_last.pt"
        if not ckpt.exists():
            self.log(f"no {ckpt}; the last checkpoint cannot be evaluated")
            return
        _, prepared, eval_script = CORPORA[self.corpus]
        out = self.dir / "eval_last.json"
        cmd = ["bash", eval_script, "--data", str(REPO / prepared), "--checkpoint", str(ckpt),
               "--out", str(out)]
        self.log("evaluating the last checkpoint")
        wall = self.sh(cmd, self.dir / "train.log")
        self.save(evaluation_last=json.loads(out.read_text()), eval_last_wall_s=round(wall, 1),
                  eval_last_command=shlex.join(cmd), eval_last_commit=git_commit())


def _run_and_eval_last(run: Run) -> None:
    run.run()
    run.evaluate_last()


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("corpus", choices=sorted(CORPORA))
    p.add_argument("--norms", default="ln,bn,pnv,pn,pnpaper",
                   help="comma list; each names a preset configs/<prefix>_<norm>.yaml "
                   "(prefix: multi30k, ptb_cpu)")
    p.add_argument("--seeds", default="1", help="comma list of seeds")
    p.add_argument("--jobs", type=int, default=1, help="runs at the same time")
    p.add_argument("--threads", type=int, default=0, help="OMP_NUM_THREADS per run (0 = inherit)")
    p.add_argument("--average", type=int, default=3, help="update checkpoints to average")
    p.add_argument("--override", nargs="*", default=[], help="extra hydra overrides for training")
    p.add_argument("--track-norm-stats", action="store_true",
                   help="also record the norm statistics of the first encoder norm (Figs. 2-4) in "
                   "runs/<corpus>/<run>/norm_stats.csv; tracking does not change training")
    p.add_argument("--eval-last", action="store_true",
                   help="also evaluate the last checkpoint (not averaged) of every finished run "
                   "whose checkpoints are still in runs/, as the record's evaluation_last; "
                   "averaging checkpoints of a short run mixes very different weights")
    p.add_argument("--collect", action="store_true",
                   help="train nothing: refresh the records from the training logs")
    args = p.parse_args(argv)
    runs = []
    for seed in [int(s) for s in args.seeds.split(",")]:
        for norm in args.norms.split(","):
            preset = REPO / "configs" / f"{CORPORA[args.corpus][0]}_{norm}.yaml"
            if not preset.exists():
                raise SystemExit(f"no preset {preset.relative_to(REPO)}")
            runs.append(Run(args.corpus, norm, seed, args))
    if args.collect:
        for run in runs:
            run.collect()
        return
    failed = []
    with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        job = _run_and_eval_last if args.eval_last else Run.run
        for run, fut in [(r, pool.submit(job, r)) for r in runs]:
            try:
                fut.result()
            except Exception as e:  # one failed run must not stop the others; its record says so
                run.save(status="failed", error=str(e))
                run.log(f"FAILED: {e}")
                failed.append(run.name)
    if failed:
        raise SystemExit(f"failed runs: {', '.join(failed)}")


if __name__ == "__main__":
    main()
