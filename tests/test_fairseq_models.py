"""In-process tests of the fairseq models ``transformer_pn`` / ``transformer_lm_pn`` and compat.

Option parsing, where each norm goes, that every norm receives the padding mask, that fairseq's own
LayerNorm transformer loads and computes the same, that incremental (beam) decoding scores what a
full forward pass scores, the fairseq-fixed workarounds, and the hydra presets.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("fairseq")

from fairseq import checkpoint_utils, options, tasks, utils  # noqa: E402
from fairseq.dataclass.utils import convert_namespace_to_omegaconf  # noqa: E402
from fairseq.models import ARCH_MODEL_NAME_REGISTRY, MODEL_DATACLASS_REGISTRY  # noqa: E402
from fairseq.models.transformer.transformer_config import (  # noqa: E402
    EncDecBaseConfig,
    TransformerConfig,
)
from fairseq.sequence_generator import SequenceGenerator  # noqa: E402

import powernorm_fairseq.models  # noqa: E402, F401  (registers the models, applies compat)
from powernorm_fairseq import compat, presets  # noqa: E402
from powernorm_fairseq.models.pn_config import TransformerPNConfig  # noqa: E402
from powernorm_fairseq.norms import NORM_CHOICES, NORM_REGISTRY  # noqa: E402

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
MT_FLAGS = ["--task", "translation", "-s", "src", "-t", "tgt"]
# (options, name) per norm kind, including both PowerNorm variants.
NORM_CASES = {
    "layer": [],
    "batch": [],
    "power_v": [],
    "power_reference": ["--pn-variant", "reference", "--pn-warmup-updates", "2"],
    "power_paper": ["--pn-variant", "paper", "--pn-warmup-updates", "2"],
}


def _kind(case: str) -> str:
    return case.split("_")[0] if case.startswith("power_") and case != "power_v" else case


def parse(argv: list[str], parser=None):
    parser = parser or options.get_training_parser()
    return options.parse_args_and_arch(parser, [str(a) for a in argv])


def build(data, arch: str, *extra, lm: bool = False):
    """(task, model, cfg) for ``arch`` on the tiny data-bin ``data``, built as fairseq-train does."""
    task_flags = ["--task", "language_modeling", "--tokens-per-sample", "16"] if lm else MT_FLAGS
    args = parse([data, "--arch", arch, *task_flags, *extra])
    cfg = convert_namespace_to_omegaconf(args)
    task = tasks.setup_task(cfg.task)
    torch.manual_seed(0)
    return task, task.build_model(cfg.model), cfg


def batches(task, split: str, max_sentences: int = 8):
    task.load_dataset(split)
    itr = task.get_batch_iterator(
        task.dataset(split), max_sentences=max_sentences, seed=1, ignore_invalid_inputs=True
    ).next_epoch_itr(shuffle=False)
    return list(itr)


def norm_sites(model) -> dict[str, torch.nn.Module]:
    """Qualified name -> module for every norm site of a PN model."""
    names = ("self_attn_layer_norm", "encoder_attn_layer_norm", "final_layer_norm", "layer_norm")
    return {
        name: module
        for name, module in model.named_modules()
        if name.split(".")[-1] in names and module is not None
    }


# --------------------------------------------------------------------------- option parsing


@pytest.mark.parametrize(
    ("arch", "option", "task"),
    [
        ("transformer_pn_tiny", "--encoder-norm", MT_FLAGS),
        ("transformer_pn_tiny", "--decoder-cross-attn-norm", MT_FLAGS),
        ("transformer_lm_pn_tiny", "--decoder-norm", ["--task", "language_modeling"]),
    ],
)
def test_bad_norm_fails_at_parsing_listing_choices(arch, option, task, capsys, tmp_path):
    with pytest.raises(SystemExit) as excinfo:
        parse([tmp_path, "--arch", arch, *task, option, "nonsense"])
    assert excinfo.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {option}: invalid choice: 'nonsense'" in err
    for choice in NORM_CHOICES:
        assert f"'{choice}'" in err


def test_norm_options_parse_with_help_and_defaults(tmp_path):
    args = parse([tmp_path, "--arch", "transformer_pn_tiny", *MT_FLAGS])
    assert args.encoder_norm == "layer" and args.decoder_norm == "layer"
    assert args.encoder_ffn_norm is None and args.decoder_cross_attn_norm is None
    assert (args.pn_variant, args.pn_warmup_updates, args.pn_group_num) == ("reference", 0, -1)
    assert args.encoder_normalize_before and args.decoder_normalize_before
    parser = options.get_training_parser()
    parse([tmp_path, "--arch", "transformer_pn_tiny", *MT_FLAGS], parser)
    helps = {a.dest: a.help for a in parser._actions}
    for dest in ("encoder_norm", "decoder_final_norm", "pn_warmup_updates", "track_norm_stats"):
        assert helps.get(dest), f"--{dest} has no help text"
    assert "learning-rate" in helps["pn_warmup_updates"]


def test_every_registered_norm_is_a_choice():
    assert set(NORM_CHOICES) == set(NORM_REGISTRY)


# --------------------------------------------------------------------------- model structure


def test_the_norm_site_options_are_declared_once_for_both_model_families():
    """Issue 35 item 6: the per-site norm options of the translation sub-configs and of the
    language model's flat config come from one declaration (``pn_config.norm_site_fields``, over
    ``SITES``): the same names (the LM's with ``decoder_``, without encoder attention), types,
    defaults and help."""
    from powernorm_fairseq.models.pn_config import PNDecoderConfig, PNEncoderConfig
    from powernorm_fairseq.models.transformer_lm_pn import TransformerLMPNConfig
    from powernorm_fairseq.modules.norm_factory import norm_fields

    def site_fields(cls, prefix, names):
        by_name = {f.name: f for f in dataclasses.fields(cls)}
        return {n: (str(by_name[prefix + n].type), by_name[prefix + n].default,
                    by_name[prefix + n].metadata["help"]) for n in names}

    encoder, decoder = norm_fields().values()
    lm = norm_fields(("decoder",), language_model=True)["decoder"]
    assert "cross_attn_norm" in decoder and "cross_attn_norm" not in lm
    translation = site_fields(PNDecoderConfig, "", decoder)
    assert site_fields(TransformerLMPNConfig, "decoder_", lm) == {n: translation[n] for n in lm}
    assert set(site_fields(PNEncoderConfig, "", encoder)) == set(encoder)
    assert translation["norm"][1] == "layer" and translation["ffn_norm"][1] is None


def test_sites_follow_side_and_per_site_options(tiny_mt_data):
    _, model, _ = build(
        tiny_mt_data, "transformer_pn_tiny",
        "--encoder-norm", "power", "--encoder-ffn-norm", "batch", "--encoder-final-norm", "power_v",
        "--decoder-norm", "layer", "--decoder-cross-attn-norm", "power",
        "--pn-variant", "reference",
    )
    kinds = {name: type(m).__name__ for name, m in norm_sites(model).items()}
    assert kinds["encoder.layers.0.self_attn_layer_norm"] == "PowerNormReference"
    assert kinds["encoder.layers.1.final_layer_norm"] == "MaskedBatchNorm"
    assert kinds["encoder.layer_norm"] == "PowerNormV"
    assert kinds["decoder.layers.0.self_attn_layer_norm"] == "LayerNorm"
    assert kinds["decoder.layers.1.encoder_attn_layer_norm"] == "PowerNormReference"
    assert kinds["decoder.layers.0.final_layer_norm"] == "LayerNorm"
    assert kinds["decoder.layer_norm"] == "LayerNorm"
    assert len(kinds) == (2 * 2 + 1) + (2 * 3 + 1)  # 2+2 layers and the two output norms
    # GroupScaling groups default to the number of attention heads for the reference PN.
    assert model.encoder.layers[0].self_attn_layer_norm.group_num == 4


def test_pn_options_reach_the_norms(tiny_mt_data):
    _, model, _ = build(
        tiny_mt_data, "transformer_pn_tiny", "--encoder-norm", "power", "--pn-variant", "paper",
        "--pn-alpha-fwd", "0.8", "--pn-alpha-bkw", "0.7", "--pn-warmup-updates", "30",
        "--pn-final-warmup-updates", "5",
    )
    layer_norm, final_norm = model.encoder.layers[0].final_layer_norm, model.encoder.layer_norm
    assert type(layer_norm).__name__ == "PowerNormPaper"
    assert (layer_norm.alpha_fwd, layer_norm.alpha_bkw) == (0.8, 0.7)
    assert (layer_norm.warmup_updates, final_norm.warmup_updates) == (30, 5)
    assert layer_norm.group_num == 0  # no pre-scaling for the paper variant by default


def test_lm_sites(tiny_lm_data):
    _, model, _ = build(
        tiny_lm_data, "transformer_lm_pn_tiny", "--decoder-norm", "power_v",
        "--decoder-ffn-norm", "batch", lm=True,
    )
    kinds = {name: type(m).__name__ for name, m in norm_sites(model).items()}
    assert kinds == {
        "decoder.layers.0.self_attn_layer_norm": "PowerNormV",
        "decoder.layers.0.final_layer_norm": "MaskedBatchNorm",
        "decoder.layers.1.self_attn_layer_norm": "PowerNormV",
        "decoder.layers.1.final_layer_norm": "MaskedBatchNorm",
        "decoder.layer_norm": "PowerNormV",
    }
    assert model.decoder.layers[0].normalize_before


@pytest.mark.parametrize("case", ["batch", "power_v", "power_reference"])
def test_every_norm_receives_the_padding_mask(tiny_mt_data, case, device):
    kind = _kind(case)
    _, model, _ = build(
        tiny_mt_data, "transformer_pn_tiny", "--encoder-norm", kind, "--decoder-norm", kind,
        *NORM_CASES[case],
    )
    model.to(device)
    seen = {}

    def hook(name):
        def record(module, args, kwargs):
            mask = args[1] if len(args) > 1 else kwargs.get("padding_mask")
            seen[name] = None if mask is None else (tuple(mask.shape), tuple(args[0].shape))

        return record

    for name, module in norm_sites(model).items():
        module.register_forward_pre_hook(hook(name), with_kwargs=True)
    src = torch.tensor([[5, 6, 7, 2], [1, 1, 8, 2]], device=device)  # left-padded (pad 1, eos 2)
    prev = torch.tensor([[2, 9, 10, 11], [2, 12, 1, 1]], device=device)  # right-padded target
    model.train()
    model(src, torch.tensor([4, 2], device=device), prev)
    assert set(seen) == set(norm_sites(model))
    for name, shapes in seen.items():
        assert shapes is not None, f"{name} got no padding mask"
        (b, t), (t_x, b_x, _) = shapes
        assert (b, t) == (b_x, t_x), name


# --------------------------------------------------------------------------- compatibility


def test_fairseq_layernorm_transformer_loads_and_matches(tiny_mt_data):
    dims = [
        "--encoder-embed-dim", "32", "--decoder-embed-dim", "32", "--encoder-ffn-embed-dim", "64",
        "--decoder-ffn-embed-dim", "64", "--encoder-layers", "2", "--decoder-layers", "2",
        "--encoder-attention-heads", "4", "--decoder-attention-heads", "4",
        "--encoder-normalize-before", "--decoder-normalize-before",
    ]
    task, ref, _ = build(tiny_mt_data, "transformer", *dims)
    _, ours, _ = build(tiny_mt_data, "transformer_pn", *dims)
    ours.load_state_dict(ref.state_dict(), strict=True)
    ref.eval()
    ours.eval()
    net_input = batches(task, "valid", 32)[0]["net_input"]
    with torch.no_grad():
        expected, _ = ref(**net_input)
        got, _ = ours(**net_input)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)


def test_default_transformer_config_is_never_mutated(tiny_mt_data):
    build(tiny_mt_data, "transformer_pn_tiny", "--encoder-norm", "power")
    assert not hasattr(EncDecBaseConfig, "norm")
    assert TransformerConfig().encoder is EncDecBaseConfig  # fairseq's own (class) default
    a, b = TransformerPNConfig(), TransformerPNConfig()
    a.encoder.norm = "power"
    assert b.encoder.norm == "layer"
    names = {f.name for f in dataclasses.fields(type(a.encoder))}
    assert {"norm", "self_attn_norm", "ffn_norm", "final_norm"} <= names


def test_batch_by_size_keeps_the_tail():
    from fairseq.data import data_utils

    indices = np.arange(21)
    sizes = np.full(21, 5, dtype=np.int64)
    kwargs = dict(max_sentences=8, required_batch_size_multiple=8)
    original = compat._ORIGINAL["batch_by_size"](indices, None, sizes, **kwargs)
    patched = data_utils.batch_by_size(indices, None, sizes, **kwargs)
    assert sum(map(len, original)) == 16  # fairseq-fixed drops the last 5
    assert sorted(np.concatenate(patched).tolist()) == list(range(21))
    assert [len(b) for b in patched] == [8, 8, 5]


def test_checkpoint_copies_are_atomic(tmp_path, monkeypatch):
    """fairseq copies checkpoint_N.pt to checkpoint_last.pt: a copy killed midway must leave the
    old checkpoint_last.pt whole (and no temporary file); a finished copy replaces it."""
    pm = checkpoint_utils.PathManager
    assert issubclass(pm, compat._ORIGINAL["checkpoint_utils.PathManager"])
    src, dst = tmp_path / "checkpoint3.pt", tmp_path / "checkpoint_last.pt"
    src.write_bytes(b"new" * 1000)
    dst.write_bytes(b"old")
    real_copyfile = shutil.copyfile

    def killed_copy(a, b):
        Path(b).write_bytes(Path(a).read_bytes()[:10])
        raise KeyboardInterrupt  # e.g. the run is stopped while copying

    monkeypatch.setattr(shutil, "copyfile", killed_copy)
    with pytest.raises(KeyboardInterrupt):
        pm.copy(str(src), str(dst), overwrite=True)
    assert dst.read_bytes() == b"old" and sorted(p.name for p in tmp_path.iterdir()) == [
        "checkpoint3.pt", "checkpoint_last.pt"]
    monkeypatch.setattr(shutil, "copyfile", real_copyfile)
    assert pm.copy(str(src), str(dst), overwrite=True)
    assert dst.read_bytes() == src.read_bytes()
    assert not pm.copy(str(src), str(dst), overwrite=False)  # iopath: no overwrite, no copy


def test_checkpoint_with_namespace_loads_weights_only(tmp_path):
    path = tmp_path / "ck.pt"
    torch.save({"args": argparse.Namespace(arch="transformer_pn_tiny"), "model": {}}, path)
    state = torch.load(path, weights_only=True)
    assert state["args"].arch == "transformer_pn_tiny"


@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty"])
def test_corrupt_checkpoint_gives_clear_error(tmp_path, damage):
    path = tmp_path / "checkpoint_last.pt"
    torch.save({"model": {"w": torch.zeros(1000)}}, path)
    data = path.read_bytes()
    path.write_bytes({"truncate": data[: len(data) // 2], "garbage": b"not a checkpoint" * 10,
                      "empty": b""}[damage])
    with pytest.raises(compat.CheckpointError, match="truncated or corrupt") as excinfo:
        checkpoint_utils.load_checkpoint_to_cpu(str(path))
    assert str(path) in str(excinfo.value)
    assert "--restore-file" in str(excinfo.value)


# --------------------------------------------------------------------------- inference


def _to(sample, device):
    return utils.apply_to_sample(lambda t: t.to(device), sample)


def _warm_up_statistics(model, task, split="train", steps=3, device="cpu"):
    """A few training-mode forward/backward passes so running statistics move off their init."""
    model.train()
    for step, sample in enumerate(batches(task, split)[:steps], start=1):
        sample = _to(sample, device)
        model.set_num_updates(step)
        out, _ = model(**sample["net_input"])
        out.float().logsumexp(-1).mean().backward()
    model.zero_grad()


PRECISIONS = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@pytest.mark.parametrize("precision", list(PRECISIONS))
@pytest.mark.parametrize("case", list(NORM_CASES))
def test_training_steps_in_each_precision(tiny_mt_data, case, precision, device):
    """Training steps of ``transformer_pn_tiny`` with the whole model cast to fp32/fp16/bf16 (as
    fairseq ``--fp16`` / ``--bf16`` cast it), past PN's warmup: finite loss and gradients, norm
    buffers kept in float32, finite, and moved off their initial values."""
    kind = _kind(case)
    task, model, _ = build(
        tiny_mt_data, "transformer_pn_tiny", "--encoder-norm", kind, "--decoder-norm", kind,
        *NORM_CASES[case],
    )
    model.to(device=device, dtype=PRECISIONS[precision]).train()
    norm_buffers = {f"{site}.{k}": v for site, norm in norm_sites(model).items()
                    for k, v in norm.named_buffers()}
    initial = {k: v.clone() for k, v in norm_buffers.items() if v.is_floating_point()}
    for step, sample in enumerate(batches(task, "train")[:4], start=1):
        sample = _to(sample, device)
        model.set_num_updates(step)
        out, _ = model(**sample["net_input"])
        loss = out.float().log_softmax(-1).gather(-1, sample["target"].unsqueeze(-1)).mean()
        (-loss).backward()
        assert torch.isfinite(loss), f"step {step}: loss {loss.item()}"
        for name, p in model.named_parameters():
            assert p.grad is None or torch.isfinite(p.grad).all(), f"step {step}: grad of {name}"
        model.zero_grad()
    moved = False
    for site, norm in norm_sites(model).items():
        for name, buf in ((f"{site}.{k}", v) for k, v in norm.named_buffers()):
            if name not in initial:
                continue
            assert buf.dtype == torch.float32 and torch.isfinite(buf).all(), name
            moved |= not torch.equal(buf, initial[name])
    assert moved or kind == "layer"


@pytest.mark.parametrize("case", list(NORM_CASES))
def test_incremental_beam_search_scores_equal_full_forward(tiny_mt_data, case, device):
    kind = _kind(case)
    task, model, _ = build(
        tiny_mt_data, "transformer_pn_tiny", "--encoder-norm", kind, "--decoder-norm", kind,
        *NORM_CASES[case],
    )
    model.to(device)
    _warm_up_statistics(model, task, device=device)
    model.eval()
    generator = SequenceGenerator([model], task.target_dictionary, beam_size=3, max_len_b=12)
    sample = _to(batches(task, "test")[0], device)
    with torch.no_grad():
        hypos = generator.generate([model], sample)
    eos, pad = task.target_dictionary.eos(), task.target_dictionary.pad()
    compared = 0
    for i, sentence_hypos in enumerate(hypos):
        src = sample["net_input"]["src_tokens"][i]
        src = src[src.ne(pad)].unsqueeze(0)
        for hypo in sentence_hypos:
            tokens = hypo["tokens"].unsqueeze(0)
            prev = torch.cat([tokens.new_full((1, 1), eos), tokens[:, :-1]], dim=1)
            with torch.no_grad():
                net_out = model(src, torch.tensor([src.numel()], device=src.device), prev)
                lprobs = model.get_normalized_probs(net_out, log_probs=True)
            scores = lprobs.gather(-1, tokens.unsqueeze(-1)).squeeze()
            torch.testing.assert_close(scores, hypo["positional_scores"], rtol=0, atol=1e-4)
            compared += 1
    assert compared == 3 * len(hypos)


# --------------------------------------------------------------------------- gradients

NO_DROPOUT = ["--dropout", "0", "--attention-dropout", "0", "--activation-dropout", "0"]


def _loss(model, src, lengths, prev, target, pad):
    """Summed NLL over the non-pad target tokens."""
    lprobs = model.get_normalized_probs(model(src, lengths, prev), log_probs=True)
    nll = -lprobs.gather(-1, target.unsqueeze(-1)).squeeze(-1)
    return nll[target.ne(pad)].sum()


def _grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _rel_diff(a: dict, b: dict) -> float:
    """Largest relative difference of the gradients ``a[k]``, ``b[k]`` over the parameters ``k``;
    a floor of 1e-6 of the whole gradient's norm keeps gradients that are 0 in exact arithmetic
    (attention's key bias) from dividing rounding noise by rounding noise."""
    assert a.keys() == b.keys()
    floor = 1e-6 * float(torch.stack([g.norm() for g in a.values()]).norm())
    return max(float((a[k] - b[k]).norm()) / (float(a[k].norm()) + floor) for k in a)


@pytest.mark.parametrize("case", list(NORM_CASES))
def test_appended_pad_columns_change_no_gradient(tiny_mt_data, case, kernel_path):
    """Appending pad columns (source, target and previous tokens) leaves every parameter gradient
    of transformer_pn unchanged (relative <= 1e-6), before and after the PN warmup (2 updates);
    issue 13 fault 1. The reference variant's backward reaches pads by design (deviation D5):
    there the gradients must differ once its ema_gz is non-zero, as documented. Both kernel
    paths."""
    kind = _kind(case)
    task, model, _ = build(
        tiny_mt_data, "transformer_pn_tiny", "--encoder-norm", kind, "--decoder-norm", kind,
        *NO_DROPOUT, *NORM_CASES[case],
    )
    model = model.double().train()
    padded_model = copy.deepcopy(model)
    pad = task.target_dictionary.pad()
    sample = batches(task, "train")[0]
    src, lengths = sample["net_input"]["src_tokens"], sample["net_input"]["src_lengths"]
    prev, target = sample["net_input"]["prev_output_tokens"], sample["target"]

    def more_pads(tokens, n):
        return torch.cat([tokens, tokens.new_full((tokens.shape[0], n), pad)], dim=1)

    padded = (more_pads(src, 3), lengths, more_pads(prev, 2), more_pads(target, 2))
    diffs = []
    for step in range(4):
        grads = []
        for m, inputs in ((model, (src, lengths, prev, target)), (padded_model, padded)):
            m.set_num_updates(step)
            m.zero_grad()
            _loss(m, *inputs, pad).backward()
            grads.append(_grads(m))
        diffs.append(_rel_diff(*grads))
    if case == "power_reference":
        assert diffs[0] <= 1e-6 and max(diffs) > 1e-3, diffs
    else:
        assert max(diffs) <= 1e-6, diffs


@pytest.mark.parametrize("flags", [["--checkpoint-activations"], ["--offload-activations"]],
                         ids=["checkpoint", "offload"])
@pytest.mark.parametrize("case", list(NORM_CASES))
def test_activation_checkpointing_changes_nothing(tiny_mt_data, case, flags):
    """With ``--checkpoint-activations`` (``--offload-activations`` implies it) fairseq re-runs
    each layer's forward in the backward; the gradients, losses and every buffer over 3 SGD
    steps (crossing the PN warmup) agree with a plain run to 1e-6 (float64, where the two
    backward graphs' different summation orders stay far below that); issue 13 fault 2.
    Default kernel path; ``test_norms_recompute.py`` runs both."""
    kind = _kind(case)
    common = ["--encoder-norm", kind, "--decoder-norm", kind, *NO_DROPOUT, *NORM_CASES[case]]
    task, plain, _ = build(tiny_mt_data, "transformer_pn_tiny", *common)
    _, ckpt, _ = build(tiny_mt_data, "transformer_pn_tiny", *common, *flags)
    assert all(hasattr(layer, "precheckpoint_forward")  # fairseq's checkpoint_wrapper
               for layer in [*ckpt.encoder.layers, *ckpt.decoder.layers])
    ckpt.load_state_dict(plain.state_dict())
    plain, ckpt = plain.double(), ckpt.double()  # float64: the graphs' rounding differs
    pad = task.target_dictionary.pad()
    for step, sample in enumerate(batches(task, "train")[:3]):
        inputs = (*sample["net_input"].values(), sample["target"])
        results = []
        for m in (plain, ckpt):
            m.train()
            m.set_num_updates(step)
            m.zero_grad()
            loss = _loss(m, *inputs, pad)
            loss.backward()
            results.append((loss.detach(), _grads(m)))
            with torch.no_grad():
                for p in m.parameters():
                    if p.grad is not None:
                        p.sub_(0.1 * p.grad)
        (loss_a, grads_a), (loss_b, grads_b) = results
        torch.testing.assert_close(loss_b, loss_a, rtol=1e-6, atol=0)
        assert _rel_diff(grads_a, grads_b) <= 1e-6, step
        torch.testing.assert_close(dict(ckpt.named_buffers()), dict(plain.named_buffers()),
                                   rtol=1e-6, atol=1e-7)


# --------------------------------------------------------------------------- tracking


def test_track_norm_stats_attaches_only_when_training(tiny_mt_data, tmp_path):
    csv_path = tmp_path / "stats.csv"
    task, model, _ = build(
        tiny_mt_data, "transformer_pn_tiny", "--encoder-norm", "power_v",
        "--track-norm-stats", csv_path,
    )
    assert model.norm_tracker is None  # building (e.g. in fairseq-generate) does not attach
    _warm_up_statistics(model, task, steps=2)
    assert model.norm_tracker is not None
    model.norm_tracker.close()
    assert csv_path.exists() and csv_path.read_text().count("\n") >= 2


# --------------------------------------------------------------------------- presets


def _model_options(name: str) -> set[str]:
    model_name = ARCH_MODEL_NAME_REGISTRY[name]
    if model_name in MODEL_DATACLASS_REGISTRY:
        return {f.name for f in dataclasses.fields(MODEL_DATACLASS_REGISTRY[model_name])}
    parser = argparse.ArgumentParser()
    from fairseq.models import ARCH_MODEL_REGISTRY

    ARCH_MODEL_REGISTRY[name].add_args(parser)
    return {a.dest for a in parser._actions}


# every preset, as the overlay hydra loads (configs/: a base and a norm configuration each)
PRESETS = [presets.preset_path(name) for name in presets.preset_names()]


@pytest.mark.parametrize("path", PRESETS, ids=[p.stem for p in PRESETS])
def test_preset_names_known_options(path):
    from fairseq.dataclass.configs import FairseqConfig
    from omegaconf import OmegaConf

    from powernorm_fairseq.presets import compose

    cfg = OmegaConf.to_container(compose(path.stem))  # the base and the norm's overlay
    assert set(cfg) <= {f.name for f in dataclasses.fields(FairseqConfig)}
    model = cfg["model"]
    assert model["_name"] in ARCH_MODEL_NAME_REGISTRY
    unknown = set(model) - {"_name"} - _model_options(model["_name"])
    assert not unknown, f"{path.name}: unknown model options {sorted(unknown)}"
    assert cfg["task"]["data"] == "???"  # the data path must be given on the command line


def test_presets_cover_every_paper_row():
    stems = {p.stem for p in PRESETS}
    for task in ("iwslt14", "wmt14", "ptb", "wikitext103"):
        for norm in ("ln", "bn", "pnv", "pn"):
            assert f"{task}_{norm}" in stems


def test_plain_state_dict_is_not_taken_for_a_checkpoint(tmp_path):
    path = tmp_path / "weights.pt"
    torch.save({"model": {"w": torch.zeros(3)}}, path)
    with pytest.raises(compat.CheckpointError, match="is not a fairseq checkpoint"):
        checkpoint_utils.load_checkpoint_to_cpu(str(path))


def test_eval_lm_filter_refuses_partial_and_empty_splits():
    """Under eval-lm a size filter that drops some samples (or gets none) raises, naming the flag;
    outside eval-lm (training, validation) fairseq's filter is unchanged."""
    def drop_last(self, indices, dataset, max_positions=None, ignore_invalid_inputs=False):
        return indices[:-1]

    wrapped = compat._filter_nothing_in_eval_lm(drop_last)
    assert list(wrapped(None, np.arange(3), None, 32)) == [0, 1]  # not in eval-lm: untouched
    compat._EVAL_LM["active"] = True
    try:
        with pytest.raises(compat.EvaluationError, match="skip 1 of 3 .*only part.*--tokens-per-sample N with N <= 32"):
            wrapped(None, np.arange(3), None, 32)
        with pytest.raises(compat.EvaluationError, match="no samples"):
            wrapped(None, np.arange(0), None, 32)
    finally:
        compat._EVAL_LM.clear()


@pytest.mark.parametrize("name", [n for n in presets.preset_names() if n.startswith("multi30k_")])
def test_the_multi30k_architecture_is_the_model_its_preset_trains(name):
    """Issue 35 item 6: ``--arch transformer_pn_multi30k`` said 3+3 layers, d 256 while the preset
    (and every campaign record) trained 2+2, d 128; now the sizes are written once, in the
    architecture, and the preset names it. The model config fairseq builds from each Multi30k
    preset (the architecture applied to the composed preset, as ``fairseq.models.build_model``
    does for a model without a dataclass) holds every value the preset held before
    (``tests/data/resolved_presets.json``), the sizes included."""
    import json

    from fairseq.models import ARCH_CONFIG_REGISTRY
    from omegaconf import open_dict
    from snapshot_presets import SNAPSHOT

    # a preset newer than the snapshot (a norm configuration added since) is held to the sizes
    before = json.loads(SNAPSHOT.read_text()).get(name, {"model": {}})
    model = presets.compose(name).model
    assert "encoder_embed_dim" not in model  # written once: in the architecture
    with open_dict(model):
        ARCH_CONFIG_REGISTRY[model._name](model)
    for key, value in before["model"].items():
        assert model[key] == value and type(model[key]) is type(value), key
    assert (model.encoder_layers, model.encoder_embed_dim) == (2, 128)


@pytest.mark.parametrize("experiment, arch", [("ptb", "transformer_lm_pn_ptb"),
                                              ("ptb_tensorized", "transformer_lm_pn_tensorized_ptb"),
                                              ("wikitext103", "transformer_lm_pn_wiki103")])
def test_the_language_model_presets_and_their_architectures_agree(experiment, arch):
    """Issue 35 item 6, the language models: fairseq merges a dataclass model's defaults into a
    hydra config before any architecture could apply, so the LM presets write their sizes and the
    argparse architecture of the same model writes them again; every value both set agrees."""
    from fairseq.models import ARCH_CONFIG_REGISTRY

    model = presets.compose(f"{experiment}_ln").model
    args = argparse.Namespace()
    ARCH_CONFIG_REGISTRY[arch](args)
    both = [k for k in model if k != "_name" and hasattr(args, k)]
    assert {"decoder_layers", "decoder_embed_dim", "decoder_ffn_embed_dim"} <= set(both)
    assert {k: model[k] for k in both} == {k: getattr(args, k) for k in both}
