"""Importing the released program's state (no released code needed): the parameter mapping on a
synthetic released-format state dict, the checkpoint import, the norm-site listing, the released
model options and the released label smoothing.

The comparison against the released program itself is ``scripts/compare_released.py`` (it needs a
checkout of sIncerass/powernorm; record in ``results/equivalence/``).
"""

from __future__ import annotations

import argparse
import math
from collections import OrderedDict

import pytest
import torch

pytest.importorskip("fairseq")

from fairseq import options, tasks  # noqa: E402
from fairseq.criterions.label_smoothed_cross_entropy import label_smoothed_nll_loss  # noqa: E402
from fairseq.dataclass.utils import convert_namespace_to_omegaconf  # noqa: E402

import powernorm_fairseq.models  # noqa: E402, F401  (registers the models)
from powernorm_fairseq.criterions import uniform_label_smoothed_nll_loss  # noqa: E402
from powernorm_fairseq.models.released import (  # noqa: E402
    load_released_checkpoint,
    map_released_state_dict,
    norm_sites,
    released_model_options,
)

# The IWSLT14 wiring of the released program at tiny size: PN (reference) in the encoder with a
# warmup of 8 at the layers and 1000 at the output norm, LayerNorm in the decoder.
PN_FLAGS = ["--encoder-norm", "power", "--decoder-norm", "layer", "--pn-variant", "reference",
            "--pn-warmup-updates", "8", "--pn-final-warmup-updates", "1000"]
BN_FLAGS = ["--encoder-norm", "batch", "--decoder-norm", "layer", "--bn-momentum", "0.05",
            "--bn-prescale", "--bn-pad-statistics", "released"]


def build(data, *flags):
    parser = options.get_training_parser()
    args = options.parse_args_and_arch(parser, [str(data), "--arch", "transformer_pn_tiny",
                                                "--task", "translation", "-s", "src", "-t",
                                                "tgt", "--share-all-embeddings", *flags])
    cfg = convert_namespace_to_omegaconf(args)
    task = tasks.setup_task(cfg.task)
    torch.manual_seed(0)
    return task.build_model(cfg.model)


def released_format(model) -> OrderedDict:
    """What the released program saves for the same model: no ``num_unstable``, no
    ``output_projection``, BN ``num_batches_tracked``, and torch's ``_metadata`` with version 1
    on every module (the released ``MaskPowerNorm`` is a plain ``nn.Module``)."""
    state = OrderedDict()
    for key, value in model.state_dict().items():
        if key.endswith(".num_unstable") or key.startswith("decoder.output_projection"):
            continue
        state[key] = value.clone()
        if key.endswith("running_var"):
            state[key[: -len("running_var")] + "num_batches_tracked"] = torch.tensor(7)
    state._metadata = OrderedDict((name, {"version": 1}) for name, _ in model.named_modules())
    return state


def perturb(model) -> None:
    """Non-initial values in every tensor, so a loaded state is distinguishable."""
    with torch.no_grad():
        for i, (key, t) in enumerate(model.state_dict().items()):
            if key.endswith("num_unstable"):
                continue
            if t.is_floating_point():
                t.add_(0.01 * (i + 1))
            else:
                t.add_(i + 1)


@pytest.mark.parametrize("flags", [PN_FLAGS, BN_FLAGS], ids=["power", "batch"])
def test_released_state_dict_maps_and_loads_strictly(tiny_mt_data, flags):
    source = build(tiny_mt_data, *flags)
    perturb(source)
    released = released_format(source)
    if flags is BN_FLAGS:  # without the mapping the released BN counters do not fit
        with pytest.raises(RuntimeError, match="num_batches_tracked"):
            build(tiny_mt_data, *flags).load_state_dict(released_format(source), strict=True)

    mapped = map_released_state_dict(released)
    assert not hasattr(mapped, "_metadata")
    assert not any(k.endswith("num_batches_tracked") for k in mapped)
    assert mapped["decoder.output_projection.weight"] is released["decoder.embed_tokens.weight"]
    target = build(tiny_mt_data, *flags)
    target.load_state_dict(mapped, strict=True)
    got = target.state_dict()
    for key, value in released.items():
        if not key.endswith("num_batches_tracked"):
            assert torch.equal(got[key], value), key
    for key in (k for k in got if k.endswith("num_unstable")):
        assert int(got[key]) == 0  # filled by the norm's released-format upgrade
    assert any(k.endswith("num_unstable") for k in got) == (flags is PN_FLAGS)


def test_mapping_refuses_foreign_and_already_mapped_state(tiny_mt_data):
    with pytest.raises(ValueError, match="not a released transformer"):
        map_released_state_dict({"weight": torch.zeros(1)})
    ours = build(tiny_mt_data, *PN_FLAGS).state_dict()
    with pytest.raises(ValueError, match="already in transformer_pn format"):
        map_released_state_dict(ours)


def test_load_released_checkpoint(tiny_mt_data, tmp_path):
    source = build(tiny_mt_data, *PN_FLAGS)
    path = tmp_path / "checkpoint_best.pt"
    history = [{"criterion_name": "LabelSmoothedCrossEntropyCriterion",
                "optimizer_name": "FairseqAdam", "num_updates": 3, "lr_scheduler_state": {}}]
    torch.save({"args": argparse.Namespace(arch="transformer_iwslt_de_en_v2"),
                "model": released_format(source), "optimizer_history": history,
                "extra_state": {"train_meters": {"loss": object.__new__(argparse.Namespace)},
                                "epoch": 2}}, path)
    ckpt = load_released_checkpoint(path)
    assert ckpt["optimizer_history"][-1]["criterion_name"] == \
        "UniformLabelSmoothedCrossEntropyCriterion"
    assert ckpt["extra_state"] == {"epoch": 2}
    build(tiny_mt_data, *PN_FLAGS).load_state_dict(ckpt["model"], strict=True)


def test_norm_sites_list_type_groups_warmup_and_counter(tiny_mt_data):
    sites = {s["site"]: s for s in norm_sites(build(tiny_mt_data, *PN_FLAGS))}
    layers = [f"encoder.layers.{i}.{n}" for i in range(2)
              for n in ("self_attn_layer_norm", "final_layer_norm")]
    for name in layers:
        assert sites[name] | {"counter": None} == {
            "site": name, "type": "power", "variant": "reference", "groups": 4, "warmup": 8,
            "counter": None}
        assert sites[name]["counter"] == {"name": "iters", "value": 0, "per": "training forward"}
    assert sites["encoder.layer_norm"]["warmup"] == 1000
    decoder = [k for k in sites if k.startswith("decoder.")]
    assert len(decoder) == 2 * 3 + 1
    assert all(sites[k]["type"] == "layer" and sites[k]["counter"] is None for k in decoder)
    bn = norm_sites(build(tiny_mt_data, *BN_FLAGS))[0]
    assert (bn["type"], bn["groups"], bn["momentum"], bn["pads"]) == ("batch", 1, 0.05, "released")


def test_released_model_options():
    args = argparse.Namespace(encoder_norm_self="power", encoder_norm_ff="power",
                              decoder_norm_self="layer", decoder_norm_ff="layer",
                              warmup_updates=8000)
    opts = released_model_options(args)
    assert opts["encoder_self_attn_norm"] == opts["encoder_final_norm"] == "power"
    assert opts["decoder_cross_attn_norm"] == opts["decoder_final_norm"] == "layer"
    assert (opts["pn_variant"], opts["pn_warmup_updates"], opts["pn_final_warmup_updates"]) == \
        ("reference", 8000, 1000)
    assert opts["encoder_pad_inputs"] == "embedding"  # fairseq 0.8 did not zero the pads
    args.encoder_norm_self = args.encoder_norm_ff = "batch"  # the released BN, pads included
    assert {k: released_model_options(args)[k] for k in ("bn_momentum", "bn_prescale", "bn_pad_statistics")} == \
        {"bn_momentum": 0.05, "bn_prescale": True, "bn_pad_statistics": "released"}
    args.encoder_norm_ff = "group"
    with pytest.raises(ValueError, match="group"):
        released_model_options(args)


def test_uniform_label_smoothing_is_the_released_formula():
    torch.manual_seed(0)
    lprobs = torch.log_softmax(torch.randn(6, 11, dtype=torch.float64), dim=-1)
    target = torch.tensor([1, 2, 0, 5, 10, 0])  # 0 = pad here
    eps = 0.1
    loss, nll = uniform_label_smoothed_nll_loss(lprobs, target, eps, ignore_index=0)
    real = target.ne(0)
    q = torch.full_like(lprobs, eps / 11)  # (1 - eps) one-hot + eps / V everywhere
    q[torch.arange(6), target] += 1 - eps
    expected = -(q * lprobs).sum(-1)[real].sum()
    assert math.isclose(float(loss), float(expected), rel_tol=1e-12)
    assert math.isclose(float(nll), float(-lprobs[real, target[real]].sum()), rel_tol=1e-12)
    newer, _ = label_smoothed_nll_loss(lprobs, target, eps, ignore_index=0)
    assert not math.isclose(float(newer), float(loss), rel_tol=1e-6)  # fairseq >= 0.10 differs
