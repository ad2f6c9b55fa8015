"""Statistics batch-size sweep (Fig. 5 of the paper): BLEU against the batch the norms see.

The effective batch per update is fixed at ``N_eff`` tokens while the batch each forward call (and
so each norm's batch statistics) sees is ``N`` tokens: ``max_tokens = N`` and gradient accumulation
``update_freq = N_eff / N`` (the paper: N_eff = 4K, N = 512 ... 4K, i.e. update_freq 8 ... 1).
LayerNorm has no batch statistics, so its curve shows what accumulation alone changes.

Every point is trained with the pipeline (``python -m powernorm_fairseq.pipeline.train``, which
keeps ``max_tokens * update_freq * world_size`` at ``--effective-tokens``) and scored with
``pipeline.evaluate`` (or ``fairseq_cli.generate``, see :func:`eval_command`); it writes
``<out>/points/<norm>_<N>.json`` when done (``<norm>_<N>_s<seed>.json`` for an explicit seed), so a
rerun skips finished points (and fairseq resumes an interrupted training from ``checkpoint_last.pt``).
Further seeds go into the same ``<out>``; a sweep plots its own points, and ``--plot-only`` plots
every recorded point of ``<out>``, averaging the seeds of each.
"""

from __future__ import annotations

import json
import re
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from powernorm_fairseq.pipeline import runner
from powernorm_fairseq.pipeline.common import (
    PLUGIN_DIR,
    atomic_write_json,
    git_commit,
    hardware,
    log,
    python_module_cmd,
    run_cmd,
)
from powernorm_fairseq.presets import ordered_norm_configs

__all__ = ["NORM_ALIASES", "SweepPoint", "parse_bleu", "plan", "run_sweep", "sweep_table"]

# A point names its norm by the registry name (its records' ``norm``). PN's variants share the
# name ``power``: the sweep compares the first of them (``pn``, the reference; configs/norm/).
_BY_NAME: dict = {}
for _spec in ordered_norm_configs():
    _BY_NAME.setdefault(_spec.norm, _spec)
del _spec
#: short names of the pipeline (train.py) for the registry names, and the short names themselves
NORM_ALIASES = {**{name: s.short for name, s in _BY_NAME.items()},
                **{s.short: s.short for s in _BY_NAME.values()}}
_REGISTRY_NAME = {s.short: name for name, s in _BY_NAME.items()}
_BLEU = re.compile(r"BLEU4? = ([0-9.]+)")


@dataclass(frozen=True)
class SweepPoint:
    """One training run of the sweep: ``norm`` (registry name) with ``stat_tokens`` per forward;
    ``seed`` None keeps the preset's (or the flags') own seed."""

    norm: str
    stat_tokens: int
    effective_tokens: int
    seed: int | None = None

    @property
    def name(self) -> str:
        seed = "" if self.seed is None else f"_s{self.seed}"
        return f"{NORM_ALIASES[self.norm]}_{self.stat_tokens}{seed}"

    @property
    def update_freq(self) -> int:
        return self.effective_tokens // self.stat_tokens


def plan(norms: Sequence[str], sizes: Sequence[int], effective_tokens: int | None,
         seed: int | None = None) -> list[SweepPoint]:
    """The sweep's points, norms outer, sizes ascending. ``effective_tokens`` defaults to the
    largest size; every size must divide it (integral gradient accumulation)."""
    if not norms or not sizes:
        raise ValueError("need at least one norm and one size")
    unknown = [n for n in norms if n not in NORM_ALIASES]
    if unknown:
        raise ValueError(f"unknown norms {unknown}; choose from {sorted(NORM_ALIASES)}")
    eff = effective_tokens or max(sizes)
    bad = [n for n in sizes if n <= 0 or eff % n]
    if bad:
        raise ValueError(f"sizes {bad} do not divide the effective batch {eff}: gradient "
                         "accumulation needs effective_tokens = size x update_freq")
    return [SweepPoint(_REGISTRY_NAME[NORM_ALIASES[n]], s, eff, seed)
            for n in norms for s in sorted(set(sizes))]


def parse_bleu(output: str) -> float:
    """The last ``BLEU4 = x`` (fairseq-generate) or ``BLEU = x`` (sacrebleu) score in ``output``."""
    found = _BLEU.findall(output)
    if not found:
        raise SystemExit("no BLEU score in the evaluation output; last lines:\n"
                         + "\n".join(output.splitlines()[-10:]))
    return float(found[-1])


_BATCH_FLAGS = ("--max-tokens", "--update-freq", "dataset.max_tokens", "optimization.update_freq")
_SEED_FLAGS = ("--seed", "common.seed")


def train_command(point: SweepPoint, args, save_dir: Path) -> list[str]:
    """``pipeline.train`` command of ``point``: the batch size enters as max_tokens, the rest of
    the preset (or flags) is unchanged.

    Flags mode: the pipeline derives ``update_freq`` from ``--max-tokens`` and
    ``--effective-tokens`` (and the world size). Preset mode: the pipeline derives it from the
    preset's own ``max_tokens``, so ``optimization.update_freq`` is set here as well (hydra: the
    last override wins), which assumes one device; the statistics batch is per device anyway.
    """
    clash = [a for a in args.train_args if a.split("=")[0] in _BATCH_FLAGS]
    if clash:
        raise ValueError(f"the sweep sets the batch itself; remove {clash} from the training args")
    clash = [a for a in args.train_args if a.split("=")[0] in _SEED_FLAGS]
    if clash and point.seed is not None:
        raise ValueError(f"--seed sets the seed (and names the points); remove {clash} from the "
                         "training args")
    if args.experiment == "flags":
        batch = ["--max-tokens", str(point.stat_tokens)]
        seed = [] if point.seed is None else ["--seed", str(point.seed)]
    else:
        batch = [f"dataset.max_tokens={point.stat_tokens}",
                 f"optimization.update_freq=[{point.update_freq}]"]
        seed = [] if point.seed is None else [f"common.seed={point.seed}"]
    return python_module_cmd("powernorm_fairseq.pipeline.train") + runner.train_argv(
        args.experiment, NORM_ALIASES[point.norm], args.data, save_dir,
        [*batch, *seed, *args.train_args], cpu=args.cpu, effective_tokens=point.effective_tokens)


def eval_command(args, save_dir: Path) -> tuple[list[str], Callable[[str], float]]:
    """Scoring command of a point's checkpoint and how to read its BLEU.

    Data made by the pipeline's prepare step (``prepare.json`` in the data directory or its
    parent) is scored with ``pipeline.evaluate bleu``, i.e. the corpus's recipe (beam, length
    penalty, tokenized BLEU as in the paper), read from its JSON record; other data with
    ``fairseq_cli.generate --beam 5 --lenpen 1.0 --remove-bpe`` and its ``BLEU4`` line.
    ``args.eval_args`` are appended to either (the last value of a flag wins).
    """
    data, ckpt = Path(args.data), save_dir / args.checkpoint
    if any((root / "prepare.json").exists() for root in (data, data.parent)):
        record = save_dir / "sweep_bleu.json"
        cmd = python_module_cmd("powernorm_fairseq.pipeline.evaluate") + runner.evaluate_argv(
            "bleu", data, ckpt, record, args.eval_args)
        return cmd, lambda _output: float(json.loads(record.read_text())["value"])
    cmd = python_module_cmd("fairseq_cli.generate") + [
        str(data), "--user-dir", str(PLUGIN_DIR), "--path", str(ckpt), "--gen-subset", "test",
        "--beam", "5", "--lenpen", "1.0", "--batch-size", "128", "--remove-bpe", "--quiet"]
    if args.cpu:
        cmd.append("--cpu")
    return cmd + list(args.eval_args), parse_bleu


def run_sweep(args, runner: Callable[..., str] = run_cmd) -> list[dict]:
    """Train and score every point not done yet; returns all records (also ``<out>/sweep.json``).

    ``args`` carries ``experiment, data, out, norms, sizes, effective_tokens, cpu, checkpoint,
    train_args, eval_args, dry_run`` and optionally ``seed`` (see ``analysis/batch_size_sweep.py``).
    ``runner(cmd, log_file=...)`` runs a command and returns its output (tests replace it).
    """
    out = Path(args.out)
    points = plan(args.norms, args.sizes, args.effective_tokens, getattr(args, "seed", None))
    records = []
    for point in points:
        record_path = out / "points" / f"{point.name}.json"
        save_dir = out / "runs" / point.name
        train_cmd = train_command(point, args, save_dir)
        eval_cmd, read_bleu = eval_command(args, save_dir)
        if args.dry_run:
            print(f"# {point.name}: max_tokens {point.stat_tokens} x update_freq "
                  f"{point.update_freq} = {point.effective_tokens} tokens per update")
            print(" ".join(train_cmd))
            print(" ".join(eval_cmd))
            continue
        if record_path.exists():
            log(f"{point.name}: done before ({record_path}), skipped")
            records.append(json.loads(record_path.read_text()))
            continue
        save_dir.mkdir(parents=True, exist_ok=True)
        log(f"{point.name}: training (max_tokens {point.stat_tokens}, update_freq {point.update_freq})")
        t0 = time.time()
        runner(train_cmd, log_file=save_dir / "sweep_train.log")
        t1 = time.time()
        log(f"{point.name}: evaluating {args.checkpoint}")
        bleu = read_bleu(runner(eval_cmd, log_file=save_dir / "sweep_eval.log"))
        record = {**asdict(point), "update_freq": point.update_freq, "bleu": bleu,
                  "train_cmd": " ".join(train_cmd), "eval_cmd": " ".join(eval_cmd),
                  "train_s": round(t1 - t0, 1), "eval_s": round(time.time() - t1, 1),
                  "git_commit": git_commit(), "hardware": hardware(),
                  "finished": time.strftime("%Y-%m-%dT%H:%M:%S")}
        atomic_write_json(record_path, record)
        log(f"{point.name}: BLEU {bleu}")
        records.append(record)
    if not args.dry_run:
        atomic_write_json(out / "sweep.json", {"command": " ".join(sys.argv), "points": records})
    return records


def sweep_table(records: Sequence[dict]) -> str:
    """Markdown tables of the recorded points: BLEU per size (rows) and norm (columns), the mean
    over seeds with each seed's score in brackets (the preset's own seed first, then ``--seed``
    values ascending), and each norm's mean minus LN's at the same size."""
    from powernorm_fairseq.analysis.plots import NORM_LABELS, sweep_scores

    scores = sweep_scores(records)
    norms = list(scores)
    sizes = sorted({n for pts in scores.values() for n in pts})
    mean = {(norm, n): sum(b) / len(b) for norm, pts in scores.items() for n, b in pts.items()}
    head = "| N (tokens per statistics batch) | " + " | ".join(
        NORM_LABELS.get(n, n) for n in norms) + " |"
    rule = "|---|" + "---|" * len(norms)

    def cell(norm, n):
        runs = scores[norm].get(n)
        if not runs:
            return "-"
        if len(runs) == 1:
            return f"{runs[0]:.2f}"
        return f"{mean[(norm, n)]:.2f} ({' / '.join(f'{b:.2f}' for b in runs)})"

    lines = [head, rule] + [f"| {s} | " + " | ".join(cell(n, s) for n in norms) + " |"
                            for s in sizes]
    if "layer" in norms and len(norms) > 1:
        others = [n for n in norms if n != "layer"]
        lines += ["", "| N | " + " | ".join(f"{NORM_LABELS.get(n, n)} - LN" for n in others)
                  + " |", "|---|" + "---|" * len(others)]
        for s in sizes:
            diffs = [f"{mean[(n, s)] - mean[('layer', s)]:+.2f}"
                     if (n, s) in mean and ("layer", s) in mean else "-" for n in others]
            lines.append(f"| {s} | " + " | ".join(diffs) + " |")
    return "\n".join(lines)
