"""Where the hydra presets are and how they compose.

The presets live in the repository's ``configs/`` (the documented place) and ship inside the
package as ``powernorm_fairseq/configs`` (a link to ``../configs`` in a checkout, a copy in a
wheel, see ``[tool.setuptools.package-data]``), so an installed package finds them without a
source checkout. An explicit ``config_dir`` (``--config-dir`` on the command line) always wins.

Layout (``configs/README.md``): a preset ``<experiment>_<norm>`` is composed of

- ``base/<experiment>.yaml``: every value of one experiment, with the reason for each value that
  departs from a default;
- ``norm/<norm>.yaml``: one norm configuration for every experiment (its registered name, its
  labels in tables, its model options): the ``norm`` config group, ``norm=<short>``;
- ``specific/<experiment>_<norm>.yaml``, where it exists: what that experiment sets for that norm
  alone (the released program's warmup at IWSLT14, say).

The norm under test goes to every norm site of the side the experiment's model compares norms
on (:func:`norm_side`: the encoder of a translation model, as the released program wires PN,
and the decoder of a language model). :func:`materialize` writes each composition as the small
overlay hydra loads (``defaults: [_self_, base/<experiment>]`` plus its model keys) into a cache
directory, so ``powernorm-hydra-train --config-name multi30k_rms`` and ``--config-name multi30k
norm=rms`` need no file per experiment and norm.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

#: the norm the presets of an experiment use when none is named (``--config-name <experiment>``)
DEFAULT_NORM = "ln"
#: the paper's norms in its tables' order, Algorithm 2 last: the order of tables and plots, before
#: every other norm configuration (:func:`ordered_norm_configs`)
PAPER_NORMS = ("ln", "bn", "pnv", "pn", "pnpaper")


def config_dir(given: str | os.PathLike | None = None) -> Path:
    """The directory of the presets: ``given`` if set, else the package's ``configs``.

    Raises:
        SystemExit: ``given`` (or the package data, in a broken install) is not a directory.
    """
    if given is not None:
        path = Path(given).resolve()
        if not path.is_dir():
            raise SystemExit(f"error: --config-dir {given}: not a directory")
        return path
    path = Path(str(resources.files(__package__) / "configs")).resolve()
    if not path.is_dir():
        raise SystemExit(f"error: the package's presets {path} are missing (a broken install?); "
                         "pass --config-dir DIR, a directory of presets such as the checkout's "
                         "configs/")
    return path


@dataclass(frozen=True)
class NormConfig:
    """One norm configuration, ``configs/norm/<short>.yaml``: the one place of its facts.

    Attributes:
        short: the file's name: presets ``<experiment>_<short>``, ``reproduce --norms``.
        norm: the registered norm (``--encoder-norm`` / ``--decoder-norm``).
        label: how tables name it; short_label: narrow columns and legends.
        model: the model options it sets (besides the side's norm), e.g. ``pn_variant``.
    """

    short: str
    norm: str
    label: str
    short_label: str
    model: dict = field(default_factory=dict)

    def flags(self, *sides: str) -> list[str]:
        """The same as fairseq-train flags: ``--<side>-norm NAME`` for each of ``sides``
        (``encoder``, ``decoder``) and one flag per option."""
        out = [f for side in sides for f in (f"--{side}-norm", self.norm)]
        for key, value in self.model.items():
            flag = f"--{key.replace('_', '-')}"
            out += [flag] if value is True else [] if value is False else [flag, str(value)]
        return out


def _yaml(path: Path) -> dict:
    import yaml

    return yaml.safe_load(path.read_text()) or {}


def norm_configs(directory: str | os.PathLike | None = None) -> dict[str, NormConfig]:
    """``{short: NormConfig}`` of ``<config dir>/norm/*.yaml``, by name."""
    out = {}
    for path in sorted((config_dir(directory) / "norm").glob("*.yaml")):
        data = _yaml(path)
        missing = {"norm", "label", "short_label"} - set(data)
        if missing or set(data) - {"norm", "label", "short_label", "model"}:
            raise SystemExit(f"error: {path}: a norm configuration has the keys norm, label, short_label "
                             f"and model (missing: {sorted(missing) or 'none'}; others: "
                             f"{sorted(set(data) - {'norm', 'label', 'short_label', 'model'}) or 'none'})")
        out[path.stem] = NormConfig(path.stem, str(data["norm"]), str(data["label"]),
                                    str(data["short_label"]), dict(data.get("model") or {}))
    return out


def ordered_norm_configs(directory: str | os.PathLike | None = None) -> list[NormConfig]:
    """Every norm configuration, the paper's (:data:`PAPER_NORMS`) first in their order."""
    configs = norm_configs(directory)
    rank = {short: i for i, short in enumerate(PAPER_NORMS)}
    return sorted(configs.values(), key=lambda c: (rank.get(c.short, len(rank)), c.short))


def norm_config(short: str, directory: str | os.PathLike | None = None) -> NormConfig:
    """The norm configuration ``short``; a SystemExit naming the choices for an unknown one."""
    configs = norm_configs(directory)
    if short not in configs:
        raise SystemExit(f"error: unknown norm {short!r}: no {config_dir(directory) / 'norm' / short}.yaml; "
                         f"choose one of {list(configs)}")
    return configs[short]


def experiments(directory: str | os.PathLike | None = None) -> list[str]:
    """The experiments: ``base/<experiment>.yaml``."""
    return sorted(p.stem for p in (config_dir(directory) / "base").glob("*.yaml"))


def norm_side(experiment: str, directory: str | os.PathLike | None = None) -> str:
    """Where the experiment's norm under test goes: ``decoder`` for a language model
    (``transformer_lm*``), else ``encoder`` (a translation model: the released program's PN
    replaced the encoder's LayerNorms only). Read from the base's ``model._name``, following
    the bases it builds on."""
    path = config_dir(directory) / "base" / f"{experiment}.yaml"
    seen = []
    while path.is_file() and path not in seen:
        seen.append(path)
        data = _yaml(path)
        name = str((data.get("model") or {}).get("_name") or "")
        if name:
            return "decoder" if name.startswith("transformer_lm") else "encoder"
        parents = [d.lstrip("/") for d in data.get("defaults", []) if isinstance(d, str)
                   and d.lstrip("/").startswith("base/")]
        path = config_dir(directory) / f"{parents[0]}.yaml" if parents else path
    raise SystemExit(f"error: base/{experiment}.yaml names no model._name (nor does a base it builds on)")


def split_preset(name: str, directory: str | os.PathLike | None = None) -> tuple[str, str] | None:
    """``(experiment, norm)`` of a preset name ``<experiment>_<norm>``, or None."""
    norms = norm_configs(directory)
    for experiment in sorted(experiments(directory), key=len, reverse=True):
        if name.startswith(experiment + "_") and name[len(experiment) + 1:] in norms:
            return experiment, name[len(experiment) + 1:]
    return None


def overlay(experiment: str, norm: str, directory: str | os.PathLike | None = None) -> dict:
    """The preset ``<experiment>_<norm>`` as the overlay hydra loads: its base through the
    defaults list (``_self_`` first: configs/README.md), the side's norm, the norm's options and
    the experiment's specific ones for it."""
    cfg = norm_config(norm, directory)
    specific = config_dir(directory) / "specific" / f"{experiment}_{norm}.yaml"
    model = {f"{norm_side(experiment, directory)}_norm": cfg.norm, **cfg.model,
             **((_yaml(specific).get("model") or {}) if specific.is_file() else {})}
    return {"defaults": ["_self_", f"base/{experiment}"], "model": model}


def preset_names(directory: str | os.PathLike | None = None) -> list[str]:
    """Names of the presets a user can pass as ``--config-name``: every experiment with every
    norm configuration."""
    return sorted(f"{e}_{n}" for e in experiments(directory) for n in norm_configs(directory))


def materialize(directory: str | os.PathLike | None = None) -> Path:
    """A directory hydra can load every preset from: ``<experiment>_<norm>.yaml`` overlays
    (:func:`overlay`) beside a link to ``base/``, in ``$XDG_CACHE_HOME/powernorm-fairseq/presets/
    <hash of the sources>`` (written once, atomically; the sources are never written)."""
    import yaml

    source = config_dir(directory)
    if (source / MATERIALIZED).is_file():  # one already (it links its sources): itself
        return source
    digest = hashlib.sha256(Path(__file__).read_bytes())  # the generator, then its sources
    for path in sorted(source.rglob("*.yaml")):
        digest.update(str(path.relative_to(source)).encode() + b"\0" + path.read_bytes())
    digest.update(str(source).encode())
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "powernorm-fairseq" / "presets"
    target = cache / digest.hexdigest()[:16]
    if target.is_dir():
        return target
    cache.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=cache, prefix=".tmp-"))
    try:
        for part in ("base", "norm", "specific"):  # so that this directory reads as its source
            if (source / part).is_dir():
                (tmp / part).symlink_to(source / part, target_is_directory=True)
        (tmp / MATERIALIZED).write_text(f"{source}\n")
        for name in preset_names(source):
            experiment, norm = split_preset(name, source)
            text = (f"# Generated by powernorm_fairseq.presets from base/{experiment}.yaml and "
                    f"norm/{norm}.yaml (and specific/{name}.yaml if present): edit those.\n")
            (tmp / f"{name}.yaml").write_text(text + yaml.safe_dump(overlay(experiment, norm, source),
                                                                    sort_keys=False))
        try:
            os.replace(tmp, target)
        except OSError:  # another process wrote the same directory first
            pass
    finally:
        shutil.rmtree(tmp, ignore_errors=True) if tmp.exists() else None
    return target


#: the marker file of a :func:`materialize` directory (it holds the source directory's path)
MATERIALIZED = ".materialized"


def preset_path(name: str, directory: str | os.PathLike | None = None) -> Path:
    """The overlay file hydra loads for the preset ``name`` (:func:`materialize`); a
    ``SystemExit`` listing the presets if there is no such preset."""
    if split_preset(name, directory) is None:
        raise SystemExit(f"no preset {config_dir(directory) / name}.yaml; available: {preset_names(directory)} "
                         "(a preset is <experiment>_<norm>: experiments base/*.yaml, norms norm/*.yaml)")
    return materialize(directory) / f"{name}.yaml"


def compose(name: str, overrides: Sequence[str] = (), directory: str | os.PathLike | None = None):
    """The preset ``name`` with its defaults list applied (base, then the norm's overlay) and
    ``overrides``, as a ``DictConfig`` of only the keys the YAML files set.

    This is the preset's own content, without fairseq's dataclass defaults and without importing
    fairseq (cheap: the launcher reads the preset's batch from it); see :func:`resolve` for the
    configuration fairseq trains with.
    """
    # version_base 1.1: what fairseq's hydra.main (which names none) composes with
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.config_store import ConfigStore
    from hydra.core.global_hydra import GlobalHydra
    from omegaconf import open_dict

    path = preset_path(name, directory)
    # fairseq's hydra_init stores its FairseqConfig schema under the preset's name, and hydra
    # merges a schema of the same name into the file: hide it, so that the result is the files'
    # content whether or not this process ran hydra_init before
    store = ConfigStore.instance().repo
    schema = store.pop(f"{name}.yaml", None)
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(path.parent), version_base="1.1"):
            cfg = hydra_compose(config_name=name, overrides=list(overrides))
    finally:
        GlobalHydra.instance().clear()
        if schema is not None:
            store[f"{name}.yaml"] = schema
    with open_dict(cfg):
        cfg.pop("hydra", None)
    return cfg


def resolve(name: str, overrides: Sequence[str] = (), directory: str | os.PathLike | None = None) -> dict:
    """The configuration ``powernorm-hydra-train --config-name name`` trains with, as a dict.

    Composed as ``fairseq_cli.hydra_train`` does it: fairseq's ``FairseqConfig`` schema stored
    under ``name`` (``hydra_init``), the search path of ``hydra.main`` (fairseq's ``config/``,
    then ``--config-dir`` before the structured configs), then each component's dataclass
    defaults (``add_defaults``, with the plugin's models registered) and ``resolve=True``.
    Hydra's own node and the logging config that ``hydra.main`` adds are left out.
    """
    from fairseq.dataclass.initialize import add_defaults, hydra_init
    from fairseq.dataclass.utils import omegaconf_no_object_check
    from hydra import version
    from hydra._internal.hydra import Hydra
    from hydra._internal.utils import create_config_search_path
    from hydra.core.config_search_path import SearchPathQuery
    from hydra.core.global_hydra import GlobalHydra
    from hydra.types import RunMode
    from omegaconf import OmegaConf, open_dict

    # the plugin's models and criterions, as hydra_train registers them: add_defaults needs them
    import powernorm_fairseq.criterions  # noqa: F401
    import powernorm_fairseq.models  # noqa: F401

    path = preset_path(name, directory)
    hydra_init(name)
    search_path = create_config_search_path("pkg://fairseq.config")
    search_path.prepend(provider="command-line", path=f"file://{path.parent}",
                        anchor=SearchPathQuery(provider="schema"))
    version.setbase("1.1")  # as fairseq's hydra.main, which names no version_base
    GlobalHydra.instance().clear()
    try:
        hydra = Hydra.create_main_hydra2(task_name="hydra_train", config_search_path=search_path)
        cfg = hydra.compose_config(config_name=name, overrides=list(overrides),
                                   run_mode=RunMode.RUN)
    finally:
        GlobalHydra.instance().clear()
    with open_dict(cfg):
        del cfg["hydra"]
    add_defaults(cfg)
    with omegaconf_no_object_check():
        return OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)
