"""The main campaign's tables: each norm over seeds, each norm minus LN with its paired interval,
t, p and Holm's correction, the paper's questions, the paired bootstraps, how the runs stopped, the
runs; at each cap of a corpus (Multi30k: capped at 30 epochs, and by the patience rule under the
raised cap)."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

from powernorm_fairseq.analysis.stats import holm, paired_interval, verdict
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


def evaluations(runs: dict[str, list[dict]]) -> tuple[tuple, str]:
    """The evaluations a table shows (:data:`EVALS`; best and last as one column where every
    finished run's best checkpoint is its last) and the line that says how many runs have them
    the same."""
    done = [r for recs in runs.values() for r in recs if r.get("status") == "done"]
    same = sum(r.get("best_epoch") == r.get("last_epoch") for r in done)
    line = f"Best and last checkpoint: the same checkpoint in {same} of {len(done)} finished run(s)"
    if done and same == len(done):
        return (EVALS[0], ("best", "best checkpoint = last checkpoint (the same in every run)")), line + "."
    return EVALS, line + "; both are shown."


def family(runs: dict[str, list[dict]], norms, key: str, which: str) -> dict:
    """Each of ``norms`` minus LN on evaluation ``which``: norm -> paired interval (None: not run)."""
    base = by_seed(runs.get(LN, []), which, key)
    return {norm: paired_interval(by_seed(runs.get(norm, []), which, key), base) for norm in norms if norm != LN}


def cell(name: str, base: str, iv, corrected, higher_better: bool) -> str:
    """A difference as the tables write it: the uncorrected interval, the verdict after Holm's
    correction, t and p, and the Holm-adjusted p."""
    if iv is None:
        return "not run"
    text = f"{iv.fmt()}: {verdict(name, base, iv, higher_better, corrected)}"
    if iv.n >= 2:
        text += f"; {iv.fmt_tp()}" + (f", Holm p = {corrected.p_adjusted:.3f}" if corrected else "")
    return text


def differences(runs: dict[str, list[dict]], key: str, higher_better: bool, evals=EVALS,
                norms=ORDER) -> tuple[list[str], dict, dict]:
    """Each norm minus LN, per evaluation: the paired 95% interval (uncorrected), t and p, and
    the verdict after Holm's correction over the norms of that evaluation (its family)."""
    better = "higher BLEU is better" if higher_better else "lower perplexity is better"
    lines = [f"| norm - LN ({better}) | " + " | ".join(label for _, label in evals) + " |",
             "|---|" + "---|" * len(evals)]
    found, corrected = {}, {}
    for which, _ in evals:
        ivs = family(runs, norms, key, which)
        found.update({(n, which): iv for n, iv in ivs.items()})
        corrected.update({(n, which): c for n, c in holm(ivs).items()})
    for norm in norms:
        if norm != LN:
            cells = [cell(SHORT[norm], "LN", found[(norm, w)], corrected.get((norm, w)), higher_better)
                     for w, _ in evals]
            lines.append(f"| {LABELS[norm]} | " + " | ".join(cells) + " |")
    return lines, found, corrected


def hardware_line(runs: dict[str, list[dict]]) -> str:
    """The seed pairs of the differences whose two done runs trained on different CPU models.
    A pair shares its initialisation and data order on any CPU (same seed), but its floating
    point kernels, and so its training trajectory, may differ: a reader weighs such pairs."""
    cpu = lambda r: (r.get("hardware") or {}).get("cpu") or "?"  # noqa: E731
    base = {r["seed"]: r for r in runs.get(LN, []) if r.get("status") == "done"}
    mixed = [f"{SHORT[norm]} s{r['seed']} ({cpu(r)}) vs LN s{r['seed']} ({cpu(base[r['seed']])})"
             for norm in ORDER[1:] for r in runs.get(norm, [])
             if r.get("status") == "done" and r["seed"] in base and cpu(r) != cpu(base[r["seed"]])]
    threads = lambda r: (r.get("hardware") or {}).get("threads") or "?"  # noqa: E731
    other = [f"{SHORT[norm]} s{r['seed']} ({threads(r)}) vs LN s{r['seed']} ({threads(base[r['seed']])})"
             for norm in ORDER[1:] for r in runs.get(norm, [])
             if r.get("status") == "done" and r["seed"] in base and threads(r) != threads(base[r["seed"]])]
    runs_line = (" Threads: " + ("seed pairs whose two runs trained with different threads: " + "; ".join(other)
                                 if other else "each seed pair trained both its runs with the same threads")
                 + "; every run's CPU and threads are in the runs table.")
    if not mixed:
        return "Hardware: each seed pair above trained both its runs on the same CPU model." + runs_line
    return ("Hardware: seed pairs whose two runs trained on different CPU models (same initialisation "
            "and data order, different floating-point kernels): " + "; ".join(mixed) + "." + runs_line)


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


def questions(found: dict, corrected: dict, runs: dict, key: str, higher_better: bool) -> list[str]:
    """The paper's four questions, answered only where the interval allows after Holm's
    correction over the comparisons with LN (paper protocol); PN-V between BN and PN is asked of
    two more pairs, corrected as a family of two."""
    def answer(name: str, norm: str) -> str:
        iv = found.get((norm, "avg"))
        return ("not run yet" if iv is None else
                f"{verdict(name, 'LN', iv, higher_better, corrected.get((norm, 'avg')))}, {iv.fmt()}"
                + (f" ({iv.fmt_tp()})" if iv.n >= 2 else ""))

    def between(a: str, b: str):
        return paired_interval(by_seed(runs.get(a, []), "avg", key), by_seed(runs.get(b, []), "avg", key))

    out = [f"- Does {LABELS[norm]} beat LN? {answer(SHORT[norm], norm)}" for norm in (PN, PN_PAPER)]
    out.append(f"- Does BN fall behind LN? {answer('BN', BN)}")
    a, b = between(PNV, BN), between(PN, PNV)
    pair = holm({"a": a, "b": b})
    out.append("- Does PN-V sit between BN and PN? "
               + ("not run yet" if a is None or b is None else
                  f"PN-V - BN {a.fmt()}: {verdict('PN-V', 'BN', a, higher_better, pair.get('a'))}; "
                  f"PN - PN-V {b.fmt()}: {verdict('PN', 'PN-V', b, higher_better, pair.get('b'))}"))
    return out


def finished_runs(runs: dict) -> dict:
    """The done records of each norm in ``runs`` (norm -> records)."""
    return {n: [r for r in recs if r.get("status") == "done"] for n, recs in runs.items()}


def section(corpus: str, table: dict, cap: int, root: Path, png: str | None) -> tuple[list[str], list[str], dict]:
    """One corpus at one cap: the file's lines, the README's lines and the records read
    (norm -> runs at ``cap``)."""
    results = root / "results"
    # the main campaign's norms: other campaigns (mechanism) keep their records beside them
    runs = {n: recs for n, recs in load(results / "runs" / corpus, root, cap).items() if n in ORDER}
    key, hb = table["key"], table["higher_better"]
    plotted = bool(png) and plot_curves(runs, results / png, table["plot_title"] + f" (cap {cap} epochs)")
    evals, same_line = evaluations(runs)
    head = [f"| norm | {' | '.join(table['paper_cols'])} | " + " | ".join(f"ours: {table['metric']}, {label}"
                                                                       for _, label in evals)
            + (" | ours: detok. sacreBLEU, paper protocol" if key != "ppl" else "")
            + " | stopping epoch (best) per seed | core-hours | runs |",
            "|---|" + "---|" * (len(table["paper_cols"]) + len(evals) + (1 if key != "ppl" else 0) + 3)]
    rows = []
    for norm in ORDER:
        recs = runs.get(norm, [])
        cells = [LABELS[norm], *map(str, table["paper"].get(norm, ("-", "-")))]
        cells += [summary(list(by_seed(recs, which, key).values())) for which, _ in evals]
        if key != "ppl":
            cells.append(summary(list(by_seed(recs, "avg", "bleu_detok").values())))
        cells.append(", ".join(f"s{r['seed']}: {r.get('last_epoch', '-')} ({r.get('best_epoch', '-')})"
                               for r in recs if r.get("status") == "done") or "-")
        cells.append(f"{sum(r.get('core_hours') or 0 for r in recs):.1f}")
        cells.append(status_line(recs))
        rows.append("| " + " | ".join(cells) + " |")
    stopping = stopping_line(runs, cap)
    diff, found, corrected = differences(runs, key, hb, evals)
    qs = questions(found, corrected, runs, key, hb)
    lines = [*head, *rows, "", f"Stopping: {stopping}", "", same_line, "",
             "### Each norm minus LN (paired over seeds)", "",
             "Each cell: the difference with its paired 95% interval over seeds (uncorrected), the paired "
             "t-test's t and p, and Holm's step-down correction over the norms of its column (Holm p). A "
             "direction is named only where the interval excludes 0 and Holm p < 0.05; otherwise \"no "
             "significant difference\" (or \"untested\" while only one seed pair is done).", "",
             *diff, "", hardware_line(runs), ""]
    if key != "ppl":
        lines += [*bootstrap_lines(runs), ""]
    lines += ["### The paper's questions (paper protocol)", "", *qs, ""]
    if plotted:
        lines += ["### Validation loss", "", f"![validation loss]({png})", ""]
    lines += ["### Runs", "", runs_table(runs), ""]
    done = finished_runs(runs)
    if not any(done.values()):
        started = sum(len(recs) for recs in runs.values())
        return lines, [f"No finished run yet ({started} started; [`results/status.md`](results/status.md)).", ""], runs
    if not any(recs for n, recs in done.items() if n != LN):  # no difference to show: one line, not a table
        finished = ", ".join(f"{LABELS[n]} s{r['seed']}" for n in ORDER for r in done.get(n, []))
        return lines, [f"No norm to compare with LN yet (finished: {finished}; "
                       f"[`results/status.md`](results/status.md)). How did the runs stop? {stopping}", ""], runs
    return lines, [*diff, "", *qs, f"- How did the runs stop? {stopping}", ""], runs


def build_converged(corpus: str, table: dict, campaign, root: Path) -> tuple[list[str], list[str]]:
    """The tables of one corpus (``results/<file>``): at its first cap, and where a raised cap
    lets the paper's stopping rule finish the runs, at that cap too, side by side; returns the
    README's lines and the norms ordered by their mean score at the first cap (paper protocol,
    best first)."""
    results = root / "results"
    caps = campaign["caps"]
    patience = campaign["patience"]
    lines = [table["title"], "",
             f"Generated by `python scripts/make_results.py` from the run records in `results/runs/{corpus}/`",
             f"(written by `python scripts/reproduce.py {corpus} --seeds 1,2,3 ...`). Do not edit by hand.", "",
             *table["intro"],
             f"Every run trains by the paper's stopping rule under an epoch cap: a checkpoint every epoch, "
             f"stopped after {patience} epochs without a better validation loss (the released "
             f"`--early-stop {patience}`) or at the cap, whichever comes first; the runs table says which "
             "stopped each run. A run stopped at its cap is \"capped at N epochs\", never converged.", ""]
    readme = [f"**{table['short_title']}** (details: [`results/{table['file']}`](results/{table['file']}))", ""]
    first_runs = None
    for i, cap in enumerate(caps):
        raised = i > 0
        title = (f"## By the patience rule, cap raised to {cap} epochs" if raised else
                 f"## Capped at {cap} epochs" if len(caps) > 1 else f"## Cap {cap} epochs")
        png = f"{corpus}_valid_loss.png" if not raised else f"{corpus}_valid_loss_cap{cap}.png"
        body, short, runs = section(corpus, table, cap, root, png)
        finished = finished_runs(runs)
        done, planned = sum(len(finished.get(n, [])) for n in ORDER), len(ORDER) * len(spec.CONVERGED_SEEDS)
        if raised and done < planned:
            # a raised cap's comparison stays one README line until every run is done (the README
            # is a short guide; the table file has the partial differences)
            short = [f"In progress: {done} of {planned} runs finished; "
                     f"the differences so far are in [`results/{table['file']}`](results/{table['file']}). "
                     f"How did the runs stop? {stopping_line(runs, cap)}", ""]
        lines += [title, "", *body]
        readme += ([f"*{title[3:]}:*", ""] if len(caps) > 1 else []) + short
        first_runs = runs if first_runs is None else first_runs
    superseded = superseded_lines(results / "runs" / corpus, first_runs, table["key"], table["metric"])
    if superseded:
        lines += [*superseded, ""]
    lines += ["Each record holds the exact training and evaluation commands."]
    atomic_write_text(results / table["file"], "\n".join(lines) + "\n")
    key, hb = table["key"], table["higher_better"]
    means = {n: statistics.mean(v) for n in ORDER if (v := list(by_seed(first_runs.get(n, []), "avg", key).values()))}
    return readme, sorted(means, key=lambda n: means[n], reverse=hb)


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

