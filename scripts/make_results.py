#!/usr/bin/env python
"""Build ``results/table1_multi30k.md``, ``results/table2_ptb.md`` and the validation-loss plots
from the run records that ``scripts/reproduce.py`` writes to ``results/runs/<corpus>/*.json``.

Nothing here is typed by hand: every number comes from a record; the paper's numbers are in their
own, labelled columns (PAPER.md sections 0 and 5). Rerun after any run finishes::

    python scripts/make_results.py
"""

from __future__ import annotations

import json
import re
import statistics
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from powernorm_fairseq.pipeline.common import atomic_write_text  # noqa: E402

RESULTS = REPO / "results"
LABELS = {"ln": "LN", "bn": "BN", "pnv": "PN-V", "pn": "PN (reference variant)",
          "pnpaper": "PN (paper variant)"}
ORDER = ["ln", "bn", "pnv", "pn", "pnpaper"]
# The paper's numbers (PAPER.md section 0: confirmed by the paper's text). PN in the paper was
# trained with the released code, i.e. our "reference" variant.
PAPER_T1 = {"ln": (35.5, 29.5), "bn": (34.4, 28.1), "pnv": (35.4, 28.5), "pn": (35.9, 30.1)}
PAPER_T2 = {"ln": (53.2, 20.9), "bn": (60.7, 27.2), "pnv": (55.3, 21.3), "pn": (47.6, 17.9)}


def load(corpus: str) -> dict[str, list[dict]]:
    runs: dict[str, list[dict]] = {}
    for p in sorted((RESULTS / "runs" / corpus).glob("*.json")):
        rec = json.loads(p.read_text())
        rec["_file"] = str(p.relative_to(REPO))
        runs.setdefault(rec["norm"], []).append(rec)
    return runs


def summary(values: list[float]) -> str:
    if not values:
        return "not run"
    if len(values) == 1:
        return f"{values[0]:.2f} (1 seed)"
    return (f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f} "
            f"({len(values)} seeds, range {min(values):.2f}-{max(values):.2f})")


def metric(rec: dict, key: str) -> float | None:
    """``key`` of the record's evaluation of the averaged checkpoints; ``<key>_last``: of its
    last checkpoint (``reproduce.py --eval-last``)."""
    ev = rec.get("evaluation") or {}
    if key.endswith("_last"):
        ev, key = rec.get("evaluation_last") or {}, key[: -len("_last")]
    if rec.get("status") != "done" or not ev:
        return None
    if key == "ppl":
        return ev.get("value")
    if key == "len_ratio":  # hypothesis/reference length from sacrebleu's detail line
        m = re.search(r"ratio = ([\d.]+)", (ev.get("bleu_tokenized") or {}).get("detail", ""))
        return float(m.group(1)) if m else None
    return (ev.get(key) or {}).get("score")


def speed(recs: list[dict]) -> str:
    wps = [r["median_train_wps"] for r in recs if r.get("median_train_wps")]
    return f"{statistics.median(wps):.0f}" if wps else "-"


def status_line(recs: list[dict]) -> str:
    return ", ".join(f"s{r['seed']}: {r.get('status')}"
                     + (f" ({r['progress']})" if r.get("status") == "unfinished" and r.get("progress") else "")
                     for r in recs) or "not run"


def runs_table(runs: dict[str, list[dict]]) -> list[str]:
    lines = ["| run | status | seed | commit (training) | hardware | training time (s, fairseq) | eval wall (s) | final valid loss | record |",
             "|---|---|---|---|---|---|---|---|---|"]
    for norm in ORDER:
        for r in runs.get(norm, []):
            seg = r.get("train_segments") or [{}]
            hw = r.get("hardware") or {}
            hw_s = f"{hw.get('cpu', '?')}, {hw.get('threads') or '?'} thread(s), torch {hw.get('torch', '?')}"
            vl = r.get("valid_loss") or []
            last = f"{vl[-1][1]:.3f} @ {vl[-1][0]}" if vl else "-"
            commit = seg[-1].get("commit") or r.get("trained_by_commit") or r.get("started_commit", "-")
            lines.append(f"| {LABELS[norm]} | {r.get('status')} | {r['seed']} | {commit} | "
                         f"{hw_s} | {r.get('fairseq_train_s', '-')} | {r.get('eval_wall_s', '-')} | {last} | "
                         f"`{r['_file']}` |")
    return lines


def plot(runs: dict[str, list[dict]], out: Path, title: str) -> bool:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    drawn = False
    for norm in ORDER:
        for r in runs.get(norm, []):
            vl = r.get("valid_loss") or []
            if vl:
                ax.plot([u for u, _ in vl], [v for _, v in vl], marker="o", ms=3,
                        label=f"{LABELS[norm]} s{r['seed']}")
                drawn = True
    if not drawn:
        plt.close(fig)
        return False
    ax.set_xlabel("updates")
    ax.set_ylabel("validation loss (base 2)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    tmp = out.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(out)
    return True


def common_valid(runs: dict[str, list[dict]]) -> tuple[int | None, dict[str, float]]:
    """Validation loss of every run at the largest update count that every run has reached.

    Unfinished runs still give a fair comparison at equal training (same presets, same updates).
    """
    curves = [(norm, dict((u, v) for u, v in r.get("valid_loss") or []))
              for norm in ORDER for r in runs.get(norm, [])]
    curves = [(n, c) for n, c in curves if c]
    if not curves:
        return None, {}
    shared = set.intersection(*(set(c) for _, c in curves))
    if not shared:
        return None, {}
    step = max(shared)
    per_norm: dict[str, list[float]] = {}
    for norm, c in curves:
        per_norm.setdefault(norm, []).append(c[step])
    return step, {n: statistics.mean(v) for n, v in per_norm.items()}


def ordering(scores: dict[str, float], higher_better: bool) -> str:
    keys = sorted(scores, key=lambda k: scores[k], reverse=higher_better)
    return ", ".join(LABELS[k].split(" (")[0] if k != "pnpaper" else "PN-paper" for k in keys) + " (best first)"


def agreement(ours: dict[str, float], paper: dict[str, float], higher_better: bool) -> list[str]:
    """Plain statements of where our ordering agrees with the paper's."""
    out = []
    common = [k for k in ("ln", "bn", "pnv", "pn") if k in ours]
    if len(common) < 2:
        return ["Too few finished runs to compare orderings."]
    better = (lambda a, b: a > b) if higher_better else (lambda a, b: a < b)
    out.append(f"Paper's ordering: {ordering({k: paper[k] for k in common}, higher_better)}. "
               f"Ours: {ordering({k: ours[k] for k in common}, higher_better)}.")
    for a, b in (("pn", "ln"), ("ln", "bn"), ("pnv", "bn"), ("pn", "pnv"), ("ln", "pnv")):
        if a in ours and b in ours:
            same = better(ours[a], ours[b]) == better(paper[a], paper[b])
            verb = "agrees" if same else "DISAGREES"
            out.append(f"- {LABELS[a]} vs {LABELS[b]}: paper {paper[a]} vs {paper[b]}; ours "
                       f"{ours[a]:.2f} vs {ours[b]:.2f}: {verb}.")
    return out


TABLES = {
    "multi30k": {
        "file": "table1_multi30k.md",
        "plot_title": "Multi30k de-en, CPU scale",
        "intro": [
            "# Table 1 at CPU scale: Multi30k De->En (stand-in for IWSLT14/WMT14)",
            "",
            "Setup: presets `configs/multi30k_{ln,bn,pnv,pn,pnpaper}.yaml`, identical except the encoder's norm",
            "(released wiring: the decoder keeps LN); a 2+2-layer d-128 pre-norm transformer trained for a",
            "fixed, short budget on 2 CPU cores; the last 3 checkpoints (100 updates apart) averaged; beam 5,",
            "lenpen 1.0 (the paper's IWSLT14 settings) on test2016 (1,000 sentences). **These runs are far",
            "from converged and far smaller than the paper's**; they test whether the ordering of the norms",
            "shows up early in training, not the paper's absolute numbers. Words/s were measured while",
            "several runs shared the 2 cores: they are not a speed comparison (see `benchmarks/`).",
            "Seed 1 ran with the norms' eager torch path, seed 2 with the fused CPU kernels added later",
            "(the same arithmetic up to float rounding; each run's commit is in the runs table).",
        ],
        "paper": PAPER_T1, "paper_cols": ("paper IWSLT14 BLEU", "paper WMT14 BLEU"),
        "metrics": (("bleu_tokenized", "ours: Multi30k BLEU (tokenized, case-insensitive)"),
                    ("bleu_detok", "ours: sacreBLEU (detok.)"),
                    ("len_ratio", "ours: hyp/ref length")),
        "last_metrics": (("bleu_tokenized_last", "ours: BLEU (tokenized), last checkpoint"),),
        "higher_better": True,
        "gap": "PN - LN: paper +0.4 (IWSLT14) / +0.6 (WMT14)",
        "agreement_title": "## Agreement with the paper (IWSLT14 column)",
    },
    "ptb": {
        "file": "table2_ptb.md",
        "plot_title": "PTB word LM, CPU scale",
        "intro": [
            "# Table 2 at CPU scale: Penn Treebank language modelling",
            "",
            "Setup: presets `configs/ptb_cpu_{ln,bn,pnv,pn,pnpaper}.yaml`, identical except the norm (at every",
            "decoder site); a 2-layer d-128 pre-norm fairseq Transformer LM, a short fixed budget on 2 CPU",
            "cores. The paper used a tensorized Transformer (Ma et al. 2019) whose code is not in fairseq,",
            "trained ~80 epochs; **our numbers are not comparable in absolute terms**. Words/s were",
            "measured while several runs shared the 2 cores: they are not a speed comparison.",
            "Seed 1 ran with the norms' eager torch path, seed 2 with the fused CPU kernels added later",
            "(the same arithmetic up to float rounding; each run's commit is in the runs table).",
        ],
        "paper": PAPER_T2, "paper_cols": ("paper PTB PPL", "paper WikiText-103 PPL"),
        "metrics": (("ppl", "ours: PTB test PPL"),),
        "last_metrics": (("ppl_last", "ours: PTB test PPL, last checkpoint"),),
        "higher_better": False,
        "gap": "PN - LN: paper -5.6 (PTB) / -3.0 (WikiText-103)",
        "agreement_title": "## Agreement with the paper (PTB column)",
    },
}


def build_table(corpus: str, spec: dict) -> None:
    """One results table: the paper's columns, ours from the records, agreement, plot, runs."""
    runs = load(corpus)
    png = f"{corpus}_valid_loss.png"
    plotted = plot(runs, RESULTS / png, spec["plot_title"])
    step, vl = common_valid(runs)
    metrics = list(spec["metrics"])
    if any(r.get("evaluation_last") for recs in runs.values() for r in recs):
        metrics += spec.get("last_metrics", ())
    ours_cols = [label for _, label in metrics]
    lines = [*spec["intro"][:2],
             f"Generated by `python scripts/make_results.py` from the run records in `results/runs/{corpus}/`",
             f"(written by `python scripts/reproduce.py {corpus} ...`). Do not edit by hand.", "",
             *spec["intro"][2:], "",
             "| norm | " + " | ".join([*spec["paper_cols"], *ours_cols,
                                       f"ours: valid loss @ {step if step is not None else '-'} updates",
                                       "ours: train words/s (median)", "runs"]) + " |",
             "|---|" + "---|" * (len(spec["paper_cols"]) + len(ours_cols) + 3)]
    ours = {}
    for norm in ORDER:
        recs = runs.get(norm, [])
        values = [[v for r in recs if (v := metric(r, key)) is not None] for key, _ in metrics]
        if values[0]:
            ours[norm] = statistics.mean(values[0])
        paper = spec["paper"].get(norm, ("-", "-"))
        cells = [LABELS[norm], *map(str, paper),
                 *(summary(v) if v or not key.endswith("_last") else "-"
                   for v, (key, _) in zip(values, metrics, strict=True)),
                 f"{vl[norm]:.3f}" if norm in vl else "-", speed(recs), status_line(recs)]
        lines.append("| " + " | ".join(cells) + " |")
    gaps = [f"{ours[k] - ours['ln']:+.2f} ({'reference' if k == 'pn' else 'paper'} variant)"
            for k in ("pn", "pnpaper") if {k, "ln"} <= set(ours)]
    if len(metrics) > len(spec["metrics"]):
        lines += ["", "The averaged-checkpoint columns are the paper's protocol (average of the last "
                  "checkpoints); the last-checkpoint column evaluates the final weights alone "
                  "(`reproduce.py --eval-last`), for the runs whose checkpoints were still on disk; "
                  "the orderings below use the averaged checkpoints."]
    lines += ["", f"{spec['gap']}; ours: {', '.join(gaps) or 'n/a'}", "", spec["agreement_title"], ""]
    lines += agreement(ours, {k: v[0] for k, v in spec["paper"].items()}, spec["higher_better"])
    if len(vl) >= 2:
        lines += ["", f"Validation loss at {step} updates (lower is better), every run including "
                  f"unfinished ones: {ordering(vl, higher_better=False)}."]
    if plotted:
        lines += ["", "## Validation loss", "", f"![validation loss]({png})"]
    lines += ["", "## Runs", ""] + runs_table(runs)
    lines += ["", "Commands: each record holds the exact training and evaluation commands."]
    atomic_write_text(RESULTS / spec["file"], "\n".join(lines) + "\n")


def readme_section() -> None:
    """Copy the two tables' headline rows into the README between the results markers."""
    readme = REPO / "README.md"
    text = readme.read_text()
    begin, end = "<!-- results:begin -->", "<!-- results:end -->"
    if begin not in text or end not in text:
        return
    parts = []
    for name, title in (("table1_multi30k.md", "Multi30k (Table 1 at CPU scale)"),
                        ("table2_ptb.md", "PTB (Table 2 at CPU scale)")):
        body = (RESULTS / name).read_text().splitlines()
        table = [ln for ln in body if ln.startswith("|")]
        table = table[: table.index(next(ln for ln in table[2:] if not ln.startswith("| ") or ln.startswith("| run")))] \
            if any(ln.startswith("| run") for ln in table) else table
        notes = []
        for ln in body:
            if ln.startswith(("PN - LN", "Paper's ordering", "Validation loss at")):
                notes += ["", ln]
            elif ln.startswith("- "):
                notes += ([""] if notes and not notes[-1].startswith("- ") else []) + [ln]
        parts += [f"**{title}** (details, runs and plots: [`results/{name}`](results/{name}))", "",
                  *table, "", *notes, ""]
    new = text[: text.index(begin) + len(begin)] + "\n" + "\n".join(parts) + text[text.index(end):]
    atomic_write_text(readme, new)


def main(argv: list[str] | None = None) -> None:
    import argparse

    # parsed before any work, so that --help only prints (it used to rewrite README.md and tables);
    # main() called from Python (no argv) takes no arguments rather than the caller's sys.argv
    argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
                            ).parse_args([] if argv is None else argv)
    for corpus, spec in TABLES.items():
        build_table(corpus, spec)
    readme_section()
    print(f"wrote {RESULTS / 'table1_multi30k.md'} and {RESULTS / 'table2_ptb.md'}")


if __name__ == "__main__":
    main(sys.argv[1:])
