"""Clear, early errors for a new user's mistakes, and the fairseq-fixed gaps behind them (issue 18
items 8-15 and 21, issue 13 "NumPy 2").

Each test names the mistake; the message must name the file / flag / hydra key and what to do.
End-to-end runs are tiny (a few updates of the conftest corpora).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from powernorm_fairseq import synthetic
from powernorm_fairseq.pipeline import evaluate, prepare, train

REPO = Path(__file__).resolve().parents[1]


def _env() -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    return env


def _parallel_corpus(d: Path, n: int = 40) -> Path:
    synthetic.generate(d, seed=3, n_train=n, n_valid=8, n_test=8)
    return d


# --------------------------------------------------------------------------- prepare (8, 17)


def test_non_utf8_input_names_the_file_and_line(tmp_path):
    d = _parallel_corpus(tmp_path / "latin1")
    lines = (d / "train.src").read_bytes().split(b"\n")
    lines[2] = "caf\u00e9 cr\u00e8me".encode("latin-1")  # line 3 in Latin-1, the rest UTF-8
    (d / "train.src").write_bytes(b"\n".join(lines))
    with pytest.raises(SystemExit) as e:
        prepare.main(["synthetic", "--from", str(d), "--out", str(tmp_path / "out")])
    msg = str(e.value)
    assert f"{d / 'train.src'}, line 3: not UTF-8" in msg and "iconv" in msg


def test_from_layout_is_in_help_and_in_the_not_found_error(tmp_path, capsys):
    with pytest.raises(SystemExit):
        prepare.main(["ptb", "--help"])
    help_text = capsys.readouterr().out
    for corpus in prepare.CORPORA:
        assert f"  {corpus}: " in help_text, f"--help does not say what --from holds for {corpus}"
    assert "ANY parallel corpus" in help_text and "pinned line counts" in help_text
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit, match="must hold ptb.train.txt ptb.valid.txt"):
        prepare.main(["ptb", "--from", str(tmp_path / "empty"), "--out", str(tmp_path / "o")])


# --------------------------------------------------------------------------- options (9, 12)

fairseq = pytest.importorskip("fairseq")
from fairseq import options  # noqa: E402

import powernorm_fairseq.models  # noqa: E402, F401  (registers the models)
from powernorm_fairseq import compat  # noqa: E402


def parse(*argv):
    return options.parse_args_and_arch(options.get_training_parser(), [str(a) for a in argv])


@pytest.mark.parametrize(
    ("flag", "value"),
    [("--pn-alpha-fwd", "1.5"), ("--pn-alpha-bkw", "-0.1"), ("--pn-warmup-updates", "-5"),
     ("--pn-group-num", "-3"), ("--bn-momentum", "2"), ("--pn-final-warmup-updates", "-7")],
)
@pytest.mark.parametrize("arch", ["transformer_pn_tiny", "transformer_lm_pn_tiny"])
def test_bad_numbers_fail_at_parsing_naming_the_flag(arch, flag, value, tmp_path, capsys):
    task = ["--task", "language_modeling"] if "_lm_" in arch else ["--task", "translation"]
    with pytest.raises(SystemExit) as e:
        parse(tmp_path, "--arch", arch, *task, flag, value)
    assert e.value.code == 2
    assert f"argument {flag}: must be" in capsys.readouterr().err


def test_group_num_that_does_not_divide_the_width_fails_at_parsing(tmp_path):
    with pytest.raises(compat.OptionError, match="--pn-group-num .* = 3 does not divide "
                       "--encoder-embed-dim 64"):
        parse(tmp_path, "--arch", "transformer_pn_tiny", "--task", "translation",
              "--encoder-norm", "power", "--pn-group-num", "3")
    args = parse(tmp_path, "--arch", "transformer_pn_tiny", "--task", "translation",
                 "--encoder-norm", "power", "--pn-group-num", "8")
    assert args.pn_group_num == 8


def test_bad_numbers_under_hydra_name_the_key():
    from omegaconf import OmegaConf

    from powernorm_fairseq.hydra_train import check_config

    cfg = OmegaConf.create({"task": {"data": "/data"}, "model": {
        "_name": "transformer_lm_pn", "decoder_norm": "power", "pn_alpha_fwd": 0.9}})
    check_config(cfg)
    for key, value in (("pn_alpha_fwd", 1.5), ("bn_momentum", 2), ("pn_final_warmup_updates", -7)):
        bad = OmegaConf.merge(cfg, {"model": {key: value}})
        with pytest.raises(compat.OptionError, match=f"model.{key}"):
            check_config(bad)


def test_decoder_final_norm_does_not_switch_on_a_missing_output_norm(tmp_path):
    """fairseq's base_lm_architecture reads a legacy boolean ``decoder_final_norm``; the plugin's
    option of that name (the output norm's kind) must not turn wiki103's absent final norm on."""
    lm = ["--task", "language_modeling"]
    assert parse(tmp_path, "--arch", "transformer_lm_pn_wiki103", *lm).no_decoder_final_norm
    with pytest.raises(compat.OptionError, match="no decoder output norm"):
        parse(tmp_path, "--arch", "transformer_lm_pn_wiki103", *lm, "--decoder-final-norm", "power")
    # where the site exists, the option still picks its kind
    args = parse(tmp_path, "--arch", "transformer_lm_pn_tiny", *lm, "--decoder-final-norm", "power")
    assert args.decoder_final_norm == "power" and not args.no_decoder_final_norm


# --------------------------------------------------------------------------- hydra (10)


@pytest.mark.slow
def test_hydra_preset_without_task_data_says_to_set_it(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "powernorm_fairseq.hydra_train", "--config-name", "multi30k_pn",
         f"hydra.run.dir={tmp_path}/hydra"],
        capture_output=True, text=True, env=_env(), timeout=300, cwd=tmp_path)
    assert proc.returncode != 0
    assert "error: task.data is not set: add task.data=DIR" in proc.stderr
    assert "Traceback" not in proc.stderr and "TypeError" not in proc.stderr


# --------------------------------------------------------------------------- generate (11)


@pytest.mark.slow
def test_generate_with_another_dictionary_is_one_clear_line(fairseq_cli, tiny_mt_data, plugin_dir,
                                                             tmp_path):
    save = tmp_path / "ckpt"
    fairseq_cli("train", tiny_mt_data, "--user-dir", plugin_dir, "--task", "translation",
                "-s", "src", "-t", "tgt", "--arch", "transformer_pn_tiny",
                "--share-all-embeddings", "--optimizer", "adam", "--lr", "0.001",
                "--max-tokens", "512", "--max-update", "1", "--no-epoch-checkpoints",
                "--disable-validation", "--save-dir", save)
    raw, other = tmp_path / "raw", tmp_path / "other-bin"
    raw.mkdir()
    for split in ("train", "valid", "test"):
        for side in ("src", "tgt"):
            (raw / f"{split}.{side}").write_text("".join(f"w{i} x{i}\n" for i in range(30)))
    fairseq_cli("preprocess", "-s", "src", "-t", "tgt", "--trainpref", raw / "train",
                "--validpref", raw / "valid", "--testpref", raw / "test", "--destdir", other,
                "--joined-dictionary", "--workers", "1")
    proc = fairseq_cli("generate", other, "--user-dir", plugin_dir, "--path",
                       save / "checkpoint_last.pt", "--gen-subset", "test", "--cpu",
                       check=False)
    assert proc.returncode != 0
    err = proc.stderr.strip().splitlines()
    assert err[-1].startswith("error: checkpoint ") and "trained with a dictionary of" in err[-1]
    assert "pass the data-bin the model was trained on" in err[-1]
    assert "Traceback" not in proc.stderr


# --------------------------------------------------------------------------- train.sh (13)


def _fake_data_bin(d: Path) -> Path:
    d.mkdir(parents=True)
    (d / "dict.src.txt").write_text("a 1\n")
    for split in ("train", "valid"):
        for ext in ("idx", "bin"):
            (d / f"{split}.src-tgt.src.{ext}").write_bytes(b"x")
    return d


def test_train_refuses_abbreviated_options(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        train.main(["multi30k", "ln", "--data", str(tmp_path), "--cpu-worker", "2"])
    assert e.value.code == 2
    assert "unknown option --cpu-worker (did you mean --cpu-workers?" in capsys.readouterr().err


def test_unknown_preset_creates_no_save_dir(tmp_path):
    data, save = _fake_data_bin(tmp_path / "data-bin"), tmp_path / "save"
    with pytest.raises(SystemExit, match="no preset .*nonexistent_ln.yaml"):
        train.main(["nonexistent", "ln", "--data", str(data), "--save-dir", str(save)])
    assert not save.exists()
    with pytest.raises(SystemExit, match="unknown norm 'xx'"):
        train.main(["flags", "xx", "--data", str(data), "--save-dir", str(save)])
    assert not save.exists()


@pytest.mark.slow
def test_ctrl_c_prints_one_line_with_the_resume_command(tiny_mt_data, tmp_path):
    save = tmp_path / "save"
    cmd = [sys.executable, "-m", "powernorm_fairseq.pipeline.train", "flags", "pn",
           "--data", str(tiny_mt_data), "--save-dir", str(save), "--cpu", "--",
           "--task", "translation", "-s", "src", "-t", "tgt", "--arch", "transformer_pn_tiny",
           "--optimizer", "adam", "--lr", "0.001", "--max-tokens", "256", "--max-update", "100000",
           "--log-format", "simple", "--log-interval", "1", "--disable-validation",
           "--save-interval-updates", "2", "--no-epoch-checkpoints"]
    # a shell's background job (``cmd &``, as CI runners may start pytest) ignores SIGINT, and a
    # child inherits that: reset it, so the training sees what a terminal's Ctrl-C delivers
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=_env(), start_new_session=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        for line in proc.stdout:  # wait until training runs and a checkpoint exists
            if "num_updates=3" in line and (save / "checkpoint_last.pt").exists():
                break
        os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C in a terminal does: the whole group
        _, err = proc.communicate(timeout=120)  # a run that ignores the signal fails, not hangs
        rc = proc.returncode
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert rc == 130
    assert "Traceback" not in err and "KeyboardInterrupt" not in err
    last = [line for line in err.splitlines() if line.strip()][-1]
    assert last.startswith(f"interrupted; resume from {save / 'checkpoint_last.pt'} with: ")
    assert "powernorm_fairseq.pipeline.train flags pn --data" in last


# --------------------------------------------------------------------------- evaluate (14)


def test_evaluate_ppl_on_a_translation_checkpoint_says_so(tmp_path):
    ckpt = tmp_path / "mt.pt"
    torch.save({"cfg": {"task": {"_name": "translation"}, "model": {"_name": "transformer_pn_tiny"}},
                "model": {}}, ckpt)
    with pytest.raises(SystemExit, match="is a translation model .*evaluate_bleu.sh"):
        evaluate.main(["ppl", "--data", str(tmp_path), "--checkpoint", str(ckpt)])
    lm = tmp_path / "lm.pt"
    torch.save({"cfg": {"task": {"_name": "language_modeling"}, "model": {"_name": "x"}},
                "model": {}}, lm)
    with pytest.raises(SystemExit, match="is a language model .*evaluate_ppl.sh"):
        evaluate.main(["bleu", "--data", str(tmp_path), "--checkpoint", str(lm)])


# --------------------------------------------------------------------------- fairseq-score (15)


def test_fairseq_score_sacrebleu_with_sacrebleu_2(tmp_path):
    text = "".join(f"the cat number {i} sat on the red mat today\n" for i in range(5))
    (tmp_path / "sys.txt").write_text(text)
    (tmp_path / "ref.txt").write_text(text)
    proc = subprocess.run(
        [sys.executable, "-m", "powernorm_fairseq.score", "--sacrebleu", "-s",
         str(tmp_path / "sys.txt"), "-r", str(tmp_path / "ref.txt")],
        capture_output=True, text=True, env=_env(), timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "BLEU = 100.00" in proc.stdout


# --------------------------------------------------------------------------- NumPy 2 (issue 13)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["eos", "complete"])
def test_lm_trains_with_sample_break_mode(mode, fairseq_cli, tiny_lm_data, plugin_dir, tmp_path):
    """fairseq's TokenBlockDataset uses np.compat (gone in NumPy 2) in the ``eos`` mode."""
    proc = fairseq_cli(
        "train", tiny_lm_data, "--user-dir", plugin_dir, "--task", "language_modeling",
        "--sample-break-mode", mode, "--tokens-per-sample", "32", "--arch",
        "transformer_lm_pn_tiny", "--decoder-norm", "power", "--optimizer", "adam", "--lr",
        "0.001", "--max-tokens", "256", "--max-update", "2", "--no-epoch-checkpoints",
        "--save-dir", tmp_path, "--log-format", "simple", "--log-interval", "1")
    assert "num_updates=2" in proc.stdout + proc.stderr


# --------------------------------------------------------------------------- log noise (21)


def test_plugin_entry_points_do_not_print_fairseqs_tensorboardx_notice():
    proc = subprocess.run([sys.executable, "-c", "import powernorm_fairseq, fairseq"],
                          capture_output=True, text=True, env=_env(), timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "tensorboardX" not in proc.stderr


def test_norm_speed_prints_no_profiler_lines(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "norm_speed.py"), "--shapes", "4x2x8",
         "--pad", "0", "--reps", "1", "--warmup", "0"],
        capture_output=True, text=True, env=_env(), timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "torch.nn.LayerNorm" in proc.stdout
    assert "USDT" not in proc.stderr + proc.stdout
