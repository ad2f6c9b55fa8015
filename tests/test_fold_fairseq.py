"""fold_norms on the plugin's fairseq model ``transformer_pn`` (arch ``transformer_pn_tiny``)."""

import copy
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("fairseq")

from fairseq import options, tasks  # noqa: E402
from fairseq.sequence_generator import SequenceGenerator  # noqa: E402
from fairseq_cli import generate, preprocess  # noqa: E402

import powernorm_fairseq.models  # noqa: E402, F401  (registers transformer_pn in any import order)
from powernorm_fairseq.inference import FoldedAffine, FoldedNorm, fold_norms  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
PLUGIN = str(REPO / "powernorm_fairseq")
WORDS = [f"w{i}" for i in range(30)]

# (encoder norm, decoder norm, extra options, groups of the pre-scaling left after folding):
# PN both sides (reference: GroupScaling with one group per head stays), the paper's PN (nothing
# left), PN-V and BN, and the released wiring (PN in the encoder only).
CASES = {
    "pn_reference": ("power", "power", [], 4),
    "pn_paper": ("power", "power", ["--pn-variant", "paper"], 0),
    "pn_v": ("power_v", "power_v", [], 0),
    "bn": ("batch", "batch", [], 0),
    "pn_encoder_only": ("power", "layer", [], 4),
}


@pytest.fixture(scope="module")
def dict_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("dicts")
    for lang in ("src", "tgt"):
        (path / f"dict.{lang}.txt").write_text(
            "".join(f"{w} {100 - i}\n" for i, w in enumerate(WORDS))
        )
    return path


def _build(dict_dir, enc, dec, extra, share=True):
    parser = options.get_training_parser()
    argv = [str(dict_dir), "--user-dir", PLUGIN, "--task", "translation", "-s", "src", "-t", "tgt",
            "--arch", "transformer_pn_tiny", "--encoder-norm", enc, "--decoder-norm", dec,
            "--dropout", "0", "--attention-dropout", "0", "--activation-dropout", "0", *extra]  # fmt: skip
    if share:
        argv.append("--share-all-embeddings")
    args = options.parse_args_and_arch(parser, argv)
    task = tasks.setup_task(args)
    torch.manual_seed(0)
    model = task.build_model(args)
    return model, task


def _batch(task, bsz=4, src_len=7, tgt_len=6, seed=1, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    d = task.source_dictionary
    lengths = torch.randint(3, src_len + 1, (bsz,), generator=g)
    lengths[0] = src_len
    src = torch.full((bsz, src_len), d.pad())
    for i, n in enumerate(lengths.tolist()):  # left-padded, as fairseq's translation task
        src[i, src_len - n :] = torch.randint(d.nspecial, len(d), (n,), generator=g)
        src[i, -1] = d.eos()
    prev = torch.randint(d.nspecial, len(d), (bsz, tgt_len), generator=g)
    prev[:, 0] = d.eos()
    return src.to(device), lengths.to(device), prev.to(device)


def _prepare(model, task, device="cpu"):
    """Train-mode forwards move the running statistics; random norm weights make the affine
    maps non-trivial; then eval mode (on ``device``)."""
    model.to(device)
    with torch.no_grad():
        for seed in range(3):
            model(*_batch(task, seed=seed + 10, device=device))
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.2 * torch.randn_like(p))
    return model.eval()


def _incremental(model, src, lengths, prev):
    enc = model.encoder(src, src_lengths=lengths)
    state: dict = {}
    steps = [
        model.decoder(prev[:, : t + 1], encoder_out=enc, incremental_state=state)[0]
        for t in range(prev.size(1))
    ]
    return torch.cat(steps, dim=1)


@pytest.mark.parametrize("case", sorted(CASES))
def test_folded_fairseq_model_matches(dict_dir, case, device):
    enc, dec, extra, groups = CASES[case]
    model, task = _build(dict_dir, enc, dec, extra)
    model = _prepare(model, task, device)
    folded = copy.deepcopy(model)
    report = fold_norms(folded)
    src, lengths, prev = _batch(task, device=device)
    with torch.no_grad():
        expected = model(src, lengths, prev)[0]
        torch.testing.assert_close(folded(src, lengths, prev)[0], expected, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(
            _incremental(folded, src, lengths, prev), expected, atol=1e-5, rtol=1e-5
        )
        torch.testing.assert_close(
            _incremental(folded, src, lengths, prev),
            _incremental(model, src, lengths, prev),
            atol=1e-5,
            rtol=1e-5,
        )
    # Every batch-statistics site is replaced; with tied embeddings the decoder output norm is
    # the one site that cannot fold into its consumer.
    layers = len(model.encoder.layers)
    expected_sites = 2 * layers + 1 + (3 * len(model.decoder.layers) + 1 if dec != "layer" else 0)
    assert len(report) == expected_sites
    fused = {n for n, how in report.items() if how == "fused"}
    assert fused == ({"decoder.layer_norm"} if dec != "layer" else set())
    assert isinstance(
        folded.decoder.layer_norm,
        FoldedAffine if dec != "layer" else type(model.decoder.layer_norm),
    )
    assert isinstance(folded.encoder.layers[0].final_layer_norm, FoldedNorm)
    assert folded.encoder.layers[0].final_layer_norm.group_num == groups


def test_untied_output_projection_folds(dict_dir):
    model, task = _build(dict_dir, "power", "power", [], share=False)
    model = _prepare(model, task)
    folded = copy.deepcopy(model)
    assert set(fold_norms(folded).values()) == {"folded"}
    src, lengths, prev = _batch(task)
    with torch.no_grad():
        torch.testing.assert_close(
            folded(src, lengths, prev)[0], model(src, lengths, prev)[0], atol=1e-5, rtol=1e-5
        )


def test_beam_search_identical(dict_dir, device):
    model, task = _build(dict_dir, "power", "power", [])
    model = _prepare(model, task, device)
    folded = copy.deepcopy(model)
    fold_norms(folded)
    src, lengths, _ = _batch(task, bsz=6, seed=3, device=device)
    sample = {"net_input": {"src_tokens": src, "src_lengths": lengths}}
    hypos = [
        SequenceGenerator([m], task.target_dictionary, beam_size=3, max_len_b=8).generate(
            [m], sample
        )
        for m in (model, folded)
    ]
    for plain, fast in zip(*hypos, strict=True):
        assert [h["tokens"].tolist() for h in plain] == [h["tokens"].tolist() for h in fast]


def test_fold_training_model_raises(dict_dir):
    model, _ = _build(dict_dir, "power", "power", [])
    with pytest.raises(ValueError, match="eval mode"):
        fold_norms(model)


@pytest.mark.slow
def test_generate_entry_point_matches_fairseq_generate(tmp_path, dict_dir, capsys):
    """Train 2 updates through fairseq-train, then decode with fairseq-generate (in-process) and
    with ``python -m powernorm_fairseq.inference.generate``: the same hypotheses."""
    g = torch.Generator().manual_seed(0)
    raw = tmp_path / "raw"
    raw.mkdir()
    for split, n in (("train", 64), ("test", 8)):
        for lang in ("src", "tgt"):
            lines = [
                " ".join(WORDS[i] for i in torch.randint(0, len(WORDS), (int(k),), generator=g))
                for k in torch.randint(3, 9, (n,), generator=g)
            ]
            (raw / f"{split}.{lang}").write_text("\n".join(lines) + "\n")
    data = tmp_path / "bin"
    preprocess.main(options.get_preprocessing_parser().parse_args(
        ["-s", "src", "-t", "tgt", "--srcdict", str(dict_dir / "dict.src.txt"),
         "--tgtdict", str(dict_dir / "dict.tgt.txt"), "--trainpref", str(raw / "train"),
         "--testpref", str(raw / "test"), "--destdir", str(data)]
    ))  # fmt: skip
    ckpt = tmp_path / "ckpt"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    def run(module, *args):
        cmd = [sys.executable, "-m", module, *map(str, args)]
        return subprocess.run(cmd, capture_output=True, text=True, check=True, env=env, cwd=REPO)

    run("fairseq_cli.train", data, "--user-dir", PLUGIN, "--arch", "transformer_pn_tiny",
        "--encoder-norm", "power", "--decoder-norm", "power", "--share-all-embeddings",
        "--optimizer", "adam", "--lr", "1e-3", "--max-tokens", "500", "--max-update", "2",
        "--save-dir", ckpt, "--no-epoch-checkpoints", "--disable-validation", "--num-workers", "0",
        "--seed", "1")  # fmt: skip
    gen = [str(data), "--user-dir", PLUGIN, "--path", str(ckpt / "checkpoint_last.pt"),
           "--beam", "3", "--batch-size", "4", "--gen-subset", "test", "--max-len-b", "10",
           "--num-workers", "0"]  # fmt: skip
    capsys.readouterr()
    generate.main(options.parse_args_and_arch(options.get_generation_parser(), gen))
    plain = capsys.readouterr().out
    folded = run("powernorm_fairseq.inference.generate", *gen)
    hypo = re.compile(r"^H-(\d+)\t\S+\t(.*)$", re.MULTILINE)
    assert sorted(hypo.findall(folded.stdout)) == sorted(hypo.findall(plain))
    assert len(hypo.findall(plain)) == 8
    assert "11 norms folded into linear layers, 1 fused" in folded.stdout + folded.stderr
