"""The campaigns as data: corpora, campaigns, the stopping rule, and a record at a cap.

Every setting of a campaign lives here once (``CORPORA``, ``CAMPAIGNS``); nothing here runs or
writes anything. What the campaigns are and how they run: :mod:`powernorm_fairseq.campaign`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from powernorm_fairseq.presets import PAPER_NORMS


@dataclass(frozen=True)
class Corpus:
    prefix: str        # presets <prefix>_<norm> (configs/base/<prefix>.yaml with configs/norm/<norm>.yaml)
    prepared: str      # the prepared directory (prepare_<corpus>.sh)
    metric: str        # "bleu" or "ppl" (powernorm_fairseq.pipeline.evaluate)
    max_epoch: int     # the converged campaign's cap (results/README.md: the budget arithmetic)
    earlier_caps: tuple[int, ...] = ()  # caps it had before: the tables show the runs at each too


CORPORA = {
    # 30 until session 17 (every run stopped there, results/README.md); raised for the paper's
    # stopping rule (issue 37): the tables keep each run's ending at 30 too (earlier_caps)
    "multi30k": Corpus("multi30k", "data/multi30k", "bleu", max_epoch=80, earlier_caps=(30,)),
    # the paper's PTB model, the Tensorized Transformer (multi-linear attention), at CPU scale
    "ptb": Corpus("ptb_cpu_tensorized", "data/ptb", "ppl", max_epoch=12),
}

NORMS = PAPER_NORMS  # the converged campaign's
LN = NORMS[0]  # the baseline every norm is compared with
PATIENCE = 5        # the released --early-stop 5
AVERAGE_EPOCHS = 5  # the paper averages the last 5 epoch checkpoints
# what a run's end produced; a done run reopened for a raised epoch cap (Run.reopen) sets them aside
REOPENED = ("evaluations", "paired_bootstrap", "paired_bootstrap_skipped", "embedding_spectrum", "averaged",
            "stopped_by", "commit", "norm_stats", "kept_hypotheses")
# the averaged model's test translations (fields of its "avg" evaluation) that the paired bootstrap
# reads; kept beside the record, since the run directory is lost with a replaced machine
HYPOTHESES = {"hypotheses": "avg.hyp.txt", "hypotheses_tokenized": "avg.hyp.tok.txt"}
CONVERGED_SEEDS = (1, 2, 3)  # the issue's >= 3 seeds; status.md lists every one of them
SUPERSEDED = "superseded"  # records set aside for a retrain (Run.supersede), in the records folder


def _to_convergence(corpus: Corpus, keep_last_epochs: int, max_epoch: int | None = None) -> list[str]:
    """Hydra overrides that turn a fixed-budget preset into a run to convergence."""
    return ["optimization.max_update=0", f"optimization.max_epoch={max_epoch or corpus.max_epoch}",
            f"checkpoint.patience={PATIENCE}", "checkpoint.save_interval_updates=0",
            "checkpoint.keep_interval_updates=-1", f"checkpoint.keep_last_epochs={keep_last_epochs}"]


@dataclass(frozen=True)
class Campaign:
    records: str                 # results/<...>/<corpus>/<norm>_s<seed>.json
    overrides: object            # Corpus -> list of hydra overrides
    evaluations: tuple[str, ...]  # which checkpoints are evaluated (see Run.checkpoint_for)
    average: tuple[str, int]     # ("epoch" | "update", how many) for the "avg" evaluation
    significance: bool = False   # paired bootstrap against LN of the same seed (BLEU)
    prefixes: tuple = ()         # (corpus, preset prefix) pairs that differ from CORPORA's
    tracked: tuple = ()          # (corpus, seed) pairs whose runs record the norm statistics
    norms: tuple = NORMS         # its norm configurations (configs/norm/), in its tables' order
    complete: bool = False       # its status table lists every norm x CONVERGED_SEEDS, run or not
    runs: str | None = None      # run directories runs/<runs>/<corpus>/ (None: the campaign's name)
    resume: str | None = None    # the arguments after <corpus> that resume it (None: it is not resumed)
    resume_corpora: tuple | None = None  # the corpora it resumes on (None: every corpus with runs left)
    leak_probe: bool = False     # its finished runs are probed for a leak (analysis.leak)

    def prefix(self, corpus: str) -> str:
        return dict(self.prefixes).get(corpus, CORPORA[corpus].prefix)


def first_cap(corpus: Corpus) -> int:
    """The corpus's first cap: where the converged campaign's capped comparison stands."""
    return (*corpus.earlier_caps, corpus.max_epoch)[0]


CAMPAIGNS = {
    # Multi30k seed 1 of every norm records the first encoder norm's statistics (Figs. 2-4)
    "converged": Campaign("results/runs", lambda c: _to_convergence(c, AVERAGE_EPOCHS),
                          ("avg", "best", "last"), ("epoch", AVERAGE_EPOCHS), significance=True,
                          tracked=(("multi30k", 1),), complete=True,
                          resume="--seeds 1,2,3 --threads 1 --commit"),
    # issue 36: PN's ingredients apart and the norms of today, with the converged campaign's
    # settings, protocol and seeds at its capped comparison (Multi30k 30 epochs, PTB 12); its
    # records sit beside the converged ones (the same LN of each seed is their baseline)
    "mechanism": Campaign("results/runs", lambda c: _to_convergence(c, AVERAGE_EPOCHS, max_epoch=first_cap(c)),
                          ("avg", "best", "last"), ("epoch", AVERAGE_EPOCHS), significance=True,
                          norms=("rms", "group_rms", "pnpaper_gs", "dyt", "pnv_gs"), complete=True,
                          resume="--campaign mechanism --seeds 1,2,3 --threads 1 --commit"),
    # issue 36 item 6: the Tensorized Transformer authors' attention (its causal mask never
    # applied) on PTB with the main campaign's settings, LN and PN, one seed, probed for the leak
    "leak": Campaign("results/leak", lambda c: [*_to_convergence(c, AVERAGE_EPOCHS, max_epoch=first_cap(c)),
                                                "model.multilinear_unmasked=true"],
                     ("avg",), ("epoch", AVERAGE_EPOCHS), norms=("ln", "pn"), leak_probe=True,
                     resume="--campaign leak --seeds 1 --threads 1 --commit", resume_corpora=("ptb",)),
    # keeps every epoch checkpoint, with a higher cap: the run that sizes the campaign
    "budget": Campaign("results/budget", lambda c: _to_convergence(c, -1, max_epoch=80),
                       ("avg", "best", "last"), ("epoch", AVERAGE_EPOCHS),
                       resume="--campaign budget --norms ln --seeds 1 --threads 1", resume_corpora=("multi30k",)),
    # the pilot's PTB model was fairseq's standard transformer_lm_pn (configs/ptb_cpu_<norm>.yaml);
    # its run directories predate the campaigns (runs/<corpus>/)
    "pilot": Campaign("results/pilot/runs", lambda c: [], ("avg",), ("update", 3),
                      prefixes=(("ptb", "ptb_cpu"),), runs=""),
}


# how a finished converged run stopped: the start of its record's ``stopped_by``
STOP_PATIENCE, STOP_CAP = "patience", "epoch cap"


def stopped_by(record: dict, reason: str) -> bool:
    """Whether ``record`` stopped for ``reason`` (:data:`STOP_PATIENCE` or :data:`STOP_CAP`)."""
    return str(record.get("stopped_by") or "").startswith(reason)


def recorded_cap(record: dict) -> int | None:
    """The epoch cap a record's run trained to: its ``max_epoch``, else its training command's."""
    if record.get("max_epoch"):
        return record["max_epoch"]
    caps = re.findall(r"optimization\.max_epoch=(\d+)", record.get("command", ""))
    return int(caps[-1]) if caps else None


def _bootstrap_at(view: dict, cap: int | None) -> dict:
    """``view`` with the paired bootstrap of its ending at ``cap``: its own when it compared
    endings at that cap, else the last one set aside (``earlier_paired_bootstrap``) that did, else
    none. A bootstrap that names no cap was computed before any cap was raised: at the corpus's
    first cap. (A record reopened for a raised cap keeps its new bootstrap beside its ending at the
    old cap, and a set-aside one beside a run training to the new cap: neither is read at the
    other cap.)"""
    if cap is None:
        return view
    first = first_cap(CORPORA[view["corpus"]]) if view.get("corpus") in CORPORA else cap

    def at(bootstrap: dict) -> bool:
        return bootstrap.get("cap", first) == cap

    own = view.get("paired_bootstrap")
    earlier = [b for b in view.get("earlier_paired_bootstrap") or [] if at(b)]
    if (own is not None and at(own)) or (own is None and not earlier):
        return view
    view = {k: v for k, v in view.items() if k != "paired_bootstrap"}
    return {**view, "paired_bootstrap": earlier[-1]} if earlier else view


def at_cap(record: dict, cap: int | None) -> dict | None:
    """The run of ``record`` as it stood at the epoch cap ``cap`` (None: as it is): the record
    itself when it trains to that cap, else its ending at that cap (``earlier_caps``, written
    when a raised cap reopened it: :meth:`Run.reopen`), a done run whose curve stops at ``cap``;
    None when the run has no ending at ``cap`` (it never trained to it). A record that names no
    cap, or that the stopping rule stopped below ``cap``, is taken as it is. A run at its own cap
    whose paired bootstrap was set aside because LN's ending changed since (a raised cap reopened
    LN) reads its last one: the comparison of the endings at that cap."""
    own = recorded_cap(record)
    if cap is None or own in (None, cap) or (stopped_by(record, STOP_PATIENCE) and own < cap):
        return _bootstrap_at(record, cap) if own == cap else record
    ending = next((e for e in record.get("earlier_caps", []) if e.get("max_epoch") == cap), None)
    if ending is None:
        return None
    view = _bootstrap_at({**record, **ending, "status": "done"}, cap)
    if not ending.get("retrained"):  # trained on from that ending: its curve goes on past the cap
        view["valid_loss_by_epoch"] = [p for p in record.get("valid_loss_by_epoch", []) if p[0] <= cap]
        view["epochs"] = [e for e in record.get("epochs", []) if e["epoch"] <= cap]
        last_update = max((e["num_updates"] for e in view["epochs"]), default=0)
        view["valid_loss"] = [p for p in record.get("valid_loss", []) if p[0] <= last_update]
        if view["valid_loss_by_epoch"]:
            best = min(view["valid_loss_by_epoch"], key=lambda p: (p[1], p[0]))
            view.update(last_epoch=view["valid_loss_by_epoch"][-1][0], best_epoch=best[0], best_valid_loss=best[1])
    for key in ("earlier_caps", "continued_from"):
        view.pop(key, None)
    return view

