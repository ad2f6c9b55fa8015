"""Quickstart: LN vs PN on a synthetic translation task in a few minutes on a laptop CPU.

``python -m powernorm_fairseq.quickstart`` (or ``powernorm-quickstart``) runs, with no download:

1. prepare: generate the synthetic corpus (:mod:`powernorm_fairseq.synthetic`), tokenize, BPE and
   binarize it with the same code as ``scripts/prepare_*.sh``;
2. train a tiny pre-norm transformer per normalization (LN and PN; ``--all-norms`` adds BN and
   PN-V) with ``scripts/train.sh``'s launcher; as in the paper's released setup the chosen norm
   replaces LayerNorm in the encoder, the decoder keeps LayerNorm;
3. average the last epoch checkpoints (``scripts/average_checkpoints.py``);
4. evaluate BLEU on the test set (``scripts/evaluate_bleu.sh``: tokenized and detokenized);

and prints a table of BLEU, training time and words per second. Outputs go to ``--out``
(default ``quickstart_out/``); rerunning skips finished steps and resumes an interrupted training.
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from pathlib import Path

from powernorm_fairseq.pipeline import prepare, runner
from powernorm_fairseq.pipeline.common import Steps, atomic_write_json, atomic_write_text, log
from powernorm_fairseq.presets import norm_configs

# --all-norms: the paper's Table 1 rows (configs/norm/), PN in its reference variant
ALL_NORMS = ["ln", "bn", "pnv", "pn"]

#: the quickstart's model (2+2 layers, d 64); benchmarks/train_speed.py measures it as "quickstart"
DEFAULT_ARCH = "transformer_pn_tiny"

# Sizes: the default reaches ~74 BLEU in 588 updates (~2 minutes of training per norm on one busy
# CPU thread, ~5 minutes for LN + PN in all); --tiny is a smoke test (BLEU near 0, ~1 minute).
SIZES = {
    "default": {"train_pairs": 4000, "max_epoch": 6, "average_last": 3, "warmup_updates": 150,
                "max_tokens": 1024},
    "tiny": {"train_pairs": 600, "max_epoch": 2, "average_last": 2, "warmup_updates": 10,
             "max_tokens": 1024},
}

_TRAIN_EPOCH = re.compile(r"\| train \| epoch (\d+) \| loss ([\d.]+) .*?\| wps ([\d.]+) .*?"
                          r"\| num_updates (\d+)")
_VALID_EPOCH = re.compile(r"\| valid \| epoch (\d+) \| valid on 'valid' subset \| loss ([\d.]+)")
_DONE = re.compile(r"done training in ([\d.]+) seconds")


def train_flags(arch: str, size: dict, seed: int) -> list[str]:
    """fairseq-train flags of the quickstart (inverse-sqrt Adam as the paper, scaled down)."""
    flags = ["--arch", arch, "--share-all-embeddings", "--optimizer", "adam",
             "--adam-betas", "(0.9, 0.98)", "--lr", "0.003", "--lr-scheduler", "inverse_sqrt",
             "--warmup-updates", str(size["warmup_updates"]), "--warmup-init-lr", "1e-07",
             "--dropout", "0.1", "--weight-decay", "0.0001",
             "--criterion", "label_smoothed_cross_entropy", "--label-smoothing", "0.1",
             "--max-tokens", str(size["max_tokens"]), "--max-epoch", str(size["max_epoch"]),
             "--keep-last-epochs", str(size["average_last"]), "--no-progress-bar",
             "--log-interval", "1000", "--num-workers", "0", "--seed", str(seed)]
    if arch.startswith("transformer_pn"):
        # The released code ties the PN warmup to the LR warmup; we keep that choice explicit.
        flags += ["--pn-warmup-updates", str(size["warmup_updates"])]
    return flags


class EpochPrinter:
    """Condense fairseq's log to one line per epoch: train loss, valid loss, words per second."""

    def __init__(self, label: str, max_epoch: int):
        self.label, self.max_epoch, self.valid = label, max_epoch, {}

    def __call__(self, line: str) -> None:
        if m := _VALID_EPOCH.search(line):
            self.valid[int(m.group(1))] = m.group(2)
        elif m := _TRAIN_EPOCH.search(line):
            epoch = int(m.group(1))
            log(f"[{self.label}] epoch {epoch}/{self.max_epoch}: train loss {m.group(2)}, "
                f"valid loss {self.valid.get(epoch, '?')}, {float(m.group(3)):.0f} tok/s, "
                f"{m.group(4)} updates")
        elif "Traceback" in line or "Error" in line:
            log(f"[{self.label}] {line}")


def _train_stats(log_path: Path) -> dict:
    """Training time and speed from fairseq's log (the last run, i.e. after any resume)."""
    text = log_path.read_text(encoding="utf-8")
    epochs = _TRAIN_EPOCH.findall(text)
    done = _DONE.findall(text)
    return {"train_seconds": float(done[-1]) if done else None,
            "words_per_second": round(sum(float(e[2]) for e in epochs) / len(epochs)) if epochs else None,
            "num_updates": int(epochs[-1][3]) if epochs else None}


def run_norm(norm: str, args, size: dict, data_dir: Path) -> dict:
    run_dir = Path(args.out) / "runs" / norm
    save_dir = run_dir / "checkpoints"
    steps = Steps(run_dir)
    label = norm_configs()[norm].short_label

    def do_train():
        t0 = time.time()
        runner.train(runner.train_argv("flags", norm, data_dir / "data-bin", save_dir,
                                       train_flags(args.arch, size, args.seed), cpu=True),
                     echo=EpochPrinter(label, size["max_epoch"]))
        return {**_train_stats(save_dir / "train.log"), "wall_seconds": round(time.time() - t0, 1)}

    stats = steps.run("train", do_train, key={"arch": args.arch, "seed": args.seed, **size})
    avg = save_dir / "checkpoint_avg.pt"
    steps.run("average", lambda: runner.average(save_dir, size["average_last"], "epoch", avg), [avg])
    record_path = run_dir / "bleu.json"
    record = steps.run("evaluate", lambda: runner.evaluate(runner.evaluate_argv(
        "bleu", data_dir, avg, record_path,
        # targets have at most 25 words: cap the length so an untrained model stops early
        ["--recipe", "synthetic", "--max-len-a", "1.5", "--max-len-b", "10"])), [record_path])
    return {"norm": label, "bleu_tokenized": record["bleu_tokenized"]["score"],
            "sacrebleu_detok": record["bleu_detok"]["score"],
            "n_test_sentences": record["n_sentences_scored"], **stats}


def format_table(rows: list[dict]) -> str:
    head = ("| norm | BLEU (tok, lc) | sacreBLEU (detok) | train time (s) | words/s (fairseq wps) "
            "| updates |")
    lines = [head, "|" + "---|" * 6]
    for r in rows:
        lines.append(f"| {r['norm']} | {r['bleu_tokenized']:.2f} | {r['sacrebleu_detok']:.2f} | "
                     f"{r['train_seconds'] or 0:.0f} | {r['words_per_second'] or 0} | "
                     f"{r['num_updates']} |")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="powernorm-quickstart", description=__doc__.split("\n")[0])
    p.add_argument("--out", default="quickstart_out", help="output directory (default quickstart_out/)")
    p.add_argument("--tiny", action="store_true", help="a smoke-test size (~1 minute in all)")
    p.add_argument("--all-norms", action="store_true", help="also BN and PN-V")
    p.add_argument("--norms", nargs="+", choices=list(norm_configs()), help="explicit list of norms (configs/norm/)")
    p.add_argument("--arch", default=DEFAULT_ARCH, help=f"model architecture (default {DEFAULT_ARCH}: 2+2 layers, d 64)")
    p.add_argument("--seed", type=int, default=1, help="corpus and training seed")
    p.add_argument("--train-pairs", type=int, help="synthetic training pairs (default 4000; tiny 600)")
    p.add_argument("--epochs", type=int, help="training epochs (default 6; tiny 2)")
    return p


def main(argv=None) -> list[dict]:
    args = build_parser().parse_args(argv)
    size = dict(SIZES["tiny" if args.tiny else "default"])
    if args.train_pairs:
        size["train_pairs"] = args.train_pairs
    if args.epochs:
        size["max_epoch"] = args.epochs
        size["average_last"] = min(size["average_last"], args.epochs)
    norms = args.norms or (ALL_NORMS if args.all_norms else ["ln", "pn"])
    out = Path(args.out)
    t0 = time.time()
    data_dir = out / "data"
    prepare.main(["synthetic", "--out", str(data_dir), "--synthetic-train", str(size["train_pairs"]),
                  "--seed", str(args.seed), "--workers", "1"])
    rows = [run_norm(norm, args, size, data_dir) for norm in norms]
    table = format_table(rows)
    atomic_write_text(out / "results.md", table + "\n")
    atomic_write_json(out / "results.json", {"rows": rows, "size": size, "arch": args.arch,
                                             "seed": args.seed, "command": " ".join(sys.argv)})
    print(table, flush=True)
    log(f"quickstart finished in {time.time() - t0:.0f}s; results in {out / 'results.md'}")
    return rows


if __name__ == "__main__":
    main()
