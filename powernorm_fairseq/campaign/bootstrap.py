"""sacreBLEU's paired bootstrap of each norm's averaged model against LN's of the same seed."""

from __future__ import annotations

from powernorm_fairseq.campaign.run import Run
from powernorm_fairseq.campaign.spec import LN, at_cap, recorded_cap


def significance(runs: list[Run]) -> None:
    """Paired bootstrap (sacreBLEU, 1000 samples) of each norm's averaged model against LN's of the
    same seed, on the test set, for the tokenized (paper) and the detokenized BLEU; stored in the
    norm's record as ``paired_bootstrap``, with the epoch cap both runs stood at (``cap``). LN is
    read at the norm's cap (its ending there, when a raised cap reopened it since: the mechanism
    campaign's runs compare with LN at the first cap), and is LN of the same campaign's records
    whether or not this call runs it. Needs both done at that cap; skipped when already there."""
    from powernorm_fairseq.analysis.stats import paired_bootstrap_bleu
    from powernorm_fairseq.pipeline.common import read_lines
    from powernorm_fairseq.pipeline.evaluate import RECIPES, load_prepared

    for run in runs:  # another process (or a reopened LN run) may have changed them
        run.refresh()
    by_key = {(r.corpus, r.norm, r.seed): r for r in runs}
    for run in runs:
        if run.norm == LN or run.spec.metric != "bleu" or "paired_bootstrap" in run.record:
            continue
        base = by_key.get((run.corpus, LN, run.seed)) or Run(run.corpus, LN, run.seed, run.args)
        cap = recorded_cap(run.record)
        ln = at_cap(base.record, cap)  # LN as it stood at this run's cap
        if run.record.get("status") != "done" or ln is None or ln.get("status") != "done":
            continue
        _, prep = load_prepared(run.root / run.spec.prepared)
        # the same casing as the evaluation's own BLEU (its recipe)
        lower = not RECIPES[run.record["evaluations"]["avg"]["recipe"]]["case_sensitive"]
        result, missing = {"vs": f"{LN}_s{run.seed}", "checkpoint": "avg", "cap": cap}, []
        for key, field, refs, tok in (("bleu_detok", "hypotheses", prep["references"]["detok"], "13a"),
                                      ("bleu_tokenized", "hypotheses_tokenized", prep["references"]["tok"], "none")):
            hyp, hyp_base = run.hypotheses(field), base.hypotheses(field, ln)
            if hyp is None or hyp_base is None:
                missing += [r.name for r, h in ((run, hyp), (base, hyp_base)) if h is None and r.name not in missing]
                continue
            result[key] = paired_bootstrap_bleu(read_lines(refs), read_lines(hyp_base), read_lines(hyp),
                                                tokenize=tok, lowercase=lower)
        if len(result) > 3:
            run.save(paired_bootstrap=result)
            run.log(f"paired bootstrap vs LN: p = {result.get('bleu_tokenized', {}).get('p_value')}")
        if missing:  # the tables say why this pair has no p-value; a later call tries again
            names = " and ".join(missing)
            reason = (f"the test translations of {names} are lost (a replaced machine); retrain "
                      f"{names} (reproduce --supersede {names.replace(' and ', ',')}) to test this pair")
            if run.record.get("paired_bootstrap_skipped") != reason:  # said once, not at every call
                run.save(paired_bootstrap_skipped=reason)
                run.log(f"paired bootstrap vs LN skipped: {reason}")
        elif "paired_bootstrap_skipped" in run.record:
            run.drop("paired_bootstrap_skipped")

