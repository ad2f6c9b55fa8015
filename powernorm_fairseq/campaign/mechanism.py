"""What makes PowerNorm work (issue 36): its two ingredients apart, and the norms of today beside them.

The released PN is GroupScaling (a per-token RMS over channel groups) followed by the running
quadratic mean. The mechanism table crosses the two: rows are the per-token scaling (none, group
RMS), columns the batch statistic (none, the batch quadratic mean = PN-V, the running quadratic
mean = PN as Algorithm 2); LN, RMSNorm, Dynamic Tanh and the released PN stand beside it. Every
run is read at the main campaign's first cap (Multi30k 30 epochs, PTB 12), where the mechanism
campaign trains too (``reproduce --campaign mechanism``), and the paper protocol's score is used.
"""

from __future__ import annotations

from pathlib import Path

from powernorm_fairseq.analysis.stats import holm, paired_interval, verdict
from powernorm_fairseq.campaign.view import (
    LABELS,
    LN,
    SHORT,
    by_seed,
    first_cap,
    load,
    status_line,
    summary,
)
from powernorm_fairseq.pipeline.common import atomic_write_text

SCALINGS = ("none", "group RMS (GroupScaling)")
STATISTICS = ("none", "batch quadratic mean (PN-V)", "running quadratic mean (PN, Algorithm 2)")
#: (scaling, statistic) -> the norm configuration of that cell (None: no norm at all, not run)
GRID = {(SCALINGS[0], STATISTICS[0]): None, (SCALINGS[0], STATISTICS[1]): "pnv",
        (SCALINGS[0], STATISTICS[2]): "pnpaper", (SCALINGS[1], STATISTICS[0]): "group_rms",
        (SCALINGS[1], STATISTICS[1]): "pnv_gs", (SCALINGS[1], STATISTICS[2]): "pnpaper_gs"}
#: beside the grid: the baseline, the norms of today, and the released PN (GroupScaling, then the
#: running quadratic mean with the released code's deviations)
BESIDE = ("ln", "rms", "dyt", "pn")
#: the questions the table answers, each a paired difference (a, b): a - b
QUESTIONS = (("group_rms", "ln", "GroupScaling alone against LN"),
             ("pnpaper_gs", "pnpaper", "what GroupScaling adds to Algorithm 2"),
             ("pn", "group_rms", "what the released PN adds to GroupScaling"),
             ("rms", "ln", "RMSNorm against LN"),
             ("dyt", "ln", "Dynamic Tanh against LN"))


def _diff(runs: dict, a: str, b: str, key: str):
    return paired_interval(by_seed(runs.get(a, []), "avg", key), by_seed(runs.get(b, []), "avg", key))


def _cell(runs: dict, norm: str | None, key: str, versus_ln: dict, corrected: dict, hb: bool) -> str:
    if norm is None:
        return "- (no norm; not run)"
    values = list(by_seed(runs.get(norm, []), "avg", key).values())
    iv = versus_ln.get(norm)
    text = f"{SHORT[norm]}: {summary(values)}"
    if iv is not None:
        text += (f"; - LN {iv.fmt()}" + (f", {iv.fmt_tp()}, Holm p = {corrected[norm].p_adjusted:.3f}"
                                        if norm in corrected else "")
                 + f": {verdict(SHORT[norm], 'LN', iv, hb, corrected.get(norm))}")
    return text


def answers(runs: dict, key: str, hb: bool) -> list[str]:
    """The five questions, each a paired interval with t and p, Holm-corrected as one family."""
    ivs = {(a, b): _diff(runs, a, b, key) for a, b, _ in QUESTIONS}
    corrected = holm(ivs)
    out = []
    for a, b, what in QUESTIONS:
        iv = ivs[(a, b)]
        out.append(f"{SHORT[a]} - {SHORT[b]} ({what}): " + (
            "not run yet" if iv is None else
            f"{iv.fmt()}" + (f", {iv.fmt_tp()}, Holm p = {corrected[(a, b)].p_adjusted:.3f}" if (a, b) in corrected
                             else "") + f": {verdict(SHORT[a], SHORT[b], iv, hb, corrected.get((a, b)))}"))
    return out


def build_mechanism(corpus: str, table: dict, root: Path) -> list[str]:
    """``results/mechanism_<corpus>.md`` from the records; returns the README's lines."""
    cap = first_cap(corpus)
    runs = load(root / "results" / "runs" / corpus, root, cap)
    key, hb = table["key"], table["higher_better"]
    norms = [n for n in (*GRID.values(), *BESIDE) if n and n != LN]
    versus_ln = {n: _diff(runs, n, LN, key) for n in norms}
    corrected = holm(versus_ln)
    better = "higher is better" if hb else "lower is better"
    grid = [f"| per-token scaling \\\\ batch statistic | {' | '.join(STATISTICS)} |",
            "|---|" + "---|" * len(STATISTICS)]
    for scaling in SCALINGS:
        grid.append(f"| {scaling} | " + " | ".join(_cell(runs, GRID[(scaling, s)], key, versus_ln, corrected, hb)
                                               for s in STATISTICS) + " |")
    beside = ["| beside | " + " | ".join(LABELS[n] for n in BESIDE) + " |", "|---|" + "---|" * len(BESIDE),
              "| | " + " | ".join(_cell(runs, n, key, versus_ln, corrected, hb) if n != LN else
                                  f"LN: {summary(list(by_seed(runs.get(LN, []), 'avg', key).values()))}"
                                  for n in BESIDE) + " |"]
    status = [f"- {LABELS[n]}: {status_line(runs.get(n, []))}" for n in (*GRID.values(), *BESIDE) if n]
    lines = [f"# What makes PowerNorm work: {table['short_title']}", "",
             f"Generated by `python scripts/make_results.py` from the run records in `results/runs/{corpus}/` "
             f"at the {cap}-epoch cap (`python scripts/reproduce.py {corpus} --campaign mechanism`). Do not "
             "edit by hand.", "",
             f"{table['metric']} of the paper protocol (the average of the last 5 epoch checkpoints), mean +- sd "
             f"over seeds ({better}); each norm minus LN with its paired 95% interval over seeds (uncorrected), "
             "t and p, and Holm's correction over every norm of this page (Holm p); a direction is named "
             "only where it holds after Holm. Runs capped at the cap unless the patience rule stopped them.", "",
             *grid, "", *beside, "", "## The questions (Holm over these five)", "",
             *[f"- {q}" for q in answers(runs, key, hb)], "", "## Runs", "", *status, ""]
    atomic_write_text(root / "results" / f"mechanism_{corpus}.md", "\n".join(lines) + "\n")
    return [f"- {table['short_title']} (cap {cap}, [`results/mechanism_{corpus}.md`](results/mechanism_{corpus}.md)): "
            + "; ".join(answers(runs, key, hb))]
