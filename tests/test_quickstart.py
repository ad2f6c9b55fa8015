"""The quickstart end to end at its smoke-test size, and its rerun that skips finished steps."""

import json
import time

import pytest

from powernorm_fairseq import quickstart


@pytest.mark.slow
def test_quickstart_tiny_runs_and_reruns_without_work(tmp_path, capsys):
    out = tmp_path / "qs"
    rows = quickstart.main(["--tiny", "--out", str(out)])
    assert [r["norm"] for r in rows] == ["LN", "PN"]
    test_size = json.loads((out / "data" / "prepare.json").read_text())["sizes"]["test"]
    for r in rows:
        assert 0.0 <= r["bleu_tokenized"] <= 100.0 and 0.0 <= r["sacrebleu_detok"] <= 100.0
        assert r["n_test_sentences"] == test_size
        assert r["train_seconds"] > 0 and r["words_per_second"] > 0
        assert r["num_updates"] > 0
    table = capsys.readouterr().out
    assert "| LN |" in table and "| PN |" in table
    saved = json.loads((out / "results.json").read_text())
    assert saved["rows"] == rows

    log_before = (out / "runs" / "pn" / "checkpoints" / "train.log").stat().st_mtime
    t0 = time.time()
    again = quickstart.main(["--tiny", "--out", str(out)])
    assert time.time() - t0 < 10  # every step is skipped: no fairseq process starts
    assert again == rows
    assert (out / "runs" / "pn" / "checkpoints" / "train.log").stat().st_mtime == log_before
