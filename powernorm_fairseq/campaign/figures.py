"""The figures of the campaign tables: validation curves (mean over seeds, min-max band)."""

from __future__ import annotations

import statistics
from pathlib import Path

from powernorm_fairseq.campaign.view import ORDER, SHORT


def _finish_plot(fig, ax, drawn: bool, xlabel: str, title: str, out: Path, legend: int | None = 8) -> bool:
    """Label, save atomically and close a validation-loss figure; False (nothing saved) if empty."""
    import matplotlib.pyplot as plt

    if not drawn:
        plt.close(fig)
        return False
    ax.set_xlabel(xlabel)
    ax.set_ylabel("validation loss (base 2)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if legend:
        ax.legend(fontsize=legend)
    fig.tight_layout()
    _save_fig(fig, out)
    return True


def _save_fig(fig, out: Path) -> None:
    import matplotlib.pyplot as plt

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(out)


def plot_curves(runs: dict[str, list[dict]], out: Path, title: str) -> bool:
    """Validation loss per epoch: the mean over seeds, with the min-max band of the seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4))
    drawn = False
    for norm in ORDER:
        curves = [dict(r.get("valid_loss_by_epoch") or []) for r in runs.get(norm, [])]
        curves = [{int(e): v for e, v in c.items()} for c in curves if c]
        if not curves:
            continue
        epochs = sorted(set().union(*curves))
        pts = [(e, [c[e] for c in curves if e in c]) for e in epochs]
        xs = [e for e, _ in pts]
        ax.plot(xs, [statistics.mean(v) for _, v in pts], label=f"{SHORT[norm]} ({len(curves)} seeds)")
        ax.fill_between(xs, [min(v) for _, v in pts], [max(v) for _, v in pts], alpha=0.2)
        drawn = True
    return _finish_plot(fig, ax, drawn, "epoch", title, out)


def plot_pilot(runs: dict[str, list[dict]], out: Path, title: str) -> bool:
    """Validation loss against updates, one line per run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    drawn = False
    for norm in ORDER:
        for r in runs.get(norm, []):
            vl = r.get("valid_loss") or []
            if vl:
                ax.plot([u for u, _ in vl], [v for _, v in vl], marker="o", ms=3, label=f"{SHORT[norm]} s{r['seed']}")
                drawn = True
    return _finish_plot(fig, ax, drawn, "updates", title + " (pilot)", out, legend=7)

