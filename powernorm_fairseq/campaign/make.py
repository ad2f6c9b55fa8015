"""Build the results tables and plots from the run records that ``scripts/reproduce.py`` writes.

Nothing here is typed by hand: every number comes from a record; the paper's numbers are in their
own, labelled columns (docs/SPEC.md sections 0 and 5). Rerun after any run finishes, from the project
directory (``--root`` names another; ``powernorm-results`` is the same command)::

    python scripts/make_results.py

Writes:

* ``results/table1_multi30k.md``, ``results/table2_ptb.md``: the main campaign (``--campaign converged``)
  (``results/runs/<corpus>/``): each norm over seeds (mean +- sd) for the paper's protocol (the
  average of the last 5 epoch checkpoints), the best and the last checkpoint; each norm minus LN
  with its paired 95% interval over seeds, and the paired bootstrap p-values for BLEU; the
  validation curves (mean over seeds with the min-max band).
* ``results/budget/README.md`` and the budget arithmetic in ``results/README.md``: the sizing run
  (``results/budget/<corpus>/``).
* ``results/analysis.md`` (between its ``converged`` markers) and its ``*_converged`` figures:
  Figs. 2-4 and 6 from the main campaign's records at the first cap (:func:`build_analyses`).
* ``results/pilot/table*.md``: the earlier short fixed budgets (``results/pilot/runs/``).
* README section 5, between its ``results:begin``/``results:end`` markers.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from powernorm_fairseq.campaign import spec
from powernorm_fairseq.campaign.analyses import build_analyses
from powernorm_fairseq.campaign.budget import build_budget
from powernorm_fairseq.campaign.leak_table import build_leak
from powernorm_fairseq.campaign.mechanism import build_mechanism
from powernorm_fairseq.campaign.pilot import build_pilot
from powernorm_fairseq.campaign.tables import build_converged
from powernorm_fairseq.campaign.view import PAPER_T1, PAPER_T2, SHORT
from powernorm_fairseq.pipeline.common import atomic_write_text

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
    for corpus, table in TABLES.items():
        build_pilot(corpus, table, root)
        corpus_spec = spec.CORPORA[corpus]
        caps = (*corpus_spec.earlier_caps, corpus_spec.max_epoch)
        lines, orders[corpus] = build_converged(corpus, table, {"patience": spec.PATIENCE, "caps": caps}, root)
        readme += lines
    if all(len(o) >= 2 for o in orders.values()):
        same = orders["multi30k"] == orders["ptb"]
        readme += ["Does the order hold on both corpora? Ordering of the means (paper protocol, best first): "
                   + "; ".join(f"{c}: {', '.join(SHORT[n] for n in o)}" for c, o in orders.items())
                   + (" (the same)." if same else " (not the same). Read it with the intervals above: "
                      "an ordering inside the intervals is not established."), ""]
    else:
        readme += ["Does the order hold on both corpora? Not answerable yet: too few finished runs.", ""]
    readme += ["**What makes PN work** (its ingredients apart and the norms of today, Holm over each corpus's "
               "five questions):", "", *[line for corpus, table in TABLES.items()
                                          for line in build_mechanism(corpus, table, root)], ""]
    readme += [*build_leak(root), ""]
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
