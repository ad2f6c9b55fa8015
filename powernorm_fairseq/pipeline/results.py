"""Build the results tables and plots from the run records that ``scripts/reproduce.py`` writes.

Nothing here is typed by hand: every number comes from a record; the paper's numbers are in their
own, labelled columns (docs/SPEC.md sections 0 and 5). Rerun after any run finishes, from the project
directory (``--root`` names another; ``powernorm-results`` is the same command)::

    python scripts/make_results.py

Writes:

* ``results/table1_multi30k.md``, ``results/table2_ptb.md``: the converged campaign
  (``results/runs/<corpus>/``): each norm over seeds (mean +- sd) for the paper's protocol (the
  average of the last 5 epoch checkpoints), the best and the last checkpoint; each norm minus LN
  with its paired 95% interval over seeds, and the paired bootstrap p-values for BLEU; the
  validation curves (mean over seeds with the min-max band).
* ``results/budget/README.md`` and the budget arithmetic in ``results/README.md``: the sizing run
  (``results/budget/<corpus>/``).
* ``results/analysis.md`` (between its ``converged`` markers) and its ``*_converged`` figures:
  Figs. 2-4 and 6 from the converged records (:func:`build_analyses`).
* ``results/pilot/table*.md``: the earlier short fixed budgets (``results/pilot/runs/``).
* README section 5, between its ``results:begin``/``results:end`` markers.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
from pathlib import Path

from powernorm_fairseq.analysis.stats import paired_interval, verdict
from powernorm_fairseq.pipeline import reproduce
from powernorm_fairseq.pipeline.common import atomic_write_text
from powernorm_fairseq.presets import PAPER_NORMS, ordered_norm_configs

# every norm configuration's labels (configs/norm/<short>.yaml), the paper's first
LABELS = {c.short: c.label for c in ordered_norm_configs()}
SHORT = {c.short: c.short_label for c in ordered_norm_configs()}
ORDER = list(PAPER_NORMS)  # the converged campaign's tables
# the norms the paper's questions name
LN, BN, PNV, PN, PN_PAPER = PAPER_NORMS
# The paper's numbers (docs/SPEC.md section 0: confirmed by the paper's text), one pair per row in
# ORDER; the paper has no row of its Algorithm 2 (PN_PAPER). PN in the paper was trained with the
# released code, i.e. our "reference" variant.
PAPER_T1 = dict(zip((LN, BN, PNV, PN), ((35.5, 29.5), (34.4, 28.1), (35.4, 28.5), (35.9, 30.1)), strict=True))
PAPER_T2 = dict(zip((LN, BN, PNV, PN), ((53.2, 20.9), (60.7, 27.2), (55.3, 21.3), (47.6, 17.9)), strict=True))
EVALS = (("avg", "average of the last 5 epoch checkpoints (paper protocol)"),
         ("best", "best checkpoint (validation loss)"), ("last", "last checkpoint"))


def load(records: Path, root: Path, cap: int | None = None) -> dict[str, list[dict]]:
    """The records in ``records`` by norm, seeds ascending; ``_file`` is each one's path
    relative to the project directory ``root``. With ``cap``, each run as it stood at that epoch
    cap (``reproduce.at_cap``: a run reopened since by a raised cap is read from its ending at
    ``cap``; a run without one is left out). A run superseded for a retrain
    (``reproduce --supersede``) is read from its set-aside record until the retrain is done, so
    the tables never lose a finished run meanwhile; ``_retrain`` then says where the retrain is."""
    runs: dict[str, list[dict]] = {}
    for p in sorted(records.glob("*.json")):
        rec = reproduce.at_cap(json.loads(p.read_text()), cap)
        if rec is None:
            continue
        rec["_file"] = str(p.relative_to(root))
        runs.setdefault(rec["norm"], []).append(rec)
    for p in sorted((records / reproduce.SUPERSEDED).glob("*.json")):  # by stamp: the latest last
        old = json.loads(p.read_text())
        recs = runs.setdefault(old["norm"], [])
        now = next((r for r in recs if r["seed"] == old["seed"]), None)
        if now is not None and now.get("status") == "done":
            continue
        if now is not None:
            recs.remove(now)
        if old.get("norm_stats"):  # kept beside it, in the superseded folder
            old["norm_stats"] = f"{reproduce.SUPERSEDED}/{old['norm_stats']}"
        recs.append({**old, "_file": str(p.relative_to(root)),
                     "_retrain": (now or {}).get("_retrain") or (now or {}).get("status") or "to do"})
    for recs in runs.values():
        recs.sort(key=lambda r: r["seed"])
    return runs


def first_cap(corpus: str) -> int:
    """The epoch cap the corpus's tables read the runs at: its first (Multi30k: 30 epochs, where
    every run stopped before the cap was raised; ``reproduce.CORPORA``)."""
    spec = reproduce.CORPORA[corpus]
    return (*spec.earlier_caps, spec.max_epoch)[0]


def summary(values: list[float]) -> str:
    if not values:
        return "not run"
    if len(values) == 1:
        return f"{values[0]:.2f} (1 seed)"
    return (f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f} "
            f"({len(values)} seeds, range {min(values):.2f}-{max(values):.2f})")


def status_line(recs: list[dict]) -> str:
    return ", ".join(f"s{r['seed']}: {r.get('status')}"
                     + (f" ({r['progress']})" if r.get("status") == "unfinished" and r.get("progress") else "")
                     + (f" (superseded; its retrain: {r['_retrain']})" if r.get("_retrain") else "")
                     for r in recs) or "not run"


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


# ----------------------------------------------------------------------------------------------
# The converged campaign


def score(rec: dict, which: str, key: str) -> float | None:
    """``key`` (``bleu_tokenized``, ``bleu_detok``, ``ppl``) of evaluation ``which`` of a done run."""
    ev = (rec.get("evaluations") or {}).get(which)
    if rec.get("status") != "done" or not ev:
        return None
    return ev.get("value") if key == "ppl" else (ev.get(key) or {}).get("score")


def by_seed(recs: list[dict], which: str, key: str) -> dict[int, float]:
    return {r["seed"]: v for r in recs if (v := score(r, which, key)) is not None}


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


def differences(runs: dict[str, list[dict]], key: str, higher_better: bool) -> tuple[list[str], dict]:
    """Each norm minus LN, per evaluation, with the paired 95% interval and its verdict."""
    better = "higher BLEU is better" if higher_better else "lower perplexity is better"
    lines = [f"| norm - LN ({better}) | " + " | ".join(label for _, label in EVALS) + " |",
             "|---|" + "---|" * len(EVALS)]
    found = {}
    base = runs.get(LN, [])
    for norm in ORDER[1:]:
        cells = []
        for which, _ in EVALS:
            iv = paired_interval(by_seed(runs.get(norm, []), which, key), by_seed(base, which, key))
            found[(norm, which)] = iv
            cells.append("not run" if iv is None else
                         f"{iv.fmt()}: {verdict(SHORT[norm], 'LN', iv, higher_better)}")
        lines.append(f"| {LABELS[norm]} | " + " | ".join(cells) + " |")
    return lines, found


def hardware_line(runs: dict[str, list[dict]]) -> str:
    """The seed pairs of the differences whose two done runs trained on different CPU models.
    A pair shares its initialisation and data order on any CPU (same seed), but its floating
    point kernels, and so its training trajectory, may differ: a reader weighs such pairs."""
    cpu = lambda r: (r.get("hardware") or {}).get("cpu") or "?"  # noqa: E731
    base = {r["seed"]: r for r in runs.get(LN, []) if r.get("status") == "done"}
    mixed = [f"{SHORT[norm]} s{r['seed']} ({cpu(r)}) vs LN s{r['seed']} ({cpu(base[r['seed']])})"
             for norm in ORDER[1:] for r in runs.get(norm, [])
             if r.get("status") == "done" and r["seed"] in base and cpu(r) != cpu(base[r["seed"]])]
    if not mixed:
        return "Hardware: each seed pair above trained both its runs on the same CPU model."
    return ("Hardware: seed pairs whose two runs trained on different CPU models (same initialisation "
            "and data order, different floating-point kernels): " + "; ".join(mixed) + ".")


def _where(rec: dict) -> str:
    hw = rec.get("hardware") or {}
    return f"{hw.get('cpu') or '?'}, {hw.get('threads') or '?'} thread(s)"


def superseded_lines(records: Path, runs: dict[str, list[dict]], key: str, metric: str) -> list[str]:
    """The records set aside for a retrain (``reproduce --supersede``, in ``records/superseded/``):
    each with its paper-protocol value, where it trained, why it was superseded, and the value of
    its retrain (the record the tables use) once done: two trainings of one seed and preset, so
    also a measure of how much the hardware alone moves a run. Empty when there are none."""
    lines = []
    for p in sorted((records / reproduce.SUPERSEDED).glob("*.json")):
        old = json.loads(p.read_text())
        new = next((r for r in runs.get(old["norm"], []) if r["seed"] == old["seed"]), {})
        before, after = score(old, "avg", key), score(new, "avg", key)
        if new.get("_retrain"):
            retrain = f"{new['_retrain']} (until it is done, the tables use the superseded record)"
        else:
            retrain = (f"{metric} {after:.2f} on {_where(new)}"
                       + (f" (retrain - superseded: {after - before:+.2f})" if before is not None else "")
                       if after is not None else new.get("status") or "to do")
        lines.append(f"- {SHORT[old['norm']]} s{old['seed']} (`{reproduce.SUPERSEDED}/{p.name}`): "
                     f"{metric} {'-' if before is None else f'{before:.2f}'} on {_where(old)}; superseded "
                     f"{old['superseded']['when']}: {old['superseded']['reason']}. Its retrain: {retrain}.")
    if lines:
        lines = ["Superseded records (set aside for a retrain of the same seed and preset; the tables "
                 "use the retrain once it is done; paper protocol):", "", *lines]
    return lines


def bootstrap_lines(runs: dict[str, list[dict]]) -> list[str]:
    lines = []
    for norm in ORDER[1:]:
        cells = []
        for r in runs.get(norm, []):
            pb = r.get("paired_bootstrap") or {}
            if "bleu_tokenized" in pb:
                t, d = pb["bleu_tokenized"], pb.get("bleu_detok") or {}
                cells.append(f"s{r['seed']}: {t['system']['score']:.2f} vs {t['baseline']['score']:.2f}, "
                             f"p = {t['p_value']:.3f}" + (f" (detok. p = {d['p_value']:.3f})" if d else ""))
            elif r.get("paired_bootstrap_skipped"):
                cells.append(f"s{r['seed']}: not tested, {r['paired_bootstrap_skipped']}")
        if cells:
            lines.append(f"- {LABELS[norm]} vs LN (tokenized BLEU, averaged checkpoints): " + "; ".join(cells))
    if lines:
        sig = next((r["paired_bootstrap"]["bleu_tokenized"]["signature"] for recs in runs.values()
                    for r in recs if "bleu_tokenized" in (r.get("paired_bootstrap") or {})), "")
        lines += ["", f"Paired bootstrap: sacreBLEU `--paired-bs` on the same test set, signature `{sig}`; "
                  "p is sacreBLEU's two-sided p-value of the difference (its direction is the scores')."]
    return lines


def questions(found: dict, runs: dict, key: str, higher_better: bool) -> list[str]:
    """The paper's four questions, answered only where the interval allows (paper protocol)."""
    def iv_between(a: str, b: str):
        return paired_interval(by_seed(runs.get(a, []), "avg", key), by_seed(runs.get(b, []), "avg", key))

    out = []
    for norm in (PN, PN_PAPER):
        iv = found.get((norm, "avg"))
        out.append(f"- Does {LABELS[norm]} beat LN? "
                   + ("not run yet" if iv is None else f"{verdict(SHORT[norm], 'LN', iv, higher_better)}, "
                      f"{iv.fmt()}"))
    iv = found.get((BN, "avg"))
    out.append("- Does BN fall behind LN? " + ("not run yet" if iv is None else
                                               f"{verdict('BN', 'LN', iv, higher_better)}, {iv.fmt()}"))
    a, b = iv_between(PNV, BN), iv_between(PN, PNV)
    out.append("- Does PN-V sit between BN and PN? "
               + ("not run yet" if a is None or b is None else
                  f"PN-V - BN {a.fmt()}: {verdict('PN-V', 'BN', a, higher_better)}; "
                  f"PN - PN-V {b.fmt()}: {verdict('PN', 'PN-V', b, higher_better)}"))
    return out


def build_converged(corpus: str, spec: dict, campaign, root: Path) -> tuple[list[str], list[str]]:
    """The converged table of one corpus; returns its headline lines for the README and the
    norms ordered by their mean score (paper protocol, best first)."""
    results = root / "results"
    cap = campaign["cap"]
    runs = load(results / "runs" / corpus, root, cap)
    key, hb = spec["key"], spec["higher_better"]
    png = f"{corpus}_valid_loss.png"
    plotted = plot_curves(runs, results / png, spec["plot_title"])
    head = [f"| norm | {' | '.join(spec['paper_cols'])} | " + " | ".join(f"ours: {spec['metric']}, {label}"
                                                                      for _, label in EVALS)
            + (" | ours: detok. sacreBLEU, paper protocol" if key != "ppl" else "")
            + " | stopping epoch (best) per seed | core-hours | runs |",
            "|---|" + "---|" * (len(spec["paper_cols"]) + len(EVALS) + (1 if key != "ppl" else 0) + 3)]
    rows = []
    for norm in ORDER:
        recs = runs.get(norm, [])
        cells = [LABELS[norm], *map(str, spec["paper"].get(norm, ("-", "-")))]
        cells += [summary(list(by_seed(recs, which, key).values())) for which, _ in EVALS]
        if key != "ppl":
            cells.append(summary(list(by_seed(recs, "avg", "bleu_detok").values())))
        cells.append(", ".join(f"s{r['seed']}: {r.get('last_epoch', '-')} ({r.get('best_epoch', '-')})"
                               for r in recs if r.get("status") == "done") or "-")
        cells.append(f"{sum(r.get('core_hours') or 0 for r in recs):.1f}")
        cells.append(status_line(recs))
        rows.append("| " + " | ".join(cells) + " |")
    stopping = stopping_line(runs, cap)
    means = {n: statistics.mean(v) for n in ORDER if (v := list(by_seed(runs.get(n, []), "avg", key).values()))}
    order = sorted(means, key=lambda n: means[n], reverse=hb)
    diff, found = differences(runs, key, hb)
    qs = questions(found, runs, key, hb)
    sig = next((r["evaluations"]["avg"][key]["signature"] for recs in runs.values() for r in recs
                if key != "ppl" and r.get("status") == "done"), None)
    lines = [spec["title"], "",
             f"Generated by `python scripts/make_results.py` from the run records in `results/runs/{corpus}/`",
             f"(written by `python scripts/reproduce.py {corpus} --seeds 1,2,3 ...`). Do not edit by hand.", "",
             *spec["intro"],
             f"Every run trains by the paper's stopping rule under an epoch cap: a checkpoint every epoch, "
             f"stopped after {campaign['patience']} epochs without a better validation loss (the released "
             f"`--early-stop {campaign['patience']}`) or at {cap} epochs, whichever comes first; the runs "
             "table says which stopped each run.", "",
             *head, *rows, "", f"Stopping: {stopping}", "",
             "## Each norm minus LN (paired over seeds, 95% interval)", "",
             "A difference is named only where its interval excludes 0; otherwise the cell says \"no "
             "significant difference at this scale\" (or \"untested\" while only one seed pair is done).", "",
             *diff, "", hardware_line(runs), ""]
    superseded = superseded_lines(results / "runs" / corpus, runs, key, spec["metric"])
    if superseded:
        lines += [*superseded, ""]
    if key != "ppl":
        lines += [*bootstrap_lines(runs), ""]
        if sig:
            lines += [f"Tokenized BLEU signature: `{sig}`.", ""]
    lines += ["## The paper's questions (paper protocol)", "", *qs, ""]
    if plotted:
        lines += ["## Validation loss", "", f"![validation loss]({png})", ""]
    lines += ["## Runs", "", runs_table(runs), "",
              "Each record holds the exact training and evaluation commands."]
    atomic_write_text(results / spec["file"], "\n".join(lines) + "\n")
    return [f"**{spec['short_title']}** (details: [`results/{spec['file']}`](results/{spec['file']}))", "",
            *head, *rows, "", *diff, "", *qs, f"- How did the runs stop? {stopping}",
            ""], order


def stopping_line(runs: dict[str, list[dict]], cap: int) -> str:
    """How the finished runs stopped (their records' ``stopped_by``): by the patience rule
    (converged) or at the epoch cap (still improving), so a table's reader sees which."""
    done = [r for recs in runs.values() for r in recs if r.get("status") == "done"]
    if not done:
        return "no finished run yet."
    capped = sum(reproduce.stopped_by(r, reproduce.STOP_CAP) for r in done)
    patience = sum(reproduce.stopped_by(r, reproduce.STOP_PATIENCE) for r in done)
    line = (f"{len(done)} finished run(s): {patience} stopped by the patience rule (converged), "
            f"{capped} at the {cap}-epoch cap before the rule fired (not converged by it)")
    other = len(done) - capped - patience
    return line + (f"; {other} without a recorded stopping reason." if other else ".")


ANALYSIS_CORPUS = "multi30k"  # whose converged seed 1 is tracked (reproduce.CAMPAIGNS["converged"])


def build_analyses(root: Path, corpus: str = ANALYSIS_CORPUS) -> list[str]:
    """The paper's analyses from the converged records of ``corpus``, for ``results/analysis.md``:

    * Figs. 2-4 (``fig4_norm_stats_converged.png``, ``fig2_3_mean_stats_converged.png``): the
      first encoder norm's statistics over the whole run of BN and PN-V, from the tracked CSVs
      kept beside the records (``<run>.norm_stats.csv``, the lowest finished seed of each);
    * PN's stability quantities (``pn_stability_converged.png``, docs/SPEC.md section 7): max
      over channels of Gamma_t = mean(x_hat^2) and (1/d)||nu|| over the whole run of each PN
      variant, from the same tracked CSVs;
    * Fig. 6 (``fig6_embedding_spectrum_converged.png`` and ``.json``): the normalized singular
      values of the averaged models' word embeddings (``embedding_spectrum`` of each finished
      record), mean over seeds per norm, for every norm with a finished run once LN and PN have one.

    Returns the markdown lines (what was drawn from which records, or what is still missing)."""
    from powernorm_fairseq.analysis.plots import StatsRun, plot_spectra, plot_stat_boxes, read_stats

    results = root / "results"
    records = results / "runs" / corpus
    runs = load(records, root, first_cap(corpus))

    def done(norm: str, field: str) -> list[dict]:
        return [r for r in runs.get(norm, []) if r.get("status") == "done" and r.get(field)]

    def tracked_stats(picked: dict[str, dict], labels: dict[str, str]) -> list:
        # the CSV's own norm column (a registry name, e.g. "power_v") picks each run's statistic
        return [StatsRun(labels[n], (rows := read_stats(records / r["norm_stats"]))[0]["norm"], rows)
                for n, r in picked.items()]

    lines = [f"Generated by `python scripts/make_results.py` from the converged records in "
             f"`results/runs/{corpus}/`; do not edit between the markers.", ""]
    tracked = {n: done(n, "norm_stats") for n in (BN, PNV)}
    if all(tracked.values()):
        picked = {n: recs[0] for n, recs in tracked.items()}
        stats = tracked_stats(picked, SHORT)
        plot_stat_boxes(stats, results / "fig4_norm_stats_converged.png",
                        title=f"{corpus}, converged run, first encoder norm: BN vs PN-V")
        plot_stat_boxes(stats, results / "fig2_3_mean_stats_converged.png", forward_column="mu_dist",
                        backward_column="g_mu", title=f"{corpus}, converged run: mean terms")
        lines += ["Figs. 2-4 over whole converged runs (" + ", ".join(
                      f"{SHORT[n]} seed {r['seed']}, {r.get('last_epoch')} epochs, "
                      f"`{r['norm_stats']}`" for n, r in picked.items()) + "):", "",
                  "![Fig. 4, converged](fig4_norm_stats_converged.png)", "",
                  "![Figs. 2-3, converged](fig2_3_mean_stats_converged.png)", "",
                  *stats_table(stats)]
    else:
        lines += ["Figs. 2-4 over whole converged runs: not yet; waiting for a finished tracked run of "
                  + " and ".join(SHORT[n] for n, recs in tracked.items() if not recs) + ".", ""]
    # the PN variants' own quantities; a PN run that was not tracked is left out, not waited for
    pn_runs = {n: recs[0] for n in (PN, PN_PAPER) if (recs := done(n, "norm_stats"))}
    if pn_runs:
        stats = tracked_stats(pn_runs, LABELS)
        plot_stat_boxes(stats, results / "pn_stability_converged.png", forward_column="gamma_max",
                        backward_column="nu", title=f"{corpus}, converged run, first encoder norm: Gamma and nu")
        lines += ["PN's stability quantities over whole converged runs (" + ", ".join(
                      f"{LABELS[n]} seed {r['seed']}, {r.get('last_epoch')} epochs, `{r['norm_stats']}`"
                      for n, r in pn_runs.items()) + "): left max over channels of Gamma_t = mean(x_hat^2), "
                  "right (1/d)||nu||:", "",
                  "![PN stability, converged](pn_stability_converged.png)", "",
                  *stats_table(stats, columns=("gamma_max", "nu", "lambda"))]
    spectra = {n: recs for n in ORDER if (recs := done(n, "embedding_spectrum"))}
    if LN in spectra and PN in spectra:
        curves, source = {}, {}
        for n, recs in spectra.items():
            values = [r["embedding_spectrum"]["values"] for r in recs]
            if len({len(v) for v in values}) != 1:
                raise SystemExit(f"{corpus} {n}: embedding spectra of different lengths in "
                                 + ", ".join(r["_file"] for r in recs))
            label = f"{SHORT[n]} ({len(values)} seed{'s' * (len(values) > 1)})"
            curves[label] = [statistics.mean(col) for col in zip(*values, strict=True)]
            source[label] = [r["_file"] for r in recs]
        plot_spectra(curves, results / "fig6_embedding_spectrum_converged.png",
                     title=f"{corpus}, converged (averaged checkpoints)")
        atomic_write_text(results / "fig6_embedding_spectrum_converged.json", json.dumps(
            {"values": curves, "records": source}, indent=1) + "\n")
        index = [i for i in (4, 9, 19, 49) if i < len(next(iter(curves.values())))]
        lines += ["Fig. 6 from the converged runs (mean over seeds of each norm's averaged model; "
                  "values in `fig6_embedding_spectrum_converged.json`):", "",
                  "![Fig. 6, converged](fig6_embedding_spectrum_converged.png)", "",
                  "| norm | " + " | ".join(f"sigma_{i + 1}/sigma_1" for i in index) + " | last |",
                  "|---|" + "---|" * (len(index) + 1),
                  *(f"| {label} | " + " | ".join(f"{v[i]:.3f}" for i in index) + f" | {v[-1]:.3f} |"
                    for label, v in curves.items()), ""]
    else:
        lines += ["Fig. 6 from the converged runs: not yet; waiting for a finished run of "
                  + " and ".join(SHORT[n] for n in (LN, PN) if n not in spectra) + ".", ""]
    return lines


def stats_table(stats: list, n_buckets: int = 5, columns: tuple[str, ...] | None = None) -> list[str]:
    """Median (max) per progress bucket of what Figs. 2-4 plot: each run's own forward distance and
    backward term (Fig. 4), then the mean terms (Figs. 2-3); or the given tracking ``columns``."""
    from powernorm_fairseq.analysis.plots import bucket_summary, stat_column

    head = " | ".join(f"{100 * (k + 1) // n_buckets}%" for k in range(n_buckets))
    lines = ["Median (max) per fifth of training" + ("" if columns else ", per token-averaged channel (1/d) norm")
             + ":", "", f"| run | statistic | {head} |", "|---|---|" + "---|" * n_buckets]
    for run in stats:
        for col in columns or (stat_column(run.norm, "forward"), stat_column(run.norm, "backward"),
                               "mu_dist", "g_mu"):
            cells = ["-" if c is None else f"{c[0]:.3g} ({c[1]:.3g})"
                     for c in bucket_summary(run.rows, col, run.total_steps(), n_buckets)]
            lines.append(f"| {run.label} | `{col}` | " + " | ".join(cells) + " |")
    return [*lines, ""]


def runs_table(runs: dict[str, list[dict]]) -> str:
    lines = ["| run | status | seed | commit (training) | hardware | stopped by | epochs (best) | "
             "core-hours | record |", "|---|---|---|---|---|---|---|---|---|"]
    for norm in ORDER:
        for r in runs.get(norm, []):
            seg = (r.get("train_segments") or [{}])[-1]
            lines.append(f"| {LABELS[norm]} | {r.get('status')} | {r['seed']} | {seg.get('commit', '-')} | "
                         f"{_where(r)} | "
                         f"{r.get('stopped_by') or '-'} | {r.get('last_epoch', '-')} ({r.get('best_epoch', '-')}) | "
                         f"{r.get('core_hours', 0):.2f} | `{r['_file']}` |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# The budget run


def budget_arithmetic(corpus: str, r: dict, n_runs: int) -> str:
    """One line of the campaign's budget: the measured cost of an epoch (fairseq's training
    seconds per epoch of the LN budget run, 1 thread, median over epochs 2+), times the epoch cap
    of ``reproduce.CORPORA`` and the number of runs; and, once the budget run has stopped, what
    the cap gives up against its best epoch."""
    cap = reproduce.CORPORA[corpus].max_epoch
    walls = sorted(e["train_wall"] for e in (r.get("epochs") or [])[1:] if e.get("train_wall"))
    threads = (r.get("hardware") or {}).get("threads") or 1
    if not walls:
        return f"- {corpus}: the LN budget run has no finished epoch yet; no estimate."
    median = walls[len(walls) // 2]
    quiet = walls[len(walls) // 4]  # the fastest quarter: two 1-thread jobs and nothing else
    cost = lambda s: n_runs * cap * s * threads / 3600  # noqa: E731
    line = (f"- {corpus}: an epoch costs {quiet} s of training in the fastest quarter of its "
            f"{len(walls)} epochs (little else running; median {median} s), {threads} thread. {n_runs} runs (5 norms x 3 seeds) capped at "
            f"{cap} epochs: {cost(quiet):.1f} core-hours of training ({cost(median):.1f} at the "
            f"median), plus validation and evaluation.")
    curve = dict((int(e), v) for e, v in r.get("valid_loss_by_epoch") or [])
    best = r.get("best_epoch")
    if r.get("status") == "done" and best and cap in curve:
        at_cap = min(v for e, v in curve.items() if e <= cap)
        line += (f" The budget run stopped at epoch {r.get('last_epoch')} ({r.get('stopped_by')}), "
                 f"best epoch {best} (validation loss {curve[best]:.3f}); its best up to epoch {cap} "
                 f"was {at_cap:.3f}, {at_cap - curve[best]:+.3f} from its best.")
    elif r.get("status") != "done":
        # its record alone cannot tell running from stopped or lost: the status table can
        line += (f" The budget run has not finished: its record stands at epoch {r.get('last_epoch', 0)} "
                 f"({r.get('core_hours') or 0:.2f} core-hours; `status.md` says whether it is running, "
                 "can resume, or lost its checkpoints).")
    return line


def measured_cost(root: Path, n_runs: int) -> str:
    """The campaign's cost as measured by its finished runs (``results/runs/<corpus>/*.json``):
    mean core-hours per done run (training and evaluation, wall x threads, beside the other job)
    times ``n_runs`` per corpus, and their sum once every corpus has a finished run."""
    parts, total, complete = [], 0.0, True
    for corpus in reproduce.CORPORA:
        runs = load(root / reproduce.CAMPAIGNS["converged"].records / corpus, root)
        done = [r.get("core_hours") or 0 for recs in runs.values() for r in recs if r.get("status") == "done"]
        if not done:
            parts.append(f"{corpus}: no finished run yet")
            complete = False
            continue
        mean = reproduce.cost_per_run(done)
        total += n_runs * mean
        parts.append(f"{corpus}: {mean:.2f} core-hours per run over {len(done)} finished run(s), "
                     f"{n_runs * mean:.1f} for {n_runs} runs")
    line = "- measured by the finished converged runs: " + "; ".join(parts)
    return line + (f"; the whole campaign about {total:.0f} core-hours." if complete else ".")


def build_budget(root: Path) -> list[str]:
    """results/budget/README.md and the arithmetic lines for results/README.md."""
    out_lines = ["# The budget runs", "",
                 "Generated by `python scripts/make_results.py` from `results/budget/<corpus>/*.json` "
                 "(written by `python scripts/reproduce.py <corpus> --campaign budget --norms ln --seeds 1 "
                 "--threads 1`). Do not edit by hand.", ""]
    arithmetic = []
    n_runs = len(ORDER) * 3
    for corpus in ("multi30k", "ptb"):
        runs = load(root / "results" / "budget" / corpus, root)
        for r in runs.get(LN, []):
            curve = r.get("valid_loss_by_epoch") or []
            png = f"{corpus}_ln_s{r['seed']}.png"
            if curve:
                import matplotlib

                matplotlib.use("Agg")
                import matplotlib.pyplot as plt

                fig, ax = plt.subplots(figsize=(6, 3.5))
                ax.plot([e for e, _ in curve], [v for _, v in curve], marker="o", ms=3)
                _finish_plot(fig, ax, True, "epoch", f"{corpus} LN seed {r['seed']}: {r.get('status')}",
                             root / "results" / "budget" / png, legend=None)
            per_update = r.get("train_s_per_update")
            updates = (r.get("epochs") or [{}])[-1].get("num_updates")
            hours = r.get("core_hours") or 0
            done = r.get("status") == "done"
            out_lines += [f"## {corpus}, LN, seed {r['seed']}: {r.get('status')}", "",
                          f"- Command: `{r.get('command')}`",
                          f"- Commit: {r.get('started_commit')}; hardware: {r.get('hardware')}",
                          f"- Epochs: {r.get('last_epoch', '-')}, best epoch {r.get('best_epoch', '-')} "
                          f"(validation loss {r.get('best_valid_loss', '-')}); stopped by: "
                          f"{r.get('stopped_by') or ('-' if done else 'still training')}",
                          f"- Updates: {updates}; fairseq training seconds per update (1 thread, other jobs on "
                          f"the machine): {per_update}",
                          f"- Core-hours so far: {hours:.2f}", "",
                          "| epoch | validation loss |", "|---|---|",
                          *(f"| {e} | {v:.3f} |" for e, v in curve), ""]
            if curve:
                out_lines += [f"![curve]({png})", ""]
            arithmetic.append(budget_arithmetic(corpus, r, n_runs))
    arithmetic.append(measured_cost(root, n_runs))
    atomic_write_text(root / "results" / "budget" / "README.md", "\n".join(out_lines) + "\n")
    return arithmetic


def update_between(path: Path, name: str, body: list[str]) -> None:
    """Replace the text between ``<!-- name:begin -->`` and ``<!-- name:end -->`` in ``path``."""
    if not path.exists():
        return
    text = path.read_text()
    begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
    if begin not in text or end not in text:
        return
    new = text[: text.index(begin) + len(begin)] + "\n" + "\n".join(body) + "\n" + text[text.index(end):]
    atomic_write_text(path, new)


# ----------------------------------------------------------------------------------------------
# The short-budget pilot (kept as it was generated, from its own records)


def pilot_metric(rec: dict, key: str) -> float | None:
    ev = rec.get("evaluation") or {}
    if key.endswith("_last"):
        ev, key = rec.get("evaluation_last") or {}, key[: -len("_last")]
    if rec.get("status") != "done" or not ev:
        return None
    if key == "ppl":
        return ev.get("value")
    return (ev.get(key) or {}).get("score")


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


def build_pilot(corpus: str, spec: dict, root: Path) -> list[str]:
    results = root / "results"
    runs = load(results / "pilot" / "runs" / corpus, root)
    metrics = [*spec["pilot_metrics"]]
    lines = [f"# Short-budget pilot: {spec['short_title']}", "",
             f"Generated by `python scripts/make_results.py` from `results/pilot/runs/{corpus}/` (written by "
             f"`python scripts/reproduce.py {corpus} --campaign pilot ...`). Do not edit by hand.", "",
             f"A fixed short budget ({spec['pilot_budget']}), the last 3 update checkpoints (100 updates apart) "
             "averaged; 2 seeds. **Not converged**: the validation loss was still falling fast, and seeds moved "
             "a norm's score by more than the differences between norms. Superseded by the converged "
             f"campaign (`results/{spec['file']}`). The PN (paper variant) runs were trained before the fix of "
             "issue 13 fault 1 (gradient into padding after warmup): their numbers are those of the faulty code.",
             "", "| norm | " + " | ".join(label for _, label in metrics) + " | runs |",
             "|---|" + "---|" * (len(metrics) + 1)]
    for norm in ORDER:
        recs = runs.get(norm, [])
        label = LABELS[norm] + (" (trained with fault 1)" if any(r.get("known_fault") for r in recs) else "")
        values = [[v for r in recs if (v := pilot_metric(r, k)) is not None] for k, _ in metrics]
        lines.append("| " + " | ".join([label, *(summary(v) if v else "-" for v in values),
                                        status_line(recs)]) + " |")
    if plot_pilot(runs, results / "pilot" / f"{corpus}_valid_loss.png", spec["plot_title"]):
        lines += ["", f"![validation loss]({corpus}_valid_loss.png)"]
    lines += ["", "Records: " + ", ".join(f"`{r['_file']}`" for recs in runs.values() for r in recs)]
    atomic_write_text(results / "pilot" / spec["file"], "\n".join(lines) + "\n")
    return lines


TABLES = {
    "multi30k": {
        "file": "table1_multi30k.md", "short_title": "Multi30k (Table 1 at CPU scale)",
        "title": "# Table 1 at CPU scale: Multi30k De->En (stand-in for IWSLT14/WMT14)",
        "plot_title": "Multi30k de-en, CPU scale: validation loss",
        "intro": ["Setup: presets `configs/multi30k_{ln,bn,pnv,pn,pnpaper}.yaml`, identical except the encoder's",
                  "norm (released wiring: the decoder keeps LN); a 2+2-layer d-128 pre-norm transformer on 2 CPU",
                  "cores; beam 5, lenpen 1.0 (the paper's IWSLT14 settings) on test2016 (1,000 sentences).",
                  "BLEU: tokenized, case-insensitive (the paper's metric); detokenized sacreBLEU beside it."],
        "paper": PAPER_T1, "paper_cols": ("paper IWSLT14 BLEU", "paper WMT14 BLEU"),
        "key": "bleu_tokenized", "metric": "BLEU", "higher_better": True,
        "pilot_budget": "500 updates, about 4 epochs",
        "pilot_metrics": (("bleu_tokenized", "BLEU (tokenized), averaged"), ("bleu_detok", "sacreBLEU (detok.)"),
                          ("bleu_tokenized_last", "BLEU (tokenized), last checkpoint")),
    },
    "ptb": {
        "file": "table2_ptb.md", "short_title": "PTB (Table 2 at CPU scale)",
        "title": "# Table 2 at CPU scale: Penn Treebank language modelling",
        "plot_title": "PTB word LM, CPU scale: validation loss",
        "intro": ["Setup: presets `configs/ptb_cpu_tensorized_{ln,bn,pnv,pn,pnpaper}.yaml`, identical except the norm",
                  "(at every decoder site): the paper's model, the Tensorized Transformer LM (multi-linear attention,",
                  "1 core; `transformer_lm_pn --self-attention multilinear`), 2 layers d-128, 32-token blocks, pre-norm,",
                  "causally masked (the authors' script applies no causal mask; see README section 3), on 2 CPU cores.",
                  "Test perplexity with fairseq-eval-lm. The pilot used fairseq's standard `transformer_lm_pn` instead."],
        "paper": PAPER_T2, "paper_cols": ("paper PTB PPL", "paper WikiText-103 PPL"),
        "key": "ppl", "metric": "test PPL", "higher_better": False,
        "pilot_budget": "300 updates, about 1.3 epochs",
        "pilot_metrics": (("ppl", "test PPL, averaged"), ("ppl_last", "test PPL, last checkpoint")),
    },
}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="powernorm-results", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", default=".",
                   help="the project directory: results/ (its records are read, its tables "
                   "written) and README.md (section 5 rewritten); default the current directory")
    args = p.parse_args(argv)  # --help answers here, before anything is written
    root = Path(os.path.abspath(args.root))
    if not (root / "results").is_dir():
        raise SystemExit(f"--root {root}: no results/ directory (run from the project directory, "
                         "or pass --root)")
    readme, orders = [], {}
    for corpus, spec in TABLES.items():
        build_pilot(corpus, spec, root)
        lines, orders[corpus] = build_converged(
            corpus, spec, {"patience": reproduce.PATIENCE, "cap": first_cap(corpus)}, root)
        readme += lines
    if all(len(o) >= 2 for o in orders.values()):
        same = orders["multi30k"] == orders["ptb"]
        readme += ["Does the order hold on both corpora? Ordering of the means (paper protocol, best first): "
                   + "; ".join(f"{c}: {', '.join(SHORT[n] for n in o)}" for c, o in orders.items())
                   + (" (the same)." if same else " (not the same). Read it with the intervals above: "
                      "an ordering inside the intervals is not established."), ""]
    else:
        readme += ["Does the order hold on both corpora? Not answerable yet: too few finished runs.", ""]
    update_between(root / "results" / "analysis.md", "converged", build_analyses(root))
    arithmetic = build_budget(root)
    update_between(root / "results" / "README.md", "budget", arithmetic)
    readme += ["The earlier short-budget pilot (500 / 300 updates, 2 seeds, not converged) is in "
               "[`results/pilot/`](results/pilot/); run status and core-hours: "
               "[`results/status.md`](results/status.md)."]
    update_between(root / "README.md", "results", readme)
    print(f"wrote the tables in {root / 'results'}")


if __name__ == "__main__":
    main()
