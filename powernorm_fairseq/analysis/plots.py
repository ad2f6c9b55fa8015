"""Figures of the paper's analyses: statistics box plots (Figs. 2-4), BLEU vs statistics batch size
(Fig. 5), embedding spectra (Fig. 6).

Matplotlib only, through the object-oriented ``Figure`` API (no pyplot, so no global backend or
figure state; PNGs are rendered by the Agg canvas). Figures are written atomically.
"""

from __future__ import annotations

import csv
import math
import os
import statistics
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from matplotlib.figure import Figure
from matplotlib.patches import Patch

from powernorm_fairseq.presets import ordered_norm_configs

__all__ = [
    "BACKWARD_COLUMN",
    "FORWARD_COLUMN",
    "NORM_LABELS",
    "StatsRun",
    "bucket_summary",
    "bucket_values",
    "plot_spectra",
    "plot_stat_boxes",
    "plot_sweep",
    "read_stats",
    "save_figure",
    "stat_column",
    "sweep_scores",
]

# label of a registry name (what the statistics and sweep records name a norm by), in the paper's
# order; PN's variants share the name ``power``, which takes the label of the first (``PN``)
NORM_LABELS: dict[str, str] = {}
for _spec in ordered_norm_configs():
    NORM_LABELS.setdefault(_spec.norm, _spec.short_label)
del _spec
# Fig. 4 compares each norm's own statistic: sigma^2 for BN (and LN's shadow), psi^2 for PN-V/PN.
FORWARD_COLUMN = {"layer": "var_dist", "batch": "var_dist", "power_v": "psi2_dist", "power": "psi2_dist"}
BACKWARD_COLUMN = {"layer": "g_var", "batch": "g_var", "power_v": "g_psi2", "power": "g_psi2"}
COLUMN_LABELS = {
    "mu_dist": r"$\frac{1}{d}\|\mu_B-\mu\|$",
    "var_dist": r"$\frac{1}{d}\|\sigma_B^2-\sigma^2\|$",
    "psi2_dist": r"$\frac{1}{d}\|\psi_B^2-\psi^2\|$",
    "g_mu": r"$\frac{1}{d}\|g_{\mu}\|$",
    "g_var": r"$\frac{1}{d}\|g_{\sigma^2}\|$",
    "g_psi2": r"$\frac{1}{d}\|g_{\psi^2}\|$",
    "gamma_max": r"$\max_j \Gamma_t$",
    "gamma_mean": r"mean$_j\,\Gamma_t$",
    "lambda": r"$\frac{1}{d}\|\Lambda_t\|$",
    "nu": r"$\frac{1}{d}\|\nu\|$",
}
_COLORS = ("#4c72b0", "#dd8452", "#55a868", "#c44e52", "#8172b3", "#937860")


def save_figure(fig: Figure, path: str | os.PathLike, dpi: int = 150) -> None:
    """Save ``fig`` to ``path`` atomically (temp file beside it, then ``os.replace``)."""
    path = os.fspath(path)
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    fmt = os.path.splitext(path)[1].lstrip(".").lower() or "png"
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=parent)
    os.close(fd)
    try:
        fig.savefig(tmp, format=fmt, dpi=dpi, bbox_inches="tight")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


# --------------------------------------------------------------------------- Figs. 2-4
@dataclass
class StatsRun:
    """The rows of one tracked layer of one training run (see :mod:`.tracking` for columns)."""

    label: str
    norm: str
    rows: list[dict]

    def total_steps(self) -> int:
        return max(int(r["step"]) for r in self.rows) + 1


def read_stats(path: str | os.PathLike, layer: str | None = None) -> list[dict]:
    """Rows of a tracking CSV for one layer (default: the first layer in the file).

    Numeric cells become floats (empty cells NaN); ``layer`` and ``norm`` stay strings.
    """
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        raise ValueError(f"{path}: no rows (was the run long enough to flush?)")
    layers = list(dict.fromkeys(r["layer"] for r in rows))
    layer = layer or layers[0]
    if layer not in layers:
        raise ValueError(f"{path}: no rows for layer {layer!r}; layers in the file: {layers}")
    out = []
    for r in rows:
        if r["layer"] != layer:
            continue
        out.append({k: (v if k in ("layer", "norm") else float(v) if v != "" else math.nan)
                    for k, v in r.items()})
    return out


def bucket_values(
    rows: Iterable[dict], column: str, total_steps: int, n_buckets: int = 5
) -> list[list[float]]:
    """Values of ``column`` split by training progress: bucket k holds the rows with
    ``k/n <= step/total_steps < (k+1)/n`` (the last bucket also takes steps beyond ``total_steps``).
    NaN values are dropped."""
    buckets: list[list[float]] = [[] for _ in range(n_buckets)]
    for r in rows:
        v = r[column]
        if math.isnan(v):
            continue
        k = min(n_buckets - 1, int(r["step"] * n_buckets / total_steps))
        buckets[k].append(v)
    return buckets


def stat_column(norm: str, side: str) -> str:
    """The norm's own statistic of Fig. 4: its ``side`` ("forward" or "backward") column.

    ``norm`` is a registry name (the ``norm`` column of a tracking CSV, e.g. ``batch``); any other
    name raises ``ValueError``: a silent default would plot another norm's statistic."""
    table = FORWARD_COLUMN if side == "forward" else BACKWARD_COLUMN
    if norm not in table:
        raise ValueError(f"no Fig. 4 statistic for norm {norm!r}: expected a registry name "
                         f"({', '.join(table)}), as in a tracking CSV's norm column")
    return table[norm]


def bucket_summary(
    rows: Iterable[dict], column: str, total_steps: int, n_buckets: int = 5
) -> list[tuple[float, float] | None]:
    """(median, max) of ``column`` in each progress bucket of :func:`bucket_values` (None where a
    bucket is empty): the numbers a reading of a Figs. 2-4 box plot quotes."""
    return [(statistics.median(b), max(b)) if b else None
            for b in bucket_values(rows, column, total_steps, n_buckets)]


def _grouped_boxes(ax, groups: Sequence[tuple[str, list[list[float]]]], n_buckets: int) -> None:
    """Box plots of several runs side by side in each progress bucket."""
    n_runs = len(groups)
    for r, (_, buckets) in enumerate(groups):
        pos = [k * (n_runs + 1) + r for k in range(n_buckets) if buckets[k]]
        data = [b for b in buckets if b]
        if not data:
            continue
        color = _COLORS[r % len(_COLORS)]
        ax.boxplot(
            data, positions=pos, widths=0.8, patch_artist=True, manage_ticks=False,
            boxprops={"facecolor": color, "alpha": 0.8}, medianprops={"color": "black"},
            flierprops={"marker": ".", "markersize": 3, "markeredgecolor": color},
        )  # fmt: skip
    centers = [k * (n_runs + 1) + (n_runs - 1) / 2 for k in range(n_buckets)]
    ax.set_xticks(centers, [f"{100 * (k + 1) // n_buckets}%" for k in range(n_buckets)])
    ax.set_xlim(-1, n_buckets * (n_runs + 1) - 1)
    ax.set_xlabel("Percent of training")
    ax.grid(axis="y", alpha=0.3)


def plot_stat_boxes(
    runs: Sequence[StatsRun],
    out: str | os.PathLike,
    forward_column: str | None = None,
    backward_column: str | None = None,
    n_buckets: int = 5,
    total_steps: int | None = None,
    title: str | None = None,
) -> None:
    """Figs. 2-4: box plots per training-progress bucket, forward distance left, backward term right.

    Args:
        runs: one entry per curve (e.g. BN and PN-V), each from :func:`read_stats`.
        out: image path (format from the suffix, e.g. ``.png``).
        forward_column, backward_column: CSV columns to plot; None picks per run the norm's own
            statistic (:data:`FORWARD_COLUMN`, :data:`BACKWARD_COLUMN`: sigma^2 for BN/LN, psi^2
            for PN-V/PN), as in Fig. 4.
        n_buckets: progress buckets (5 = 20% steps).
        total_steps: steps of a full run; default each run's last step + 1.
        title: figure title.
    """
    if not runs:
        raise ValueError("no runs to plot")
    fig = Figure(figsize=(11, 4))
    axes = fig.subplots(1, 2)
    for ax, fixed, side in ((axes[0], forward_column, "forward"), (axes[1], backward_column, "backward")):
        groups, used = [], []
        for run in runs:
            col = fixed or stat_column(run.norm, side)
            total = total_steps or run.total_steps()
            groups.append((run.label, bucket_values(run.rows, col, total, n_buckets)))
            used.append(col)
        _grouped_boxes(ax, groups, n_buckets)
        labels = list(dict.fromkeys(COLUMN_LABELS.get(c, c) for c in used))
        ax.set_ylabel(" / ".join(labels))
    handles = [Patch(facecolor=_COLORS[r % len(_COLORS)], alpha=0.8, label=run.label)
               for r, run in enumerate(runs)]
    axes[0].legend(handles=handles, loc="upper left")
    if title:
        fig.suptitle(title)
    save_figure(fig, out)


# ------------------------------------------------------------------------------ Fig. 5
def sweep_scores(records: Iterable[Mapping]) -> dict[str, dict[int, list[float]]]:
    """BLEU of the finished sweep points: ``{norm: {N: [bleu per seed]}}``, norms in the paper's
    order (LN, BN, PN-V, PN, then others by name), sizes ascending, and each point's seeds with
    the preset's own seed (a record without ``seed``) first, then ascending. Records without
    BLEU are skipped; none left raises ``ValueError``."""
    runs: dict[str, dict[int, list[tuple[int, float]]]] = {}
    for rec in records:
        if rec.get("bleu") is not None:
            seed = -1 if rec.get("seed") is None else int(rec["seed"])
            runs.setdefault(rec["norm"], {}).setdefault(int(rec["stat_tokens"]), []).append(
                (seed, float(rec["bleu"])))
    if not runs:
        raise ValueError("no finished sweep points with a BLEU score")
    order = list(NORM_LABELS)
    return {norm: {n: [b for _, b in sorted(runs[norm][n])] for n in sorted(runs[norm])}
            for norm in sorted(runs, key=lambda m: (order.index(m) if m in order else len(order), m))}


def plot_sweep(records: Iterable[Mapping], out: str | os.PathLike, title: str | None = None) -> None:
    """Fig. 5: BLEU against the number of tokens per statistics batch, one line per norm.

    Several records of one norm and size (different seeds) are drawn as the line through their
    mean, with each seed's score as a small open marker; the legend gives the seed count.

    Args:
        records: dicts with ``norm``, ``stat_tokens`` and ``bleu`` (records without BLEU are skipped).
        out: image path.
    """
    by_norm = sweep_scores(records)
    fig = Figure(figsize=(5.5, 4))
    ax = fig.subplots()
    sizes = sorted({n for pts in by_norm.values() for n in pts})
    for i, (norm, pts) in enumerate(by_norm.items()):  # the paper's order: fixed colors
        color = _COLORS[i % len(_COLORS)]
        ns = list(pts)
        runs = {len(pts[n]) for n in ns}
        label = NORM_LABELS.get(norm, norm)
        if runs != {1}:
            label += f" (mean of {'/'.join(map(str, sorted(runs)))} seeds)"
            for n in ns:
                ax.plot([n] * len(pts[n]), pts[n], linestyle="none", marker="o", markersize=4,
                        markerfacecolor="none", color=color, alpha=0.6)
        ax.plot(ns, [sum(pts[n]) / len(pts[n]) for n in ns], marker="o", color=color, label=label)
    ax.set_xscale("log", base=2)
    ax.set_xticks(sizes, [f"{n // 1024}K" if n % 1024 == 0 else str(n) for n in sizes])
    ax.set_xlabel("Tokens per statistics batch (effective batch fixed)")
    ax.set_ylabel("BLEU")
    ax.grid(alpha=0.3)
    ax.legend()
    if title:
        ax.set_title(title)
    save_figure(fig, out)


# ------------------------------------------------------------------------------ Fig. 6
def plot_spectra(
    spectra: Mapping[str, Sequence[float]], out: str | os.PathLike, logy: bool = False,
    title: str | None = None,
) -> None:
    """Fig. 6: normalized singular values (largest = 1) against their index, one curve per model."""
    if not spectra:
        raise ValueError("no spectra to plot")
    fig = Figure(figsize=(5.5, 4))
    ax = fig.subplots()
    for i, (label, values) in enumerate(spectra.items()):
        ax.plot(range(1, len(values) + 1), list(values), color=_COLORS[i % len(_COLORS)], label=label)
    if logy:
        ax.set_yscale("log")
    ax.set_xlabel("Index of singular value")
    ax.set_ylabel("Normalized singular value")
    ax.grid(alpha=0.3)
    ax.legend()
    if title:
        ax.set_title(title)
    save_figure(fig, out)
