"""Checkpoint averaging: means of float tensors, counters from the newest, loud refusals."""

import subprocess
import sys
from argparse import Namespace
from pathlib import Path

import pytest
import torch

from powernorm_fairseq.pipeline import average

REPO = Path(__file__).resolve().parents[1]


def make_ckpt(path, scale, updates, *, arch="transformer_pn_tiny", layers=2, extra_key=False,
              shape=(3, 4)):
    model = {
        "encoder.w": torch.full(shape, float(scale)),
        "encoder.norm.running_phi": torch.full((1, 4, 1, 1), float(scale) * 2),
        "encoder.norm.iters": torch.tensor([updates], dtype=torch.long),
        "encoder.bn.num_batches_tracked": torch.tensor(updates, dtype=torch.long),
        "encoder.half": torch.full((2,), float(scale), dtype=torch.float16),
    }
    if extra_key:
        model["encoder.extra"] = torch.zeros(1)
    state = {"model": model,
             "cfg": {"model": Namespace(arch=arch, encoder_layers=layers, max_update=updates)},
             "optimizer_history": [{"num_updates": updates}]}
    torch.save(state, path)
    return path


def test_average_means_floats_and_keeps_counters_from_newest(tmp_path):
    paths = [make_ckpt(tmp_path / f"checkpoint{i}.pt", scale=i, updates=10 * i) for i in (1, 2, 3)]
    out = tmp_path / "avg.pt"
    summary = average.average_checkpoints(paths, out)
    state = torch.load(out, weights_only=False)
    assert torch.equal(state["model"]["encoder.w"], torch.full((3, 4), 2.0))
    assert torch.equal(state["model"]["encoder.norm.running_phi"], torch.full((1, 4, 1, 1), 4.0))
    assert state["model"]["encoder.half"].dtype == torch.float16
    assert state["model"]["encoder.norm.iters"].item() == 30  # newest, not the mean 20
    assert state["model"]["encoder.bn.num_batches_tracked"].item() == 30
    assert state["averaged_from"] == [str(p) for p in paths]
    assert "encoder.norm.iters" in summary["kept_from_newest"]
    assert not list(tmp_path.glob(".*tmp"))  # atomic write left no temp file


def test_newest_is_chosen_by_updates_not_order(tmp_path):
    a = make_ckpt(tmp_path / "a.pt", scale=1, updates=50)
    b = make_ckpt(tmp_path / "b.pt", scale=3, updates=20)
    average.average_checkpoints([a, b], tmp_path / "avg.pt")
    state = torch.load(tmp_path / "avg.pt", weights_only=False)
    assert state["model"]["encoder.norm.iters"].item() == 50


def test_find_last_epoch_and_update_checkpoints(tmp_path):
    for e in (1, 2, 3, 10):
        make_ckpt(tmp_path / f"checkpoint{e}.pt", e, e)
    for u in (100, 200, 1000):
        make_ckpt(tmp_path / f"checkpoint_3_{u}.pt", 1, u)
    make_ckpt(tmp_path / "checkpoint_last.pt", 1, 1)
    assert [p.name for p in average.find_checkpoints(tmp_path, 2, "epoch")] == ["checkpoint3.pt", "checkpoint10.pt"]
    assert [p.name for p in average.find_checkpoints(tmp_path, 2, "update")] == ["checkpoint_3_200.pt", "checkpoint_3_1000.pt"]
    with pytest.raises(SystemExit, match="5 requested"):
        average.find_checkpoints(tmp_path, 5, "epoch")


def test_cli_with_directory(tmp_path):
    for e in (1, 2, 3):
        make_ckpt(tmp_path / f"checkpoint{e}.pt", e, e)
    summary = average.main(["--dir", str(tmp_path), "--num-epoch-checkpoints", "2",
                            "--output", str(tmp_path / "avg.pt")])
    assert [Path(p).name for p in summary["inputs"]] == ["checkpoint2.pt", "checkpoint3.pt"]
    state = torch.load(tmp_path / "avg.pt", weights_only=False)
    assert torch.equal(state["model"]["encoder.w"], torch.full((3, 4), 2.5))


@pytest.mark.parametrize("kw, match", [
    ({"extra_key": True}, "different parameter names"),
    ({"shape": (4, 3)}, "different architectures"),
    ({"layers": 3}, "model settings differ"),
    ({"arch": "transformer_pn_multi30k"}, "model settings differ"),
])
def test_refuses_different_architectures(tmp_path, kw, match):
    a = make_ckpt(tmp_path / "a.pt", 1, 1)
    b = make_ckpt(tmp_path / "b.pt", 2, 2, **kw)
    with pytest.raises(SystemExit, match=match):
        average.average_checkpoints([a, b], tmp_path / "avg.pt")
    assert not (tmp_path / "avg.pt").exists()


def test_run_settings_may_differ(tmp_path):
    # max_update is not an architecture setting: a resumed run with a longer schedule is fine
    a = make_ckpt(tmp_path / "a.pt", 1, 1)
    b = make_ckpt(tmp_path / "b.pt", 2, 2)
    average.average_checkpoints([a, b], tmp_path / "avg.pt")


def test_truncated_checkpoint_names_the_file(tmp_path):
    good = make_ckpt(tmp_path / "checkpoint1.pt", 1, 1)
    bad = make_ckpt(tmp_path / "checkpoint2.pt", 2, 2)
    data = bad.read_bytes()
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(SystemExit, match="checkpoint2.pt.*truncated"):
        average.average_checkpoints([good, bad], tmp_path / "avg.pt")
    missing = tmp_path / "nope.pt"
    with pytest.raises(SystemExit, match="not found"):
        average.average_checkpoints([good, missing], tmp_path / "avg.pt")


def test_script_is_importable_and_runs(tmp_path):
    for e in (1, 2):
        make_ckpt(tmp_path / f"checkpoint{e}.pt", e, e)
    subprocess.run([sys.executable, str(REPO / "scripts" / "average_checkpoints.py"),
                    "--inputs", str(tmp_path / "checkpoint1.pt"), str(tmp_path / "checkpoint2.pt"),
                    "--output", str(tmp_path / "avg.pt")], check=True, cwd=tmp_path)
    state = torch.load(tmp_path / "avg.pt", weights_only=False)
    assert torch.equal(state["model"]["encoder.w"], torch.full((3, 4), 1.5))


def _with_training_state(path):
    state = torch.load(path, weights_only=False)
    state["last_optimizer_state"] = {"state": {0: {"exp_avg": torch.ones(3)}}}
    state["extra_state"] = {"epoch": 3, "train_iterator": {"epoch": 3, "iterations_in_epoch": 7}}
    torch.save(state, path)
    return path


def test_refuses_to_overwrite_inputs_fairseq_names_and_existing_files(tmp_path):
    a = make_ckpt(tmp_path / "checkpoint1.pt", 1, 1)
    b = make_ckpt(tmp_path / "checkpoint2.pt", 2, 2)
    last = make_ckpt(tmp_path / "checkpoint_last.pt", 2, 2)
    before = {p: p.read_bytes() for p in (a, b, last)}
    for out, force, match in [(b, True, "one of the checkpoints being averaged"),
                              (last, True, "name fairseq writes"),
                              (tmp_path / "checkpoint_best.pt", True, "name fairseq writes"),
                              (tmp_path / "checkpoint_3_300.pt", True, "name fairseq writes")]:
        with pytest.raises(SystemExit, match=match):
            average.main(["--inputs", str(a), str(b), "--output", str(out)] + ["--force"] * force)
    avg = tmp_path / "avg.pt"
    avg.write_bytes(b"my file")
    with pytest.raises(SystemExit, match="exists; pass --force"):
        average.main(["--inputs", str(a), str(b), "--output", str(avg)])
    assert avg.read_bytes() == b"my file"
    assert {p: p.read_bytes() for p in (a, b, last)} == before
    assert not (tmp_path / "checkpoint_best.pt").exists()
    average.main(["--inputs", str(a), str(b), "--output", str(avg), "--force"])
    assert torch.load(avg, weights_only=False)["average"]["num_updates"] == 2


def test_average_has_no_training_state_and_is_marked(tmp_path):
    paths = [_with_training_state(make_ckpt(tmp_path / f"checkpoint{i}.pt", i, i)) for i in (1, 2)]
    average.average_checkpoints(paths, tmp_path / "avg.pt")
    state = torch.load(tmp_path / "avg.pt", weights_only=False)
    assert "last_optimizer_state" not in state
    assert "train_iterator" not in state["extra_state"] and state["extra_state"]["epoch"] == 3
    assert state["average"]["inputs"] == [str(p) for p in paths]
    assert state["optimizer_history"][-1]["num_updates"] == 2  # fairseq-generate still loads it


def test_records_of_a_replaced_average_are_removed(tmp_path):
    a = make_ckpt(tmp_path / "checkpoint1.pt", 1, 1)
    b = make_ckpt(tmp_path / "checkpoint2.pt", 2, 2)
    avg = tmp_path / "checkpoint_avg.pt"
    average.average_checkpoints([a, b], avg)
    records = [tmp_path / n for n in ("checkpoint_avg.bleu.json", "checkpoint_avg.bleu.hyp.txt",
                                      "checkpoint_avg.bleu.hyp.tok.txt", "checkpoint_avg.ppl.json")]
    other = tmp_path / "checkpoint2.bleu.json"  # a record of another checkpoint stays
    for r in [*records, other]:
        r.write_text("{}")
    summary = average.main(["--inputs", str(a), "--output", str(avg), "--force"])
    assert not any(r.exists() for r in records) and other.exists()
    assert sorted(summary["removed_records"]) == sorted(map(str, records))
    # a new average where an old one was deleted by hand: its old records go too
    avg.unlink()
    records[0].write_text("{}")
    average.main(["--inputs", str(a), str(b), "--output", str(avg)])
    assert not records[0].exists()
