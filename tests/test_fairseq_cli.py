"""End-to-end runs of fairseq's command-line tools with ``--user-dir powernorm_fairseq``.

Each norm kind trains a tiny translation model (the norm at every encoder *and* decoder site) and
a tiny language model for a few updates, then ``fairseq-generate`` / ``fairseq-eval-lm`` must
handle every test sentence / token; a hydra preset trains; training resumed from
``checkpoint_last.pt`` repeats the uninterrupted run exactly, early stopping included; unusable
checkpoints fail with one clear line. Trained checkpoints are shared between tests (module-scoped fixtures).
"""

from __future__ import annotations

import math
import re
import shutil

import pytest
import torch

pytest.importorskip("fairseq")

import powernorm_fairseq.models  # noqa: F401  (compat: fairseq checkpoints load weights_only)
from powernorm_fairseq.norms import norm_names

pytestmark = pytest.mark.slow

MT_TRAIN = [
    "--task", "translation", "-s", "src", "-t", "tgt", "--arch", "transformer_pn_tiny",
    "--share-all-embeddings", "--optimizer", "adam", "--lr", "0.002", "--max-tokens", "512",
    "--criterion", "label_smoothed_cross_entropy", "--label-smoothing", "0.1",
    "--seed", "1", "--log-format", "simple", "--log-interval", "1", "--no-epoch-checkpoints",
    "--pn-warmup-updates", "3",  # PowerNorm leaves its warmup within the run
]
LM_TRAIN = [
    "--task", "language_modeling", "--tokens-per-sample", "32", "--arch", "transformer_lm_pn_tiny",
    "--optimizer", "adam", "--lr", "0.002", "--max-tokens", "256", "--seed", "1",
    "--log-format", "simple", "--log-interval", "1", "--no-epoch-checkpoints",
    "--pn-warmup-updates", "3",
]
# Timing fields differ between runs; everything else in a train_inner line must match on resume.
TIMING_FIELDS = {"wps", "ups", "wall", "train_wall", "gb_free"}


def train_inner(log: str) -> dict[int, dict[str, str]]:
    """``num_updates -> {field: value}`` of the ``train_inner`` log lines."""
    rows = {}
    for line in log.splitlines():
        if "| train_inner |" in line:
            fields = dict(re.findall(r"(\w+)=([^,\s]+)", line.split("| train_inner |")[1]))
            rows[int(fields["num_updates"])] = fields
    return rows


@pytest.fixture(scope="module")
def train_mt(fairseq_cli, tiny_mt_data, plugin_dir, tmp_path_factory):
    """``train_mt(kind, *extra, max_update=6, save_dir=None) -> (save_dir, log)``, memoized."""
    cache = {}

    def train(kind: str, *extra, max_update: int = 6, save_dir=None):
        key = (kind, extra, max_update, save_dir)
        if key not in cache:
            save_dir = save_dir or tmp_path_factory.mktemp(f"mt_{kind}")
            proc = fairseq_cli(
                "train", tiny_mt_data, "--user-dir", plugin_dir, *MT_TRAIN,
                "--encoder-norm", kind, "--decoder-norm", kind, *extra,
                "--max-update", max_update, "--save-dir", save_dir,
            )
            cache[key] = (save_dir, proc.stdout + proc.stderr)
        return cache[key]

    return train


@pytest.fixture(scope="module")
def train_lm(fairseq_cli, tiny_lm_data, plugin_dir, tmp_path_factory):
    """``train_lm(kind) -> (save_dir, log)``, memoized."""
    cache = {}

    def train(kind: str):
        if kind not in cache:
            save_dir = tmp_path_factory.mktemp(f"lm_{kind}")
            proc = fairseq_cli(
                "train", tiny_lm_data, "--user-dir", plugin_dir, *LM_TRAIN,
                "--decoder-norm", kind, "--max-update", 8, "--save-dir", save_dir,
            )
            cache[kind] = (save_dir, proc.stdout + proc.stderr)
        return cache[kind]

    return train


def _assert_trains(log: str, updates: int) -> None:
    losses = [float(row["loss"]) for _, row in sorted(train_inner(log).items())]
    assert len(losses) == updates and all(math.isfinite(x) for x in losses)
    assert losses[-1] < losses[0] - 0.5, f"loss did not decrease: {losses}"


@pytest.mark.parametrize("kind", norm_names())
def test_translation_trains_and_generates_every_sentence(
    kind, train_mt, fairseq_cli, tiny_mt_data, plugin_dir
):
    save_dir, log = train_mt(kind)
    _assert_trains(log, 6)
    proc = fairseq_cli(
        "generate", tiny_mt_data, "--user-dir", plugin_dir, "-s", "src", "-t", "tgt",
        "--path", save_dir / "checkpoint_last.pt", "--beam", 2, "--batch-size", 8,
        "--gen-subset", "test",
    )
    n_test = len((tiny_mt_data / "raw" / "test.src").read_text().splitlines())
    assert n_test % 8 != 0
    hypotheses = [line for line in proc.stdout.splitlines() if line.startswith("H-")]
    assert len(hypotheses) == n_test
    assert f"Translated {n_test} sentences" in proc.stderr


@pytest.mark.parametrize("kind", norm_names())
def test_language_model_trains_and_scores_every_token(
    kind, train_lm, fairseq_cli, tiny_lm_data, plugin_dir
):
    save_dir, log = train_lm(kind)
    _assert_trains(log, 8)
    proc = fairseq_cli(
        "eval_lm", tiny_lm_data, "--user-dir", plugin_dir, "--path", save_dir / "checkpoint_last.pt",
        "--gen-subset", "test", "--tokens-per-sample", 32, "--batch-size", 4,
    )
    lines = (tiny_lm_data / "raw" / "test.txt").read_text().splitlines()
    n_tokens = sum(len(line.split()) + 1 for line in lines)  # + end of sentence
    assert f"Evaluated {n_tokens} tokens" in proc.stderr


def test_hydra_preset_trains(fairseq_cli, tiny_lm_data, tmp_path):
    save_dir = tmp_path / "ck"
    proc = fairseq_cli(
        "powernorm_fairseq.hydra_train", "--config-name", "ptb_pn",
        f"task.data={tiny_lm_data}", "model.decoder_layers=2", "model.decoder_embed_dim=32",
        "model.decoder_input_dim=32", "model.decoder_output_dim=32",
        "model.decoder_ffn_embed_dim=64", "dataset.batch_size=8", "optimization.max_update=3",
        f"checkpoint.save_dir={save_dir}", "common.log_interval=1", cwd=tmp_path,
    )
    assert "num_updates=3" in proc.stdout + proc.stderr
    state = torch.load(save_dir / "checkpoint_last.pt", weights_only=True)
    model_cfg = state["cfg"]["model"]
    assert model_cfg["decoder_norm"] == "power" and model_cfg["pn_warmup_updates"] == 2000
    assert "decoder.layers.0.self_attn_layer_norm.running_phi" in state["model"]


def test_resume_repeats_the_uninterrupted_run(train_mt, tmp_path):
    """6 updates straight == 3 updates, then resume from checkpoint_last.pt to 6 (mid-epoch).

    PowerNorm (reference variant) at every site, warmup 3: the resumed half leaves the warmup.
    """
    straight_dir, straight_log = train_mt("power")
    resumed_dir = tmp_path / "resumed"
    train_mt("power", max_update=3, save_dir=resumed_dir)
    _, resumed_log = train_mt("power", max_update=6, save_dir=resumed_dir)

    straight, resumed = train_inner(straight_log), train_inner(resumed_log)
    assert sorted(resumed) == [4, 5, 6]
    for update in (4, 5, 6):
        keep = set(straight[update]) - TIMING_FIELDS
        assert {k: resumed[update][k] for k in keep} == {k: straight[update][k] for k in keep}

    a = torch.load(straight_dir / "checkpoint_last.pt", weights_only=True)["model"]
    b = torch.load(resumed_dir / "checkpoint_last.pt", weights_only=True)["model"]
    assert a.keys() == b.keys()
    assert any(k.endswith("running_phi") for k in a)  # the norms' state is in the checkpoint
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=0, atol=1e-6, msg=key)


@pytest.mark.parametrize("kind", ["layer", "power"])
def test_resume_at_an_epoch_boundary_repeats_the_uninterrupted_run(kind, fairseq_cli, tiny_mt_data, plugin_dir,
                                                                   tmp_path):
    """3 epochs straight == 2 epochs (``--max-epoch 2``), then the same command with
    ``--max-epoch 3``: every logged training loss and every parameter and norm buffer (issue 40).

    fairseq groups the sentences into batches once per process under ``seed + epoch`` of the epoch
    it first builds the iterator at: the resumed run grouped them under ``seed + 3``, so its epoch
    3 trained on other batches (compat item 10). Dropout 0.1, so the per-update seeds count too.
    """
    def train(save_dir, max_epoch):
        proc = fairseq_cli(
            "train", tiny_mt_data, "--user-dir", plugin_dir, *MT_TRAIN, "--max-tokens", "200",
            "--dropout", "0.1", "--encoder-norm", kind, "--decoder-norm", kind,
            "--max-epoch", max_epoch, "--save-dir", save_dir,
        )
        return train_inner(proc.stdout + proc.stderr)

    straight = train(tmp_path / "straight", 3)
    train(tmp_path / "resumed", 2)
    resumed = train(tmp_path / "resumed", 3)
    epoch_three = [u for u in straight if u > min(resumed) - 1]
    assert sorted(resumed) == epoch_three and len(epoch_three) >= 5
    for update in epoch_three:
        keep = set(straight[update]) - TIMING_FIELDS
        assert {k: resumed[update][k] for k in keep} == {k: straight[update][k] for k in keep}, update
    a = torch.load(tmp_path / "straight" / "checkpoint_last.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "resumed" / "checkpoint_last.pt", weights_only=True)["model"]
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=0, atol=0, msg=key)


def test_fairseqs_own_transformer_trains_under_the_plugin_as_without_it(fairseq_cli, tiny_mt_data, plugin_dir,
                                                                         tmp_path):
    """Issue 35 item 5: ``--user-dir powernorm_fairseq --arch transformer`` trains bit for bit as
    stock fairseq-fixed without the plugin (every training loss line, every parameter): the
    plugin's change of what a model trains on (no batch dropped, compat item 3) applies to its own
    models only, and its other patches change no number of a training run."""
    arch = ["--task", "translation", "-s", "src", "-t", "tgt", "--arch", "transformer",
            "--encoder-layers", "1", "--decoder-layers", "1", "--encoder-embed-dim", "16",
            "--decoder-embed-dim", "16", "--encoder-ffn-embed-dim", "32", "--decoder-ffn-embed-dim", "32",
            "--encoder-attention-heads", "2", "--decoder-attention-heads", "2", "--share-all-embeddings",
            # batches of 14, multiples of 7: 240 sentences leave a tail of 2, which fairseq-fixed drops
            "--optimizer", "adam", "--lr", "0.002", "--batch-size", "14", "--required-batch-size-multiple", "7",
            "--dropout", "0.1",
            "--max-epoch", "2", "--seed", "1", "--log-format", "simple", "--log-interval", "1",
            "--no-epoch-checkpoints", "--num-workers", "0"]
    logs = {}
    for name, plugin in (("stock", []), ("plugin", ["--user-dir", plugin_dir])):
        proc = fairseq_cli("train", tiny_mt_data, *plugin, *arch, "--save-dir", tmp_path / name)
        logs[name] = train_inner(proc.stdout + proc.stderr)
    assert logs["plugin"] and logs["plugin"].keys() == logs["stock"].keys()
    for update, row in logs["stock"].items():
        keep = set(row) - TIMING_FIELDS
        assert {k: logs["plugin"][update][k] for k in keep} == {k: row[k] for k in keep}, update
    a = torch.load(tmp_path / "stock" / "checkpoint_last.pt", weights_only=False)["model"]
    b = torch.load(tmp_path / "plugin" / "checkpoint_last.pt", weights_only=False)["model"]
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=0, atol=0, msg=key)


def test_early_stopping_counts_across_a_resume(fairseq_cli, tiny_mt_data, plugin_dir, tmp_path):
    """``--patience`` stops a resumed run at the epoch the uninterrupted run stops at.

    With ``--lr 0`` and LayerNorm the validation loss is the same every epoch, so epoch 1 is the
    best and patience 2 stops after epoch 3. fairseq keeps the patience state in the process
    only: resumed after epoch 2, it took epoch 3's loss as a new best and stopped after epoch 5.
    """
    def train(save_dir, max_epoch):
        proc = fairseq_cli(
            "train", tiny_mt_data, "--user-dir", plugin_dir, *MT_TRAIN, "--lr", "0",
            "--encoder-norm", "layer", "--decoder-norm", "layer", "--patience", "2",
            "--max-epoch", max_epoch, "--save-dir", save_dir,
        )
        return proc.stdout + proc.stderr

    def epochs(log):
        return sorted({int(e) for e in re.findall(r"epoch (\d+) \| valid on", log)})

    straight = train(tmp_path / "straight", 10)
    assert epochs(straight) == [1, 2, 3] and "early stop" in straight
    assert epochs(train(tmp_path / "resumed", 2)) == [1, 2]
    shutil.copytree(tmp_path / "resumed", tmp_path / "older")
    resumed = train(tmp_path / "resumed", 10)
    assert epochs(resumed) == [3] and "early stop" in resumed
    # a checkpoint saved before the state was kept: its best loss, counting from 0 after epoch 2
    last = tmp_path / "older" / "checkpoint_last.pt"
    state = torch.load(last, weights_only=True)
    assert state["extra_state"].pop("powernorm_patience") == {"best": state["extra_state"]["best"],
                                                              "num_runs": 1}
    torch.save(state, last)
    assert epochs(train(tmp_path / "older", 10)) == [3, 4]


def test_truncated_checkpoint_fails_with_one_clear_line(
    train_mt, fairseq_cli, tiny_mt_data, plugin_dir, tmp_path
):
    save_dir, _ = train_mt("power")
    broken = tmp_path / "checkpoint_last.pt"
    data = (save_dir / "checkpoint_last.pt").read_bytes()
    broken.write_bytes(data[: len(data) // 3])
    proc = fairseq_cli(
        "generate", tiny_mt_data, "--user-dir", plugin_dir, "-s", "src", "-t", "tgt",
        "--path", broken, "--gen-subset", "test", check=False,
    )
    assert proc.returncode != 0
    assert f"error: cannot read checkpoint {broken}: it is truncated or corrupt" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_checkpoint_of_other_norms_fails_with_one_clear_line(
    train_mt, fairseq_cli, tiny_mt_data, plugin_dir, tmp_path
):
    pn_dir, _ = train_mt("power")
    shutil.copy(pn_dir / "checkpoint_last.pt", tmp_path / "checkpoint_last.pt")
    proc = fairseq_cli(
        "train", tiny_mt_data, "--user-dir", plugin_dir, *MT_TRAIN,
        "--encoder-norm", "layer", "--decoder-norm", "layer", "--max-update", 10,
        "--save-dir", tmp_path, check=False,
    )
    assert proc.returncode != 0
    assert "does not fit the model being trained" in proc.stderr
    assert str(tmp_path / "checkpoint_last.pt") in proc.stderr
    assert "Traceback" not in proc.stderr


def test_eval_lm_that_would_skip_samples_fails_naming_the_flag(
    train_lm, fairseq_cli, tiny_lm_data, plugin_dir
):
    """fairseq's default --tokens-per-sample (1024) exceeds the model's 32 positions: every sample
    was skipped, 0 tokens scored, perplexity 1.00, exit 0. Now: a one-line error naming the flag."""
    save_dir, _ = train_lm("layer")
    proc = fairseq_cli(
        "eval_lm", tiny_lm_data, "--user-dir", plugin_dir, "--path", save_dir / "checkpoint_last.pt",
        "--gen-subset", "test", "--batch-size", 4, check=False,
    )
    assert proc.returncode != 0, proc.stderr[-2000:]
    assert "would skip" in proc.stderr and "score no token" in proc.stderr
    assert "--tokens-per-sample N with N <= 32" in proc.stderr
    assert "Traceback" not in proc.stderr and "Perplexity" not in proc.stderr


def test_average_decodes_but_training_does_not_resume_from_it(
    train_mt, fairseq_cli, tiny_mt_data, plugin_dir, tmp_path
):
    """An average has no optimizer state and no data position: fairseq-generate uses it, training
    refuses to resume from it (it used to continue silently from the averaged weights)."""
    from powernorm_fairseq.pipeline import average

    save_dir, _ = train_mt("power")
    avg = tmp_path / "checkpoint_avg.pt"
    average.main(["--inputs", str(save_dir / "checkpoint_last.pt"),
                  str(save_dir / "checkpoint_best.pt"), "--output", str(avg)])
    proc = fairseq_cli(
        "generate", tiny_mt_data, "--user-dir", plugin_dir, "-s", "src", "-t", "tgt",
        "--path", avg, "--beam", 2, "--batch-size", 8, "--gen-subset", "test",
    )
    n_test = len((tiny_mt_data / "raw" / "test.src").read_text().splitlines())
    assert f"Translated {n_test} sentences" in proc.stderr
    proc = fairseq_cli(
        "train", tiny_mt_data, "--user-dir", plugin_dir, *MT_TRAIN, "--encoder-norm", "power",
        "--decoder-norm", "power", "--max-update", 8, "--save-dir", tmp_path / "resume",
        "--restore-file", avg, check=False,
    )
    assert proc.returncode != 0
    assert f"{avg} is an average of checkpoints" in proc.stderr and "--reset-optimizer" in proc.stderr
    assert "Traceback" not in proc.stderr
