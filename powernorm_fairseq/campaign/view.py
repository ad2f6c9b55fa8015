"""The records as the tables read them: by norm, at a cap, with the labels of configs/norm/ and
the paper's numbers in their own columns. Nothing here writes."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

from powernorm_fairseq.campaign import spec
from powernorm_fairseq.presets import PAPER_NORMS, ordered_norm_configs

# every norm configuration's labels (configs/norm/<short>.yaml), the paper's first
LABELS = {c.short: c.label for c in ordered_norm_configs()}
SHORT = {c.short: c.short_label for c in ordered_norm_configs()}
ORDER = list(PAPER_NORMS)  # the main campaign's tables (--campaign converged)
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
    cap (``spec.at_cap``: a run reopened since by a raised cap is read from its ending at
    ``cap``; a run without one is left out). A run superseded for a retrain
    (``reproduce --supersede``) is read from its set-aside record until the retrain is done, so
    the tables never lose a finished run meanwhile; ``_retrain`` then says where the retrain is."""
    runs: dict[str, list[dict]] = {}
    for p in sorted(records.glob("*.json")):
        rec = spec.at_cap(json.loads(p.read_text()), cap)
        if rec is None:
            continue
        rec["_file"] = str(p.relative_to(root))
        runs.setdefault(rec["norm"], []).append(rec)
    for p in sorted((records / spec.SUPERSEDED).glob("*.json")):  # by stamp: the latest last
        old = spec.at_cap(json.loads(p.read_text()), cap)
        if old is None:  # set aside at another cap: not a stand-in at this one
            continue
        recs = runs.setdefault(old["norm"], [])
        now = next((r for r in recs if r["seed"] == old["seed"]), None)
        if now is not None and now.get("status") == "done":
            continue
        if now is not None:
            recs.remove(now)
        if old.get("norm_stats"):  # kept beside it, in the superseded folder
            old["norm_stats"] = f"{spec.SUPERSEDED}/{old['norm_stats']}"
        recs.append({**old, "_file": str(p.relative_to(root)),
                     "_retrain": (now or {}).get("_retrain") or (now or {}).get("status") or "to do"})
    for recs in runs.values():
        recs.sort(key=lambda r: r["seed"])
    return runs


def first_cap(corpus: str) -> int:
    """The epoch cap the corpus's tables read the runs at: its first (Multi30k: 30 epochs, where
    every run stopped before the cap was raised; ``spec.CORPORA``)."""
    return spec.first_cap(spec.CORPORA[corpus])


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


def score(rec: dict, which: str, key: str) -> float | None:
    """``key`` (``bleu_tokenized``, ``bleu_detok``, ``ppl``) of evaluation ``which`` of a done run."""
    ev = (rec.get("evaluations") or {}).get(which)
    if rec.get("status") != "done" or not ev:
        return None
    return ev.get("value") if key == "ppl" else (ev.get(key) or {}).get("score")


def by_seed(recs: list[dict], which: str, key: str) -> dict[int, float]:
    return {r["seed"]: v for r in recs if (v := score(r, which, key)) is not None}

