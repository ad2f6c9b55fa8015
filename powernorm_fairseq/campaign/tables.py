"""The converged campaign's tables: each norm over seeds, each norm minus LN with its paired
interval, the paper's questions, the paired bootstraps, how the runs stopped, the runs."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

from powernorm_fairseq.analysis.stats import paired_interval, verdict
from powernorm_fairseq.campaign import spec
from powernorm_fairseq.campaign.figures import plot_curves
from powernorm_fairseq.campaign.view import (
    BN,
    EVALS,
    LABELS,
    LN,
    ORDER,
    PN,
    PN_PAPER,
    PNV,
    SHORT,
    by_seed,
    load,
    score,
    status_line,
    summary,
)
from powernorm_fairseq.pipeline.common import atomic_write_text


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
    for p in sorted((records / spec.SUPERSEDED).glob("*.json")):
        old = json.loads(p.read_text())
        new = next((r for r in runs.get(old["norm"], []) if r["seed"] == old["seed"]), {})
        before, after = score(old, "avg", key), score(new, "avg", key)
        if new.get("_retrain"):
            retrain = f"{new['_retrain']} (until it is done, the tables use the superseded record)"
        else:
            retrain = (f"{metric} {after:.2f} on {_where(new)}"
                       + (f" (retrain - superseded: {after - before:+.2f})" if before is not None else "")
                       if after is not None else new.get("status") or "to do")
        lines.append(f"- {SHORT[old['norm']]} s{old['seed']} (`{spec.SUPERSEDED}/{p.name}`): "
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
    # the converged campaign's norms: other campaigns (mechanism) keep their records beside them
    runs = {n: recs for n, recs in load(results / "runs" / corpus, root, cap).items() if n in ORDER}
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
    capped = sum(spec.stopped_by(r, spec.STOP_CAP) for r in done)
    patience = sum(spec.stopped_by(r, spec.STOP_PATIENCE) for r in done)
    line = (f"{len(done)} finished run(s): {patience} stopped by the patience rule (converged), "
            f"{capped} at the {cap}-epoch cap before the rule fired (not converged by it)")
    other = len(done) - capped - patience
    return line + (f"; {other} without a recorded stopping reason." if other else ".")


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

