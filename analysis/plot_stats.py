#!/usr/bin/env python
"""Box plots of tracked norm statistics per 20% of training (the paper's Figs. 2-4).

    python analysis/plot_stats.py runs/bn/stats.csv runs/pnv/stats.csv --out results/fig4.png

Each CSV comes from a training run with ``--track-norm-stats FILE`` (one tracked layer is plotted
per CSV; ``--layer`` picks it). Left: forward distance batch vs running statistic; right: the
backward gradient term. By default each run shows its own norm's statistic (sigma^2 for BN,
psi^2 for PN-V/PN) as in Fig. 4; ``--forward mu_dist --backward g_mu`` gives Figs. 2-3's mu panels.
"""

from __future__ import annotations

import argparse

from powernorm_fairseq.analysis.plots import NORM_LABELS, StatsRun, plot_stat_boxes, read_stats
from powernorm_fairseq.analysis.tracking import COLUMNS


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("csv", nargs="+", help="tracking CSV files (one curve each)")
    p.add_argument("--out", required=True, help="output image (.png, .pdf, ...)")
    p.add_argument("--labels", nargs="+", help="curve labels (default: BN / PN-V / ... from the norm column)")
    p.add_argument("--layer", help="tracked layer to plot (default: the first one in each CSV)")
    stat_cols = [c for c in COLUMNS if c not in ("step", "micro", "layer", "norm", "tokens", "d")]
    p.add_argument("--forward", choices=stat_cols, help="left-panel column (default: per norm)")
    p.add_argument("--backward", choices=stat_cols, help="right-panel column (default: per norm)")
    p.add_argument("--buckets", type=int, default=5, help="training-progress buckets (default 5 = 20%%)")
    p.add_argument("--total-steps", type=int, help="steps of the full run (default: last logged step + 1)")
    p.add_argument("--title")
    args = p.parse_args(argv)
    if args.labels and len(args.labels) != len(args.csv):
        p.error(f"--labels needs one label per CSV ({len(args.csv)}), got {len(args.labels)}")
    if args.buckets < 1:
        p.error("--buckets must be >= 1")
    runs = []
    for i, path in enumerate(args.csv):
        try:
            rows = read_stats(path, args.layer)
        except (OSError, ValueError) as e:
            raise SystemExit(f"plot_stats: {e}") from e
        norm = rows[0]["norm"]
        label = args.labels[i] if args.labels else NORM_LABELS.get(norm, norm)
        runs.append(StatsRun(label, norm, rows))
    plot_stat_boxes(runs, args.out, args.forward, args.backward, args.buckets, args.total_steps, args.title)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
