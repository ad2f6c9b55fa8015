#!/usr/bin/env python
"""Statistics batch-size sweep (the paper's Fig. 5): BLEU vs tokens per norm-statistics batch.

Each norm is trained at every size N with the same effective batch (max_tokens = N, gradient
accumulation update_freq = N_eff / N), scored with fairseq-generate, and plotted. Finished points
(``OUT/points/<norm>_<N>.json``) are skipped on a rerun.

    # paper setting (IWSLT14 preset, 4K effective tokens, 512..4K per forward)
    python analysis/batch_size_sweep.py --experiment iwslt14 --data data/iwslt14/data-bin \\
        --sizes 512 1024 2048 4096 --out results/fig5
    # CPU scale: plain fairseq flags after --
    python analysis/batch_size_sweep.py --experiment flags --data data/multi30k/data-bin --cpu \\
        --sizes 128 256 512 1024 --out runs/fig5 -- --arch transformer_pn_tiny --max-update 300 ...
    # another seed into the same OUT; --plot-only then shows the mean over seeds and each seed
    python analysis/batch_size_sweep.py ... --seed 2
    # print the commands only; or plot what OUT/points holds (sweeps run in parallel over
    # disjoint --norms into one OUT)
    python analysis/batch_size_sweep.py ... --dry-run
    python analysis/batch_size_sweep.py --data DATA --out OUT --plot-only
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from powernorm_fairseq.analysis.sweep import NORM_ALIASES, run_sweep


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--experiment", default="flags",
                   help="an experiment (the preset <experiment>_<norm>; overrides after -- are "
                   "hydra key=value) or 'flags' (fairseq-train flags after --). Default: flags")
    p.add_argument("--data", required=True, help="fairseq data-bin directory")
    p.add_argument("--out", required=True, help="sweep directory: runs/, points/, sweep.json, figure")
    p.add_argument("--norms", nargs="+", default=["layer", "batch", "power_v", "power"],
                   choices=sorted(NORM_ALIASES), help="norms to sweep (default: all four)")
    p.add_argument("--sizes", nargs="+", type=int, default=[128, 256, 512, 1024],
                   help="tokens per forward call N (default: 128 256 512 1024, a CPU-sized "
                   "version of the paper's 512 1024 2048 4096)")
    p.add_argument("--effective-tokens", type=int,
                   help="tokens per update N_eff, fixed for all points (default: the largest size)")
    p.add_argument("--seed", type=int,
                   help="training seed of these points (common.seed / --seed); the points are then "
                   "named <norm>_<N>_s<seed>, so several seeds share one --out (--plot-only then "
                   "draws and tabulates all of them, averaged per point). Default: the preset's (or the flags') own seed, names <norm>_<N>")
    p.add_argument("--cpu", action="store_true", help="train and evaluate on CPU")
    p.add_argument("--checkpoint", default="checkpoint_last.pt",
                   help="checkpoint file of each run to score (default: checkpoint_last.pt)")
    p.add_argument("--eval-args", default="",
                   help="extra scoring flags, one string, e.g. '--beam 4 --lenpen 0.6' (default: the "
                   "corpus recipe of pipeline.evaluate for prepared data, else beam 5, lenpen 1.0)")
    p.add_argument("--plot", help="figure path (default: OUT/fig5_batch_size.png)")
    p.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    p.add_argument("--plot-only", action="store_true",
                   help="train nothing: plot the points already recorded in OUT/points (e.g. "
                   "after several sweeps over disjoint --norms ran in parallel into one OUT)")
    return p


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    train_args = []
    if "--" in argv:
        i = argv.index("--")
        argv, train_args = argv[:i], argv[i + 1:]
    parser = build_parser()
    args = parser.parse_args(argv)
    args.train_args, args.eval_args = train_args, args.eval_args.split()
    if args.plot_only:
        import json

        paths = sorted((Path(args.out) / "points").glob("*.json"))
        if not paths:
            parser.error(f"no recorded points in {Path(args.out) / 'points'}")
        records = [json.loads(p.read_text()) for p in paths]
        effective = {r.get("effective_tokens") for r in records}
        if len(effective) > 1:  # e.g. a sweep run with --sizes 512 alone defaults N_eff to 512
            parser.error(f"the points in {Path(args.out) / 'points'} have different effective "
                         f"batches {sorted(effective)}; Fig. 5 compares sizes at one N_eff")
        args.effective_tokens = effective.pop()
        args.sizes = sorted({r["stat_tokens"] for r in records})
        args.dry_run = False
    else:
        try:
            records = run_sweep(args)
        except ValueError as e:
            parser.error(str(e))
    if args.dry_run:
        return
    from powernorm_fairseq.analysis.plots import plot_sweep
    from powernorm_fairseq.analysis.sweep import sweep_table

    print(sweep_table(records))  # BLEU per point: the mean over seeds, each seed in brackets

    out = args.plot or str(Path(args.out) / "fig5_batch_size.png")
    plot_sweep(records, out, title=f"{args.experiment}: effective batch "
               f"{args.effective_tokens or max(args.sizes)} tokens")
    print(f"wrote {out}" + ("" if args.plot_only else f" and {Path(args.out) / 'sweep.json'}"))


if __name__ == "__main__":
    main()
