"""Training speed of the same transformer with LayerNorm and with PowerNorm, through fairseq-train.

For each model size, runs ``fairseq-train`` on one synthetic parallel corpus with LN and with each
norm configuration of ``--norms`` (default: PN, the plugin's default, released-code variant, and
PN-paper, Algorithm 2; any ``configs/norm/<short>.yaml``), each in encoder and decoder,
interleaved (LN, PN, PN-paper, LN, ...), and measures the target words per second of the updates
after the first ``--warmup`` (allocator and thread-pool warm-up) two ways:

- ``wps`` (wall clock): fairseq's own per-update ``wps`` (``--log-interval 1``), combined as
  sum_i wpb_i / sum_i (wpb_i / wps_i) (total words / total time);
- ``cpu_wps`` (CPU time): the same words divided by the CPU seconds (user + system) of the run
  minus those of a run that stops after the warm-up updates (same seed, same batches), so start-up
  cancels. On a machine shared with other jobs the wall clock measures the contention as much as
  the model; CPU time does not (it still includes cache and memory-bandwidth effects).

The table reports the median over the runs of each norm and its ratio to LN.

    python benchmarks/train_speed.py --out results/train_speed.json

Keep OMP_NUM_THREADS fixed (1 on a shared machine): the ratio is only meaningful between runs of
one invocation.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import shlex
import statistics
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from powernorm_fairseq import synthetic
from powernorm_fairseq.pipeline.common import (
    PLUGIN_DIR,
    atomic_write_json,
    git_commit,
    hardware,
    log,
    python_module_cmd,
    run_cmd,
)
from powernorm_fairseq.pipeline.train import norm_flags
from powernorm_fairseq.presets import norm_config
from powernorm_fairseq.presets import norm_configs as preset_norm_configs
from powernorm_fairseq.quickstart import DEFAULT_ARCH as QUICKSTART_ARCH

SIZES = {"multi30k": "transformer_pn_multi30k", "iwslt": "transformer_pn_iwslt_de_en",
         "quickstart": QUICKSTART_ARCH}
#: the norm configurations measured by default, beside LN: PN (the released code's variant,
#: GroupScaling pre-scaling) and PN-paper (Algorithm 2)
DEFAULT_NORMS = ("pn", "pnpaper")


#: the normalization sites of the plugin's transformer_pn
SITES = ("encoder", "decoder")


def norm_flag_sets(shorts: Sequence[str], sites: Sequence[str] = SITES) -> dict[str, list[str]]:
    """``{label: fairseq flags}`` of LN and of each norm configuration ``shorts`` (configs/norm/),
    at the normalization ``sites`` of the plugin's transformer_pn (default: every site, encoder
    and decoder; the released setup and the translation presets put the norm in the encoder only)."""
    return {norm_config(short).short_label: norm_flags(norm_config(short), tuple(sites))
            for short in ("ln", *(s for s in shorts if s != "ln"))}


NORM_FLAGS = norm_flag_sets(DEFAULT_NORMS)
_TRAIN_INNER = re.compile(r"\| train_inner \| (\{.*\})\s*$")


def make_corpus(
    workdir: Path, n_train: int, n_test: int, n_valid: int | None = None, seed: int = 1
) -> Path:
    """Write the plugin's synthetic parallel corpus (:mod:`powernorm_fairseq.synthetic`,
    3-25 tokens per sentence, like Multi30k; ``n_valid`` defaults to ``n_test``) and binarize
    it with a joined dictionary; returns the data-bin dir. For speed only the token counts
    matter."""
    raw = workdir / "raw"
    n_valid = n_test if n_valid is None else n_valid
    synthetic.generate(raw, seed=seed, n_train=n_train, n_valid=n_valid, n_test=n_test)
    data_bin = workdir / "data-bin"
    run_cmd(
        python_module_cmd("fairseq_cli.preprocess")
        + ["--source-lang", "src", "--target-lang", "tgt", "--joined-dictionary"]
        + ["--trainpref", str(raw / "train"), "--validpref", str(raw / "valid")]
        + ["--testpref", str(raw / "test"), "--destdir", str(data_bin), "--workers", "1"]
    )
    return data_bin


def train_cmd(
    data_bin: Path,
    arch: str,
    norm_flags: Sequence[str],
    max_update: int,
    max_tokens: int,
    save_dir: Path | None,
    extra: Sequence[str] = (),
) -> list[str]:
    """fairseq-train at the paper's IWSLT14 optimisation settings, without validation;
    ``extra`` is appended to the command line."""
    cmd = python_module_cmd("fairseq_cli.train") + [
        str(data_bin), "--user-dir", str(PLUGIN_DIR), "--task", "translation",
        "--arch", arch, *norm_flags, "--share-all-embeddings",
        "--optimizer", "adam", "--adam-betas", "(0.9, 0.98)", "--lr", "0.0015",
        "--lr-scheduler", "inverse_sqrt", "--warmup-updates", "8000", "--warmup-init-lr", "1e-7",
        "--dropout", "0.3", "--weight-decay", "0.0001",
        "--criterion", "label_smoothed_cross_entropy", "--label-smoothing", "0.1",
        "--max-tokens", str(max_tokens), "--max-update", str(max_update), "--seed", "1",
        "--num-workers", "0", "--disable-validation", "--log-format", "json", "--log-interval", "1",
        *extra,
    ]  # fmt: skip
    if save_dir is None:
        return cmd + ["--no-save"]
    return cmd + ["--save-dir", str(save_dir), "--no-epoch-checkpoints"]


def words_per_second(log_text: str, warmup: int) -> tuple[float, float, int]:
    """Total words / total time over the logged updates after the first ``warmup``.

    Returns (wps, words, number of updates measured)."""
    words = seconds = 0.0
    measured = 0
    for line in log_text.splitlines():
        match = _TRAIN_INNER.search(line)
        if not match:
            continue
        stats = json.loads(match.group(1))
        if int(stats["num_updates"]) <= warmup:
            continue
        wpb, wps = float(stats["wpb"]), float(stats["wps"])
        words += wpb
        seconds += wpb / wps
        measured += 1
    if measured == 0:
        raise SystemExit(
            f"no train_inner log line after update {warmup}: did fairseq-train run more updates "
            "than --warmup (check --updates)?"
        )
    return words / seconds, words, measured


def cpu_seconds_of(cmd: list[str], log_file: Path) -> tuple[str, float]:
    """Run ``cmd`` (see ``run_cmd``); return its output and the CPU seconds (user + system) that
    it and its children used."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    out = run_cmd(cmd, log_file=log_file)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return out, (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--sizes", nargs="+", choices=sorted(SIZES), default=["multi30k", "iwslt"])
    p.add_argument("--updates", type=int, default=30, help="measured updates per run (30)")
    p.add_argument("--warmup", type=int, default=5, help="updates skipped per run, >= 1 (5)")
    p.add_argument("--repeats", type=int, default=2, help="runs per norm, interleaved (2)")
    p.add_argument("--max-tokens", type=int, default=2048, help="tokens per batch (2048)")
    p.add_argument("--train-sentences", type=int, default=6000)
    p.add_argument("--norms", nargs="+", default=list(DEFAULT_NORMS), metavar="SHORT",
                   help="norm configurations measured beside LN (configs/norm/<short>.yaml: "
                   f"{', '.join(list(preset_norm_configs()))}; default: {' '.join(DEFAULT_NORMS)})")
    p.add_argument("--pn-args", default="", help="extra fairseq options of the runs other than LN, "
                   "e.g. '--pn-variant paper' (default: each configuration's own)")  # fmt: skip
    p.add_argument("--workdir", type=Path, help="corpus and logs (default: a temporary dir)")
    p.add_argument("--out", type=Path, help="write the results as JSON here")
    args = p.parse_args(argv)
    if min(args.updates, args.warmup, args.repeats) < 1:
        p.error("--updates, --warmup and --repeats must be >= 1")
    unknown = sorted(set(args.norms) - set(list(preset_norm_configs())))
    if unknown:
        p.error(f"--norms: no norm configuration {unknown}; choose from {', '.join(list(preset_norm_configs()))}")
    return args


def measure_size(args: argparse.Namespace, data_bin: Path, workdir: Path, size: str) -> dict:
    """Interleaved runs of LN and the ``--norms`` at one model size; medians and ratios to LN."""
    flag_sets = norm_flag_sets(args.norms)

    def train(norm: str, max_update: int, name: str) -> tuple[str, float]:
        extra = shlex.split(args.pn_args) if norm != "LN" else []
        cmd = train_cmd(data_bin, SIZES[size], flag_sets[norm], max_update, args.max_tokens, None,
                        extra)
        return cpu_seconds_of(cmd, workdir / f"train_{size}_{norm}_{name}.log")

    # CPU seconds of start-up plus the warm-up updates, subtracted from every run
    startup = {norm: train(norm, args.warmup, "startup")[1] for norm in flag_sets}
    runs: dict[str, dict[str, list[float]]] = {
        norm: {"wps": [], "cpu_wps": []} for norm in flag_sets
    }
    for rep in range(args.repeats):
        for norm in flag_sets:
            out, cpu = train(norm, args.warmup + args.updates, str(rep))
            wps, words, measured = words_per_second(out, args.warmup)
            cpu_wps = words / (cpu - startup[norm])
            runs[norm]["wps"].append(wps)
            runs[norm]["cpu_wps"].append(cpu_wps)
            log(f"{size} {norm} run {rep}: {wps:.1f} wps, {cpu_wps:.1f} words per CPU second "
                f"over {measured} updates")  # fmt: skip
    row = {"size": size, "arch": SIZES[size], "startup_cpu_s": startup, "runs": runs}
    for metric in ("wps", "cpu_wps"):
        ln = statistics.median(runs["LN"][metric])
        row[f"{metric}_LN"] = ln
        for norm in [n for n in flag_sets if n != "LN"]:
            pn = statistics.median(runs[norm][metric])
            # "<metric>_ratio" (no suffix) is the default PN's, as in earlier records
            suffix = "" if norm == "PN" else f"_{norm}"
            row.update({f"{metric}_{norm}": pn, f"{metric}_ratio{suffix}": pn / ln})
    return row


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    commit = git_commit()  # the code this process runs, whatever HEAD is by the end
    with tempfile.TemporaryDirectory(prefix="train_speed_") as tmp:
        workdir = args.workdir or Path(tmp)
        data_bin = make_corpus(workdir, args.train_sentences, 200)
        load_before = os.getloadavg()
        rows = [measure_size(args, data_bin, workdir, size) for size in args.sizes]
    result = {
        "benchmark": "train_speed",
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "rows": rows,
        "pn_flags": {n: flags + shlex.split(args.pn_args)
                     for n, flags in norm_flag_sets(args.norms).items() if n != "LN"},
        "loadavg_before_after": [load_before, os.getloadavg()],
        "commit": commit,
        "hardware": hardware(),
        "argv": sys.argv,
    }
    print(f"{'size':<10} {'metric':<8} {'norm':<9} {'words/s':>9} {'x LN':>7}")
    for r in rows:
        for metric in ("wps", "cpu_wps"):
            print(f"{r['size']:<10} {metric:<8} {'LN':<9} {r[f'{metric}_LN']:>9.1f} {1:>7.3f}")
            for norm in [k[len(metric) + 1:] for k in r if k.startswith(f"{metric}_")
                         and "ratio" not in k and k != f"{metric}_LN"]:
                pn = r[f"{metric}_{norm}"]
                print(f"{r['size']:<10} {metric:<8} {norm:<9} {pn:>9.1f} "
                      f"{pn / r[f'{metric}_LN']:>7.3f}")  # fmt: skip
    if args.out:
        atomic_write_json(args.out, result)
    return result


if __name__ == "__main__":
    main()
