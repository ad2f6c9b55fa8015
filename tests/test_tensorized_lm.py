"""The Tensorized Transformer LM (``--self-attention multilinear``) with every norm.

In process: the architecture's wiring and parameter count, the causal mask (perturbing later
tokens leaves earlier outputs unchanged), padding invariance, incremental decoding equal to the
full forward pass (what fairseq's LM generation runs), norm folding, and early errors. Through
the command line (``--user-dir``, slow): tiny ``fairseq-train``, ``fairseq-eval-lm`` and an exact
resume per norm, and the hydra presets.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch

pytest.importorskip("fairseq")

from fairseq.sequence_generator import SequenceGenerator  # noqa: E402
from test_fairseq_cli import TIMING_FIELDS, train_inner  # noqa: E402
from test_fairseq_models import _warm_up_statistics, batches, build  # noqa: E402

from powernorm_fairseq.inference import fold_norms  # noqa: E402
from powernorm_fairseq.modules import MultilinearAttention  # noqa: E402
from powernorm_fairseq.norms import norm_names  # noqa: E402

ARCH = "transformer_lm_pn_tensorized_ptb"
# The paper's architecture at test size: 2 layers, d=32, FFN 64, rank 8, 2 cores, N = 16.
TINY = [
    "--decoder-layers", "2", "--decoder-embed-dim", "32", "--decoder-ffn-embed-dim", "64",
    "--multilinear-rank", "8", "--multilinear-cores", "2", "--max-target-positions", "16",
    "--pn-warmup-updates", "2",
]


def tiny_model(data, kind: str, *extra):
    return build(data, ARCH, "--decoder-norm", kind, *TINY, *extra, lm=True)


def test_paper_setting_and_parameter_count(tiny_lm_data):
    _, model, cfg = build(tiny_lm_data, ARCH, lm=True)
    layers = model.decoder.layers
    assert len(layers) == 3 and all(isinstance(x.self_attn, MultilinearAttention) for x in layers)
    attn = layers[0].self_attn
    assert (attn.embed_dim, attn.rank, attn.num_cores, attn.max_positions) == (256, 40, 1, 32)
    assert layers[0].fc1.out_features == 2100 and cfg.model.dropout == 0.1
    # per layer: W^q, W^k, W^v (256 x 40 each), the core (40), W^O (32^2 x 256), FFN, 2 norms
    per_layer = 3 * 256 * 40 + 40 + 32 * 32 * 256 + (256 * 2100 + 2100 + 2100 * 256 + 256) + 2 * 512
    vocab = len(model.decoder.dictionary)
    expected = vocab * 256 + 3 * per_layer + 512  # tied embedding + layers + output norm
    assert sum(p.numel() for p in model.parameters()) == expected
    # the standard attention is untouched by the new option
    _, standard, _ = build(tiny_lm_data, "transformer_lm_pn_tiny", lm=True)
    assert type(standard.decoder.layers[0].self_attn).__name__ == "MultiheadAttention"


@pytest.mark.parametrize("kind", norm_names())
def test_no_position_sees_a_later_token(tiny_lm_data, kind):
    task, model, _ = tiny_model(tiny_lm_data, kind)
    _warm_up_statistics(model, task)
    model.eval()  # batch norms use running statistics here (in training a batch statistic
    # mixes every token of the batch, later ones included: a property of batch norms in an LM)
    tokens = batches(task, "test")[0]["net_input"]["src_tokens"][:2, :12]
    with torch.no_grad():
        base = model(tokens)[0]
        for t in (0, 5, 10):
            changed = tokens.clone()
            changed[:, t + 1 :] = torch.randint(4, len(task.dictionary), changed[:, t + 1 :].shape)
            out = model(changed)[0]
            torch.testing.assert_close(out[:, : t + 1], base[:, : t + 1], rtol=0, atol=1e-5)
            assert not torch.allclose(out[:, t + 1 :], base[:, t + 1 :])


@pytest.mark.parametrize("kind", norm_names())
def test_right_padding_leaves_every_token_unchanged(tiny_lm_data, kind):
    task, model, _ = tiny_model(tiny_lm_data, kind)
    _warm_up_statistics(model, task)
    model.eval()
    pad = task.dictionary.pad()
    tokens = batches(task, "test")[0]["net_input"]["src_tokens"][:3, :10].clone()
    lengths = [10, 6, 3]
    for n, length in enumerate(lengths):
        tokens[n, length:] = pad
    with torch.no_grad():
        padded = model(tokens)[0]
        for n, length in enumerate(lengths):
            alone = model(tokens[n : n + 1, :length])[0]
            torch.testing.assert_close(padded[n : n + 1, :length], alone, rtol=0, atol=1e-5)


@pytest.mark.parametrize("kind", norm_names())
def test_generation_scores_equal_the_full_forward(tiny_lm_data, kind):
    """fairseq's LM generation runs the decoder incrementally; its scores must be the model's."""
    task, model, _ = tiny_model(tiny_lm_data, kind)
    _warm_up_statistics(model, task)
    model.eval()
    generator = SequenceGenerator([model], task.target_dictionary, beam_size=3, max_len_b=10)
    sample = batches(task, "test", max_sentences=4)[0]
    with torch.no_grad():
        hypos = generator.generate([model], sample)
    eos = task.target_dictionary.eos()
    for sentence_hypos in hypos:
        for hypo in sentence_hypos:
            tokens = hypo["tokens"].unsqueeze(0)
            prev = torch.cat([tokens.new_full((1, 1), eos), tokens[:, :-1]], dim=1)
            with torch.no_grad():
                lprobs = model.get_normalized_probs(model(prev), log_probs=True)
            scores = lprobs.gather(-1, tokens.unsqueeze(-1)).squeeze()
            torch.testing.assert_close(scores, hypo["positional_scores"], rtol=0, atol=1e-4)


@pytest.mark.parametrize("kind", ["batch", "power"])
def test_folded_norms_compute_the_same(tiny_lm_data, kind):
    """fold_norms absorbs each self-attention norm into W^q, W^k, W^v (bias-free: gets a bias)."""
    task, model, _ = tiny_model(tiny_lm_data, kind)
    _warm_up_statistics(model, task)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.2 * torch.randn_like(p))
    model.eval()
    folded = copy.deepcopy(model)
    report = fold_norms(folded)
    assert report["decoder.layers.0.self_attn_layer_norm"] == "folded"
    assert folded.decoder.layers[0].self_attn.q_proj.bias is not None
    tokens = batches(task, "test")[0]["net_input"]["src_tokens"][:4, :12]
    with torch.no_grad():
        torch.testing.assert_close(folded(tokens)[0], model(tokens)[0], rtol=1e-5, atol=1e-5)


def test_attention_dropout_is_rejected(tiny_lm_data):
    with pytest.raises(ValueError, match="--attention-dropout 0"):
        tiny_model(tiny_lm_data, "layer", "--attention-dropout", "0.1")


def test_too_long_sequences_fail_clearly(tiny_lm_data):
    _, model, _ = tiny_model(tiny_lm_data, "layer")
    with pytest.raises(ValueError, match="at most 16 positions .* got 17"):
        model(torch.full((1, 17), 5))


# --------------------------------------------------------------------------- command line

LM_TRAIN = [
    "--task", "language_modeling", "--tokens-per-sample", "16", "--arch", ARCH, *TINY,
    "--optimizer", "adam", "--lr", "0.003", "--max-tokens", "256", "--seed", "1",
    "--log-format", "simple", "--log-interval", "1", "--no-epoch-checkpoints",
]


@pytest.mark.slow
@pytest.mark.parametrize("kind", norm_names())
def test_trains_scores_and_resumes(kind, fairseq_cli, tiny_lm_data, plugin_dir, tmp_path):
    def train(save_dir, updates):
        proc = fairseq_cli(
            "train", tiny_lm_data, "--user-dir", plugin_dir, *LM_TRAIN, "--decoder-norm", kind,
            "--max-update", updates, "--save-dir", save_dir,
        )
        return train_inner(proc.stdout + proc.stderr)

    straight = train(tmp_path / "straight", 8)
    losses = [float(straight[u]["loss"]) for u in sorted(straight)]
    assert len(losses) == 8 and all(math.isfinite(x) for x in losses)
    assert losses[-1] < losses[0] - 0.5, f"loss did not decrease: {losses}"

    proc = fairseq_cli(
        "eval_lm", tiny_lm_data, "--user-dir", plugin_dir, "--gen-subset", "test",
        "--path", tmp_path / "straight" / "checkpoint_last.pt", "--tokens-per-sample", 16,
        "--batch-size", 4,
    )
    lines = (tiny_lm_data / "raw" / "test.txt").read_text().splitlines()
    n_tokens = sum(len(line.split()) + 1 for line in lines)
    assert f"Evaluated {n_tokens} tokens" in proc.stderr
    assert math.isfinite(float(proc.stderr.split("Perplexity: ")[1].split()[0]))

    train(tmp_path / "resumed", 4)
    resumed = train(tmp_path / "resumed", 8)
    assert sorted(resumed) == [5, 6, 7, 8]
    for update in resumed:
        keep = set(straight[update]) - TIMING_FIELDS
        assert {k: resumed[update][k] for k in keep} == {k: straight[update][k] for k in keep}


@pytest.mark.slow
@pytest.mark.parametrize("preset", ["ptb_tensorized_pn", "ptb_cpu_tensorized_bn"])
def test_hydra_presets_train_the_tensorized_model(preset, fairseq_cli, tiny_lm_data, tmp_path):
    save_dir = tmp_path / "ck"
    proc = fairseq_cli(
        "powernorm_fairseq.hydra_train", "--config-name", preset, f"task.data={tiny_lm_data}",
        "model.decoder_layers=1", "model.decoder_ffn_embed_dim=64", "dataset.batch_size=8",
        "dataset.max_tokens=null", "optimization.max_update=3", f"checkpoint.save_dir={save_dir}",
        "common.log_interval=1", cwd=tmp_path,
    )
    assert "num_updates=3" in proc.stdout + proc.stderr
    state = torch.load(save_dir / "checkpoint_last.pt", weights_only=True)
    assert state["cfg"]["model"]["self_attention"] == "multilinear"
    assert state["model"]["decoder.layers.0.self_attn.out_proj.weight"].shape[1] == 32 * 32
    assert state["model"]["decoder.layers.0.self_attn.core"].shape == (1, 40)


@pytest.mark.parametrize("arch,extra", [(ARCH, TINY), ("transformer_lm_pn_tiny", [])], ids=["multilinear", "standard"])
def test_the_leak_probe_is_zero_for_a_masked_model_and_not_for_the_authors_unmasked_one(tiny_lm_data, arch, extra):
    """Issue 36 item 6: shuffling the tokens after position t (the one t predicts included) leaves
    t's log-probability exactly as it was in a causal model, with either attention; the authors'
    multi-linear attention (``--multilinear-unmasked``: its mask built, never applied) reads them."""
    from powernorm_fairseq.analysis.leak import leak_probe

    blocks = torch.randint(4, 20, (3, 12), generator=torch.Generator().manual_seed(0))
    _, masked, _ = build(tiny_lm_data, arch, "--decoder-norm", "layer", *extra, lm=True)
    assert leak_probe(masked, blocks)["max_abs"] == 0.0
    if arch != ARCH:
        return
    _, unmasked, _ = build(tiny_lm_data, arch, "--decoder-norm", "layer", *extra, "--multilinear-unmasked", lm=True)
    assert all(layer.self_attn.unmasked for layer in unmasked.decoder.layers)
    probe = leak_probe(unmasked, blocks)
    assert probe["mean_abs"] > 1e-4 and probe["positions"] == 3 * 10
