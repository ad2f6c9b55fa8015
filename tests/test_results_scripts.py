"""scripts/reproduce.py and scripts/make_results.py: log parsing and tables built from records only."""

import importlib.util
import json
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def load_script(name):
    spec = importlib.util.spec_from_file_location(name, REPO / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


LOG = """\
[2026-11-22 07:23:37,072][train_inner][INFO] - epoch 001:     25 / 124 loss=12.786, nll_loss=12.678, ppl=6553.6, wps=431.7, ups=0.12, wpb=3424.5, num_updates=25
[2026-11-22 07:26:27,618][train_inner][INFO] - epoch 001:     50 / 124 loss=10.883, nll_loss=10.557, ppl=1506.91, wps=538.4, ups=0.15, wpb=3604.8, num_updates=50
[2026-11-22 07:32:17,540][valid][INFO] - epoch 001 | valid on 'valid' subset | loss 8.539 | nll_loss 7.755 | ppl 215.96 | wps 1790.4 | wpb 2560.3 | bsz 169 | num_updates 100
[2026-11-22 07:34:06,440][valid][INFO] - epoch 001 | valid on 'valid' subset | loss 8.234 | nll_loss 7.411 | ppl 170.14 | wps 2082.8 | wpb 2560.3 | bsz 169 | num_updates 124 | best_loss 8.234
[2026-11-22 07:34:06,500][train][INFO] - epoch 001 | loss 11.2 | nll_loss 11.0 | ppl 2000 | wps 500.5 | ups 0.15 | wpb 3400 | bsz 240 | num_updates 124 | lr 0.001 | gnorm 1.0 | train_wall 800 | wall 820
[2026-11-22 07:40:00,000][fairseq_cli.train][INFO] - done training in 100.5 seconds
[2026-11-22 07:50:00,000][fairseq_cli.train][INFO] - done training in 20.0 seconds
"""


def test_parse_log_reads_curve_speed_and_time(tmp_path):
    reproduce = load_script("reproduce")
    log = tmp_path / "train.log"
    log.write_text(LOG)
    parsed = reproduce.parse_log(log)
    assert parsed["valid_loss"] == [[100, 8.539], [124, 8.234]]
    assert parsed["median_train_wps"] == 538.4
    assert parsed["fairseq_train_s"] == 120.5  # resumed segments add up
    assert parsed["epochs"] == [{"epoch": 1, "wps": 500.5, "num_updates": 124, "train_wall": 800}]


@pytest.fixture
def results_dir(tmp_path, monkeypatch):
    make_results = load_script("make_results")
    monkeypatch.setattr(make_results, "RESULTS", tmp_path / "results")
    monkeypatch.setattr(make_results, "REPO", tmp_path)
    (tmp_path / "README.md").write_text("intro\n<!-- results:begin -->\nold\n<!-- results:end -->\nrest\n")
    runs = tmp_path / "results" / "runs" / "multi30k"
    runs.mkdir(parents=True)
    for norm, bleu, status in (("ln", 20.0, "done"), ("pn", 21.5, "done"), ("bn", None, "unfinished")):
        rec = {"norm": norm, "seed": 1, "status": status, "valid_loss": [[100, 6.0], [200, 5.5]],
               "median_train_wps": 600.0, "hardware": {"cpu": "test"}}
        if bleu is not None:
            rec["evaluation"] = {"bleu_tokenized": {"score": bleu, "detail": "BLEU = x (ratio = 1.010)"},
                                 "bleu_detok": {"score": bleu - 0.1}}
        else:
            rec["progress"] = "last validation at update 200"
        (runs / f"{norm}_s1.json").write_text(json.dumps(rec))
    return make_results, tmp_path


def test_tables_come_from_records_and_mark_unfinished_runs(results_dir):
    make_results, root = results_dir
    make_results.main()
    table = (root / "results" / "table1_multi30k.md").read_text()
    assert "| LN | 35.5 | 29.5 | 20.00 (1 seed) | 19.90 (1 seed) | 1.01 (1 seed) | 5.500 |" in table
    assert "ours: +1.50 (reference variant)" in table
    assert "unfinished (last validation at update 200)" in table
    assert "| PN-V | 35.4 | 28.5 | not run |" in table
    assert (root / "results" / "multi30k_valid_loss.png").stat().st_size > 0
    readme = (root / "README.md").read_text()
    assert "old" not in readme and "| LN | 35.5" in readme and readme.endswith("rest\n")
    ptb = (root / "results" / "table2_ptb.md").read_text()
    assert "| LN | 53.2 | 20.9 | not run |" in ptb
