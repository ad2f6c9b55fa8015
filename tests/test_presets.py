"""The composed presets resolve to the configurations of the full copies they replaced.

``tests/data/resolved_presets.json`` (written by ``tests/snapshot_presets.py`` from the 35 full
presets before they became a base per experiment plus an overlay per norm) holds every preset as
``powernorm-hydra-train`` resolves it. Each preset must still resolve to exactly that; a change
made on purpose is listed in :data:`INTENDED` (and the snapshot left alone).
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
import yaml
from snapshot_presets import SNAPSHOT

from powernorm_fairseq import presets

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"

# {preset: {"dotted.key": new value}}: resolved values that differ from the snapshot on purpose,
# with the reason beside each. None so far: the refactoring into bases and overlays changed nothing.
# issue 14: fairseq 0.8 (the released program) feeds the encoder's pads as the pad embedding
INTENDED: dict[str, dict[str, object]] = {
    f"{experiment}_{norm}": {"model.encoder_pad_inputs": "embedding"}
    for experiment in ("iwslt14", "wmt14") for norm in ("ln", "bn", "pnv", "pn")
}

EXPECTED = json.loads(SNAPSHOT.read_text())
# the BN pad-statistics option: the released pad filling in the presets that reproduce the
# released MT training; the language models' configs list every option, so its default there
for _name in EXPECTED:
    if _name.startswith(("ptb_", "wikitext103_")):
        INTENDED.setdefault(_name, {})["model.bn_pad_statistics"] = "masked"
for _name in ("iwslt14_bn", "wmt14_bn"):
    INTENDED[_name]["model.bn_pad_statistics"] = "released"
# issue 36: Dynamic Tanh's initial alpha, a new option (the language models' configs list every option)
for _name in EXPECTED:
    if _name.startswith(("ptb_", "wikitext103_")):
        INTENDED[_name]["model.dyt_alpha_init"] = 0.5
        INTENDED[_name]["model.pn_warmup_unit"] = "updates"
        INTENDED[_name]["model.multilinear_unmasked"] = False  # issue 36: the leak diagnostic's option
# issue 38: --pn-warmup-unit; the released PN's presets keep the count they trained with (forwards)
for _name in EXPECTED:
    if _name.endswith("_pn"):
        INTENDED.setdefault(_name, {})["model.pn_warmup_unit"] = "forwards"


# issue 35 item 6: the Multi30k sizes are written once, in the architecture the preset names
# (transformer_pn_multi30k), which fairseq applies when it builds the model; the preset no longer
# repeats them (tests/test_fairseq_models.py checks that the model built is the one before)
ABSENT = object()
MULTI30K_ARCH_KEYS = ("encoder_embed_dim", "encoder_ffn_embed_dim", "encoder_layers", "encoder_attention_heads",
                      "decoder_embed_dim", "decoder_ffn_embed_dim", "decoder_layers", "decoder_attention_heads",
                      "share_all_embeddings", "dropout", "attention_dropout", "activation_dropout")
for _name in EXPECTED:
    if _name.startswith("multi30k_"):
        INTENDED.setdefault(_name, {}).update({f"model.{key}": ABSENT for key in MULTI30K_ARCH_KEYS})


def _expected(name: str) -> dict:
    cfg = json.loads(json.dumps(EXPECTED[name]))
    for key, value in INTENDED.get(name, {}).items():
        *parents, leaf = key.split(".")
        node = cfg
        for p in parents:
            node = node[p]
        if value is ABSENT:
            node.pop(leaf)
        else:
            node[leaf] = value
    return cfg


def _diff(a, b, prefix: str = "") -> list[str]:
    """Dotted keys where ``a`` and ``b`` differ, with both values (for a readable failure)."""
    if isinstance(a, dict) and isinstance(b, dict):
        return [d for k in sorted(set(a) | set(b))
                for d in _diff(a.get(k, "<absent>"), b.get(k, "<absent>"), f"{prefix}{k}.")]
    # type() as well: 1 == 1.0 == True in Python, but fairseq would not see the same config
    return [] if (a == b and type(a) is type(b)) else [f"{prefix[:-1]}: {a!r} != {b!r}"]


def test_every_preset_of_the_snapshot_exists():
    """The snapshot's presets keep their names; a norm configuration added since (configs/norm/)
    adds a preset to every experiment, checked by the tests below, not by the snapshot."""
    assert set(EXPECTED) <= set(presets.preset_names())


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_preset_resolves_as_before(name):
    got = presets.resolve(name)
    assert not _diff(got, _expected(name)), "\n".join(_diff(got, _expected(name)))


def test_diff_sees_a_changed_value_and_type():
    a = {"model": {"dropout": 0.3, "layers": 2}}
    assert _diff(a, {"model": {"dropout": 0.1, "layers": 2}}) == ["model.dropout: 0.3 != 0.1"]
    assert _diff(a, {"model": {"dropout": 0.3, "layers": 2.0}}) == ["model.layers: 2 != 2.0"]
    assert _diff(a, {"model": {"dropout": 0.3}}) == ["model.layers: 2 != '<absent>'"]


def test_presets_are_a_base_plus_a_small_overlay():
    """One fact, one place: each preset is one base plus its norm's few lines (configs/norm/, the
    same file for every experiment) and, for some experiments, a few lines of their own
    (configs/specific/); the overlay hydra loads is written from them, never by hand."""
    for name in presets.preset_names():
        experiment, norm = presets.split_preset(name)
        cfg = yaml.safe_load(presets.preset_path(name).read_text())
        assert cfg == presets.overlay(experiment, norm), name
        assert cfg["defaults"] == ["_self_", f"base/{experiment}"], name
        assert set(cfg) <= {"defaults", "model"}, f"{name}: only model keys belong to a norm"
        assert len(cfg["model"]) <= 8, f"{name}: a norm's overlay is a few model keys"
        # the base comes after _self_ (configs/README.md), so it would win over a key it restates
        composed = presets.compose(name)
        shadowed = {k: composed.model[k] for k, v in cfg["model"].items() if composed.model[k] != v}
        assert not shadowed, f"{name}: the base overrides the overlay's {shadowed}"
    for path in sorted((CONFIGS / "norm").glob("*.yaml")):
        assert len(path.read_text().splitlines()) <= 10, f"{path.name}: a norm configuration is a small file"
    assert not list(CONFIGS.glob("*_*.yaml")), "presets are composed, not written per experiment and norm"
    lines = sum(len(p.read_text().splitlines()) for p in CONFIGS.rglob("*.yaml"))
    assert lines < 1739 / 2, f"configs/ holds {lines} lines"


def test_the_norm_group_names_a_preset_and_an_unknown_norm_is_refused(tmp_path):
    """``--config-name <experiment> norm=<short>`` is the preset ``<experiment>_<short>``; no
    ``norm=`` is LN's; a preset name and another ``--config-dir`` pass as they are."""
    from powernorm_fairseq.hydra_train import _with_config_dir

    cached = str(presets.materialize())
    assert _with_config_dir(["t", "--config-name", "multi30k", "norm=pnpaper", "task.data=d"]) == [
        "t", "--config-dir", cached, "--config-name", "multi30k_pnpaper", "task.data=d"]
    assert _with_config_dir(["t", "--config-name=ptb_cpu_tensorized"])[-1] == "--config-name=ptb_cpu_tensorized_ln"
    assert _with_config_dir(["t", "--config-name", "ptb_cpu_pn"])[-2:] == ["--config-name", "ptb_cpu_pn"]
    assert _with_config_dir(["t", "--config-dir", str(CONFIGS), "-cn", "multi30k_bn"]) == [
        "t", "--config-dir", cached, "-cn", "multi30k_bn"]
    assert _with_config_dir(["t", "--config-dir", str(tmp_path), "-cn", "x"]) == [
        "t", "--config-dir", str(tmp_path), "-cn", "x"]
    with pytest.raises(SystemExit, match="unknown norm 'nope'.*choose one of"):
        _with_config_dir(["t", "--config-name", "multi30k", "norm=nope"])


def test_a_norm_configuration_is_one_file_for_every_experiment(tmp_path):
    """A new file in configs/norm/ makes a preset of every experiment, its norm at the side the
    experiment compares norms on (the encoder of a translation model, the decoder of an LM)."""
    directory = tmp_path / "configs"
    shutil.copytree(CONFIGS, directory, symlinks=True)
    (directory / "norm" / "mine.yaml").write_text(
        "norm: power_v\nlabel: Mine\nshort_label: M\nmodel:\n  bn_momentum: 0.2\n")
    names = presets.preset_names(directory)
    assert {f"{e}_mine" for e in presets.experiments(directory)} <= set(names)
    mt, lm = presets.compose("multi30k_mine", directory=directory), presets.compose("ptb_cpu_mine", directory=directory)
    assert mt.model.encoder_norm == "power_v" and mt.model.decoder_norm == "layer" and mt.model.bn_momentum == 0.2
    assert lm.model.decoder_norm == "power_v" and "encoder_norm" not in lm.model
    assert presets.norm_config("mine", directory).flags("encoder") == [
        "--encoder-norm", "power_v", "--bn-momentum", "0.2"]


def test_package_data_is_the_checkout_configs():
    assert presets.config_dir() == CONFIGS.resolve()


def test_config_dir_given_wins_and_a_missing_one_is_named(tmp_path):
    assert presets.config_dir(tmp_path) == tmp_path.resolve()
    with pytest.raises(SystemExit, match="--config-dir .*nope: not a directory"):
        presets.config_dir(tmp_path / "nope")
    with pytest.raises(SystemExit, match=r"no preset .*multi30k_xx\.yaml; available: \[.*multi30k_ln"):
        presets.preset_path("multi30k_xx")


def test_compose_is_the_preset_without_fairseq_defaults():
    """What the launcher reads (the batch) comes from the base through the overlay."""
    cfg = presets.compose("multi30k_pn", ["dataset.max_tokens=512"])
    assert cfg.dataset.max_tokens == 512 and list(cfg.optimization.update_freq) == [1]
    assert cfg.model.encoder_norm == "power" and cfg.model.pn_variant == "reference"
    assert "bmuf" not in cfg  # only what the YAML sets


def test_hydra_train_finds_the_presets_without_config_dir(monkeypatch, tmp_path):
    """``powernorm_fairseq.hydra_train`` with only ``--config-name`` trains with :func:`resolve`'s
    config (the function this test and the snapshot rely on composes as the entry point does)."""
    from fairseq import distributed_utils
    from fairseq_cli import hydra_train as fairseq_hydra_train

    from powernorm_fairseq import hydra_train

    seen = {}

    def capture(cfg, main, **kwargs):
        seen["cfg"] = cfg

    monkeypatch.setattr(distributed_utils, "call_main", capture)
    # cli_main wraps fairseq's _hydra_main; monkeypatch restores the unwrapped one afterwards
    monkeypatch.setattr(fairseq_hydra_train, "_hydra_main", fairseq_hydra_train._hydra_main)
    monkeypatch.chdir(tmp_path)
    overrides = [f"task.data={tmp_path}", "hydra.output_subdir=null"]
    monkeypatch.setattr(sys, "argv", ["powernorm-hydra-train", "--config-name", "ptb_cpu_pn",
                                      *overrides])
    hydra_train.cli_main()
    from omegaconf import OmegaConf

    got = OmegaConf.to_container(seen["cfg"], resolve=True)
    got.pop("job_logging_cfg")
    want = presets.resolve("ptb_cpu_pn", overrides[:1])
    assert not _diff(got, want), "\n".join(_diff(got, want))
