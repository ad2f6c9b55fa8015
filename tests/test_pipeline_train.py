"""train: CPU data parallel really trains one model; a SIGKILLed run resumes to the same result."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from powernorm_fairseq.pipeline import prepare, train

REPO = Path(__file__).resolve().parents[1]

TINY = ["--arch", "transformer_pn_tiny", "--share-all-embeddings", "--optimizer", "adam",
        "--lr", "0.002", "--lr-scheduler", "inverse_sqrt", "--warmup-updates", "4",
        "--criterion", "label_smoothed_cross_entropy", "--label-smoothing", "0.1",
        "--dropout", "0.1", "--max-tokens", "256", "--log-interval", "1", "--no-progress-bar",
        "--num-workers", "0", "--seed", "3", "--pn-warmup-updates", "3", "--disable-validation"]


@pytest.fixture(scope="module")
def data_bin(tmp_path_factory):
    out = tmp_path_factory.mktemp("synthetic")
    prepare.main(["synthetic", "--out", str(out), "--synthetic-train", "600", "--seed", "2",
                  "--bpe-size", "100", "--workers", "1"])
    return out / "data-bin"


def train_cmd(data_bin, save_dir, *extra):
    return [sys.executable, "-m", "powernorm_fairseq.pipeline.train", "flags", "pn",
            "--data", str(data_bin), "--save-dir", str(save_dir), *extra, "--", *TINY]


def model_tensors(path):
    return torch.load(path, map_location="cpu", weights_only=False)["model"]


def test_update_freq_keeps_the_effective_batch():
    assert train.scale_update_freq(4096, 1, 1, None)["update_freq"] == 1
    b = train.scale_update_freq(4096, 8, 4, None)  # paper: 8 x 4096 on one GPU; here 4 ranks
    assert b["update_freq"] == 2 and b["effective"] == b["target"] == 32768
    b = train.scale_update_freq(4096, 1, 1, 4096 * 128)  # WMT14's 128 GPUs on one device
    assert b["update_freq"] == 128
    b = train.scale_update_freq(3000, 1, 2, 8000)  # not a multiple: round up, never below
    assert b["update_freq"] == 2 and b["effective"] == 12000
    b = train.scale_update_freq(120, 1, 4, None, "sequences")  # more ranks than the batch needs
    assert b["per_rank"] == 30 and b["update_freq"] == 1 and b["effective"] == 120


def test_preset_batch_follows_the_paper_and_overrides(tmp_path):
    args = train.build_parser().parse_args(["iwslt14", "pn", "--data", "x", "--save-dir", str(tmp_path)])
    cmd, b = train.build_preset_command(args, ["dataset.max_tokens=1024"], 2)
    assert b["target"] == 4096 and b["update_freq"] == 2 and b["effective"] == 4096
    assert cmd.count("dataset.max_tokens=1024") == 1 and "optimization.update_freq=[2]" in cmd
    cmd, b = train.build_preset_command(args, ["optimization.update_freq=[3]"], 2)
    assert b == {} and cmd.count("optimization.update_freq=[3]") == 1
    with pytest.raises(SystemExit, match="hydra overrides key=value"):
        train.build_preset_command(args, ["--max-update", "3"], 1)


def test_preset_paths_with_a_comma_stay_one_value(tmp_path):
    """Issue 38 item 7: a comma in the working directory's path made hydra read task.data as a
    list ("Ambiguous value for argument"); the launcher quotes the paths it passes."""
    from powernorm_fairseq import presets

    where = tmp_path / "runs, old" / "it's"
    args = train.build_parser().parse_args(["multi30k", "ln", "--data", str(where / "data-bin"),
                                            "--save-dir", str(where / "ckpt")])
    args.data, args.save_dir = where / "data-bin", where / "ckpt"
    from hydra.core.override_parser.overrides_parser import OverridesParser

    cmd, _ = train.build_preset_command(args, [], 1)
    data = next(a for a in cmd if a.startswith("task.data="))
    assert presets.compose(cmd[cmd.index("--config-name") + 1], [data]).task.data == str(where / "data-bin")
    parsed = {o.key_or_group: o.value() for o in OverridesParser.create().parse_overrides(
        [a for a in cmd if a.startswith(("checkpoint.save_dir=", "hydra.run.dir="))])}
    assert parsed == {"checkpoint.save_dir": str(where / "ckpt"), "hydra.run.dir": str(where / "ckpt" / "hydra")}


@pytest.mark.slow
@pytest.mark.parametrize("sync", [False, True], ids=["per-worker-stats", "norm-sync-stats"])
def test_two_cpu_workers_train_one_model(data_bin, tmp_path, sync):
    args = train.build_parser().parse_args(["flags", "pn", "--data", str(data_bin), "--save-dir",
                                            str(tmp_path / "ckpt"), "--cpu-workers", "2"])
    extra = ["--norm-sync-stats"] if sync else []
    record = train.train(args, [*TINY, "--max-update", "4", *extra], echo=lambda line: None)
    assert record["world_size"] == 2 and record["launch"] == "cpu-workers"
    check = record["rank_check"]
    assert check["world_size"] == 2 and check["num_updates"] == 4
    log = (tmp_path / "ckpt" / "train.log").read_text()
    assert "'distributed_world_size': 2" in log
    # the flags' batch (256 tokens on one device) is kept: 2 ranks x 128 tokens x update_freq 1
    b = record["batch"]
    assert (b["per_rank"], b["update_freq"], b["effective"], b["unit"]) == (128, 1, 256, "tokens")
    assert "distributed_world_size: 2" in (tmp_path / "ckpt" / "config.yaml").read_text()
    # PowerNorm's running statistics: per worker (as the released code) unless synchronized, then
    # identical on every rank, so the checkpoint holds the statistics of the whole batch.
    pn_buffers = [k for k in check["buffers_differing"] if "running_phi" in k or "ema_gz" in k]
    assert (pn_buffers == []) == sync, check["buffers_differing"]


@pytest.mark.slow
@pytest.mark.parametrize("sync", [False, True], ids=["per-worker-stats", "norm-sync-stats"])
def test_two_cpu_workers_resume_as_if_uninterrupted(data_bin, tmp_path, sync):
    """2 CPU workers: 4 updates, then the same command to 8. The resume crashed on every rank but 0
    (issue 38): fairseq sends rank 0's loaded checkpoint to the others (torch.save / torch.load),
    whose weights_only load refused the builtin types an omegaconf config names. With
    ``--norm-sync-stats`` the result equals 8 updates in one go (parameters and every norm
    buffer). With per-worker statistics (the released code's) a checkpoint holds rank 0's, which
    every rank resumes from, as in the released program: the resume trains on, with one model."""
    extra = ["--norm-sync-stats"] if sync else []

    def run(save_dir, max_update):
        args = train.build_parser().parse_args(["flags", "pn", "--data", str(data_bin), "--save-dir",
                                                str(save_dir), "--cpu-workers", "2"])
        return train.train(args, [*TINY, "--max-update", str(max_update), *extra], echo=lambda line: None)

    run(tmp_path / "straight", 8)
    run(tmp_path / "resumed", 4)
    record = run(tmp_path / "resumed", 8)
    assert record["rank_check"]["num_updates"] == 8 and record["rank_check"]["world_size"] == 2
    if not sync:
        return
    a = model_tensors(tmp_path / "straight" / "checkpoint_last.pt")
    b = model_tensors(tmp_path / "resumed" / "checkpoint_last.pt")
    assert a.keys() == b.keys() and any("running_phi" in k for k in a)
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=0, atol=1e-6, msg=key)


def test_torchrun_on_cpu_is_refused_before_anything_starts(data_bin, tmp_path, monkeypatch):
    """Issue 38 item 2: torchrun on CPU trained independent copies silently (fairseq's world size
    counts GPUs); it is refused, naming --cpu-workers, with nothing written."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "0")
    args = train.build_parser().parse_args(["flags", "ln", "--data", str(data_bin), "--save-dir",
                                            str(tmp_path / "ckpt"), "--cpu"])
    with pytest.raises(SystemExit, match="torchrun with 2 processes on CPU.*--cpu-workers N"):
        train.train(args, [*TINY, "--max-update", "1"], echo=lambda line: None)
    assert not (tmp_path / "ckpt").exists()


def test_a_failed_worker_says_why_and_keeps_its_log(data_bin, tmp_path):
    """Issue 38 item 5: a worker's own error reaches the user (its log beside train.log, and its
    last lines in the failure message), not only the other ranks' "Connection closed by peer"."""
    args = train.build_parser().parse_args(["flags", "ln", "--data", str(data_bin), "--save-dir",
                                            str(tmp_path / "ckpt"), "--cpu-workers", "2"])
    with pytest.raises(SystemExit) as failed:
        train.train(args, [*TINY, "--max-update", "1", "--lr-scheduler", "no_such_scheduler"],
                    echo=lambda line: None)
    message = str(failed.value)
    assert "--- rank 1 (exit" in message and "no_such_scheduler" in message.split("--- rank 1")[1]
    assert "no_such_scheduler" in (tmp_path / "ckpt" / "train.rank1.log").read_text()


def test_a_rank_failing_as_another_fails_is_not_killed_before_it_says_why(tmp_path):
    """The launcher gives the other ranks time to exit on their own when one fails: a bad flag
    fails every rank at once, and rank 1 must not be terminated while writing its error (the
    flaky CI failure of session 21, where rank 0 exited 2 and rank 1 was killed, -15)."""
    from powernorm_fairseq.pipeline import launch

    rank1_log = tmp_path / "train.rank1.log"
    with open(rank1_log, "w") as out:
        procs = [subprocess.Popen([sys.executable, "-c", "import sys; sys.exit(2)"],
                                  stdout=subprocess.PIPE, text=True),
                 subprocess.Popen([sys.executable, "-c", "import sys, time; time.sleep(1.0); "
                                   "print('rank 1: its own error'); sys.exit(3)"], stdout=out)]
    codes = launch._stream(procs, tmp_path / "train.log", echo=lambda line: None)
    assert codes == [2, 3]
    assert "its own error" in rank1_log.read_text()


def test_a_rank_that_outlives_the_grace_after_a_failure_is_terminated(tmp_path):
    from powernorm_fairseq.pipeline import launch

    procs = [subprocess.Popen([sys.executable, "-c", "import sys; sys.exit(2)"],
                              stdout=subprocess.PIPE, text=True),
             subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])]
    t0 = time.monotonic()
    codes = launch._stream(procs, tmp_path / "train.log", echo=lambda line: None, grace_s=0.5)
    assert codes == [2, -signal.SIGTERM] and time.monotonic() - t0 < 30


@pytest.mark.slow
def test_sigkill_mid_epoch_then_rerun_equals_uninterrupted(data_bin, tmp_path):
    schedule = ["--max-update", "30", "--save-interval-updates", "6", "--cpu"]
    # MKL may pick kernels by memory alignment, which changes float sums at the last bit (and Adam
    # amplifies that); conditional numerical reproducibility makes reruns bitwise comparable.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_CBWR": "COMPATIBLE"}
    subprocess.run(train_cmd(data_bin, tmp_path / "full", *schedule[4:]) + schedule[:4],
                   check=True, cwd=REPO, env=env, capture_output=True)

    killed = tmp_path / "killed"
    cmd = train_cmd(data_bin, killed, *schedule[4:]) + schedule[:4]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 120
    # Wait for the update-12 checkpoint: by then checkpoint_last.pt (a plain copy, written after
    # checkpoint_1_6.pt) is complete, so the rerun must resume rather than start over. The kill
    # may still land while checkpoint_last.pt is being overwritten; the launcher repairs that.
    while not (killed / "checkpoint_1_12.pt").exists():
        assert proc.poll() is None and time.time() < deadline, "training ended before the checkpoint"
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)  # the launcher and its training process, mid-epoch
    assert proc.wait() == -signal.SIGKILL
    assert not (killed / "checkpoint_1_30.pt").exists()

    subprocess.run(cmd, check=True, cwd=REPO, env=env, capture_output=True)
    a, b = model_tensors(tmp_path / "full" / "checkpoint_last.pt"), model_tensors(killed / "checkpoint_last.pt")
    assert a.keys() == b.keys()
    for k in a:
        if a[k].is_floating_point():
            assert (a[k] - b[k]).abs().max().item() <= 1e-6, k
        else:
            assert torch.equal(a[k], b[k]), k
    state = torch.load(killed / "checkpoint_last.pt", weights_only=False)
    assert state["optimizer_history"][-1]["num_updates"] == 30
    assert "restoring" in (killed / "train.log").read_text().lower() or \
        "loaded checkpoint" in (killed / "train.log").read_text().lower()


def test_truncated_checkpoint_last_is_replaced_by_the_newest_intact_one(tmp_path):
    torch.save({"model": {"w": torch.zeros(2)}}, tmp_path / "checkpoint_1_4.pt")
    time.sleep(0.01)
    torch.save({"model": {"w": torch.ones(2)}}, tmp_path / "checkpoint_1_8.pt")
    data = (tmp_path / "checkpoint_1_8.pt").read_bytes()
    (tmp_path / "checkpoint_last.pt").write_bytes(data[: len(data) // 2])  # killed mid-copy
    assert "replaced by checkpoint_1_8.pt" in train.repair_last_checkpoint(tmp_path)
    assert torch.equal(model_tensors(tmp_path / "checkpoint_last.pt")["w"], torch.ones(2))
    assert train.repair_last_checkpoint(tmp_path) is None  # intact now: nothing to do


TINY_PTB = ["model.decoder_layers=1", "model.decoder_embed_dim=16", "model.decoder_input_dim=16",
            "model.decoder_output_dim=16", "model.decoder_ffn_embed_dim=32", "dataset.batch_size=8",
            "optimization.update_freq=[1]", "optimization.max_update=2", "dataset.num_workers=0",
            "common.log_interval=1"]


def _records(save_dir: Path) -> dict[str, bytes]:
    return {p.relative_to(save_dir).as_posix(): p.read_bytes() for p in sorted(save_dir.rglob("*"))
            if p.is_file() and (p.name in ("launch.json", "config.yaml") or ".hydra" in p.parts)}


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["flags", "preset"])
def test_refused_launch_leaves_the_runs_records_intact(mode, data_bin, tiny_lm_data, tmp_path):
    """`train.sh <preset> ln --save-dir <a PN run>`: fairseq refuses the PN checkpoint, and the PN
    run's launch.json, config.yaml and hydra config are as they were (they used to be rewritten)."""
    save = tmp_path / "run"
    if mode == "flags":
        def launch(norm):
            return train.main(["flags", norm, "--data", str(data_bin), "--save-dir", str(save),
                               "--cpu", "--", *TINY, "--max-update", "2"])
    else:
        def launch(norm):
            return train.main(["ptb", norm, "--data", str(tiny_lm_data), "--save-dir", str(save),
                               "--cpu", *TINY_PTB])
    launch("pn")
    before = _records(save)
    assert "launch.json" in before and "config.yaml" in before
    assert mode == "flags" or "hydra/.hydra/config.yaml" in before
    with pytest.raises(SystemExit, match="training failed"):
        launch("ln")
    assert "does not fit the model being trained" in (save / "train.log").read_text()
    assert _records(save) == before
    assert not (save / "hydra" / ".hydra.pending").exists()


def test_messages_name_the_console_scripts_when_installed(tmp_path, monkeypatch):
    """Issue 38 item 9: an installed package has no scripts/; its messages name the console
    scripts (a checkout's name its scripts)."""
    from powernorm_fairseq.pipeline import common

    with pytest.raises(SystemExit, match=r"run scripts/prepare_<corpus>\.sh first"):
        train.check_data_dir(tmp_path / "nope")
    monkeypatch.setattr(common, "PLUGIN_DIR", tmp_path / "site-packages" / "powernorm_fairseq")
    with pytest.raises(SystemExit, match="run powernorm-prepare <corpus> first"):
        train.check_data_dir(tmp_path / "nope")
    assert train.build_parser().prog == "powernorm-train"
