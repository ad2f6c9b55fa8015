"""Training speed of the same transformer with LayerNorm and with PowerNorm, through fairseq-train.

For each model size, runs ``fairseq-train`` on one synthetic parallel corpus with LN and with PN
(encoder and decoder), interleaved (LN, PN, LN, PN, ...), and reads fairseq's per-update
``wps`` (target words per second; ``--log-interval 1``). The first ``--warmup`` updates of a run
are skipped (allocator and thread-pool warm-up), the rest give

    wps(run) = sum_i wpb_i / sum_i (wpb_i / wps_i)      (total words / total time)

and the table reports the median over the runs of each norm and the ratio PN/LN.

    python benchmarks/train_speed.py --out results/train_speed.json

On CPU, keep OMP_NUM_THREADS fixed (and equal to what other jobs leave free): the ratio is only
meaningful between runs of one invocation on one otherwise idle machine.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

from powernorm_fairseq.pipeline.common import (
    PLUGIN_DIR,
    atomic_write_json,
    atomic_write_lines,
    git_commit,
    hardware,
    log,
    python_module_cmd,
    run_cmd,
)

SIZES = {"multi30k": "transformer_pn_multi30k", "iwslt": "transformer_pn_iwslt_de_en"}
# Norm of every normalization site (encoder and decoder) of the plugin's transformer_pn.
NORM_FLAGS = {
    "LN": ["--encoder-norm", "layer", "--decoder-norm", "layer"],
    "PN": ["--encoder-norm", "power", "--decoder-norm", "power"],
}
_TRAIN_INNER = re.compile(r"\| train_inner \| (\{.*\})\s*$")


def make_corpus(workdir: Path, n_train: int, n_test: int, seed: int = 1) -> Path:
    """Write a random parallel corpus (Zipf-distributed pseudo-words, 4-30 words per sentence,
    Multi30k-like lengths) and binarize it with a joined dictionary; returns the data-bin dir.

    The target is a fixed word-by-word mapping of the source, reversed, so the task is learnable;
    for speed only the token counts matter.
    """
    rng = random.Random(seed)
    vocab = [f"w{i}" for i in range(2000)]
    weights = [1.0 / (i + 1) for i in range(len(vocab))]
    mapping = dict(zip(vocab, rng.sample(vocab, len(vocab)), strict=True))
    raw = workdir / "raw"
    for split, n in (("train", n_train), ("valid", n_test), ("test", n_test)):
        src = [rng.choices(vocab, weights, k=rng.randint(4, 30)) for _ in range(n)]
        atomic_write_lines(raw / f"{split}.src", (" ".join(s) for s in src))
        atomic_write_lines(
            raw / f"{split}.tgt", (" ".join(mapping[w] for w in s[::-1]) for s in src)
        )
    data_bin = workdir / "data-bin"
    run_cmd(
        python_module_cmd("fairseq_cli.preprocess")
        + ["--source-lang", "src", "--target-lang", "tgt", "--joined-dictionary"]
        + ["--trainpref", str(raw / "train"), "--validpref", str(raw / "valid")]
        + ["--testpref", str(raw / "test"), "--destdir", str(data_bin), "--workers", "1"]
    )
    return data_bin


def train_cmd(
    data_bin: Path, arch: str, norm: str, max_update: int, max_tokens: int, save_dir: Path | None
) -> list[str]:
    """fairseq-train at the paper's IWSLT14 optimisation settings, without validation."""
    cmd = python_module_cmd("fairseq_cli.train") + [
        str(data_bin), "--user-dir", str(PLUGIN_DIR), "--task", "translation",
        "--arch", arch, *NORM_FLAGS[norm], "--share-all-embeddings",
        "--optimizer", "adam", "--adam-betas", "(0.9, 0.98)", "--lr", "0.0015",
        "--lr-scheduler", "inverse_sqrt", "--warmup-updates", "8000", "--warmup-init-lr", "1e-7",
        "--dropout", "0.3", "--weight-decay", "0.0001",
        "--criterion", "label_smoothed_cross_entropy", "--label-smoothing", "0.1",
        "--max-tokens", str(max_tokens), "--max-update", str(max_update), "--seed", "1",
        "--num-workers", "0", "--disable-validation", "--log-format", "json", "--log-interval", "1",
    ]  # fmt: skip
    if save_dir is None:
        return cmd + ["--no-save"]
    return cmd + ["--save-dir", str(save_dir), "--no-epoch-checkpoints"]


def words_per_second(log_text: str, warmup: int) -> tuple[float, int]:
    """Total words / total time over the logged updates after the first ``warmup``.

    Returns (wps, number of updates measured)."""
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
    return words / seconds, measured


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--sizes", nargs="+", choices=sorted(SIZES), default=["multi30k", "iwslt"])
    p.add_argument("--updates", type=int, default=30, help="measured updates per run (30)")
    p.add_argument("--warmup", type=int, default=5, help="updates skipped per run (5)")
    p.add_argument("--repeats", type=int, default=2, help="runs per norm, interleaved (2)")
    p.add_argument("--max-tokens", type=int, default=2048, help="tokens per batch (2048)")
    p.add_argument("--train-sentences", type=int, default=6000)
    p.add_argument("--workdir", type=Path, help="corpus and logs (default: a temporary dir)")
    p.add_argument("--out", type=Path, help="write the results as JSON here")
    args = p.parse_args(argv)
    if args.updates < 1 or args.warmup < 0 or args.repeats < 1:
        p.error("--updates and --repeats must be >= 1, --warmup >= 0")
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="train_speed_") as tmp:
        workdir = args.workdir or Path(tmp)
        data_bin = make_corpus(workdir, args.train_sentences, 200)
        rows = []
        for size in args.sizes:
            runs: dict[str, list[float]] = {norm: [] for norm in NORM_FLAGS}
            for rep in range(args.repeats):
                for norm in NORM_FLAGS:
                    cmd = train_cmd(
                        data_bin, SIZES[size], norm, args.warmup + args.updates,
                        args.max_tokens, None,
                    )  # fmt: skip
                    t0 = time.time()
                    out = run_cmd(cmd, log_file=workdir / f"train_{size}_{norm}_{rep}.log")
                    wps, measured = words_per_second(out, args.warmup)
                    log(f"{size} {norm} run {rep}: {wps:.1f} wps over {measured} updates "
                        f"({time.time() - t0:.0f}s)")  # fmt: skip
                    runs[norm].append(wps)
            ln, pn = statistics.median(runs["LN"]), statistics.median(runs["PN"])
            rows.append(
                {"size": size, "arch": SIZES[size], "wps_LN": ln, "wps_PN": pn,
                 "ratio_PN_LN": pn / ln, "runs": runs}
            )  # fmt: skip
    result = {
        "benchmark": "train_speed",
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "rows": rows,
        "commit": git_commit(),
        "hardware": hardware(),
        "argv": sys.argv,
    }
    print(f"{'size':<10} {'arch':<28} {'LN wps':>10} {'PN wps':>10} {'PN/LN':>7}")
    for r in rows:
        print(f"{r['size']:<10} {r['arch']:<28} {r['wps_LN']:>10.1f} {r['wps_PN']:>10.1f} "
              f"{r['ratio_PN_LN']:>7.3f}")  # fmt: skip
    if args.out:
        atomic_write_json(args.out, result)
    return result


if __name__ == "__main__":
    main()
