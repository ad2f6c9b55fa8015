"""The quickstart end to end at its smoke-test size, and its rerun that skips finished steps."""

import json
import subprocess

import pytest

from powernorm_fairseq import quickstart
from powernorm_fairseq.pipeline.common import read_lines


@pytest.mark.slow
def test_quickstart_tiny_runs_and_reruns_without_work(tmp_path, capsys, monkeypatch):
    from sacrebleu.metrics import BLEU

    out = tmp_path / "qs"
    rows = quickstart.main(["--tiny", "--out", str(out)])
    assert [r["norm"] for r in rows] == ["LN", "PN"]
    prep = json.loads((out / "data" / "prepare.json").read_text())
    refs = read_lines(prep["references"]["tok"])
    for norm, r in zip(("ln", "pn"), rows, strict=True):
        record = json.loads((out / "runs" / norm / "bleu.json").read_text())
        # the row is the evaluation of this norm's averaged checkpoint, and its BLEU is the
        # paper's (tokenized, lowercased) BLEU of that evaluation's hypotheses
        avg = out / "runs" / norm / "checkpoints" / "checkpoint_avg.pt"
        assert record["checkpoint"] == str(avg.resolve())
        hyps = read_lines(record["hypotheses_tokenized"])
        assert len(hyps) == len(refs) == r["n_test_sentences"] == prep["sizes"]["test"]
        expected = BLEU(tokenize="none", lowercase=True, force=True).corpus_score(hyps, [refs]).score
        assert r["bleu_tokenized"] == round(expected, 2)
        assert r["sacrebleu_detok"] == record["bleu_detok"]["score"]
        assert r["train_seconds"] > 0 and r["words_per_second"] > 0
        assert r["num_updates"] > 0
    table = capsys.readouterr().out
    assert "| LN |" in table and "| PN |" in table
    saved = json.loads((out / "results.json").read_text())
    assert saved["rows"] == rows

    # every step is skipped on a rerun: no fairseq process (no process but git) starts
    real_popen = subprocess.Popen

    def only_git(args, *a, **kw):
        if list(args)[:1] != ["git"]:
            raise AssertionError(f"the rerun started {args}")
        return real_popen(args, *a, **kw)

    monkeypatch.setattr(subprocess, "Popen", only_git)
    log_before = (out / "runs" / "pn" / "checkpoints" / "train.log").stat().st_mtime
    again = quickstart.main(["--tiny", "--out", str(out)])
    assert again == rows
    assert (out / "runs" / "pn" / "checkpoints" / "train.log").stat().st_mtime == log_before
