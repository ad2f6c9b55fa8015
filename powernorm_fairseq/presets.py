"""Where the hydra presets are and how they compose.

The presets live in the repository's ``configs/`` (the documented place) and ship inside the
package as ``powernorm_fairseq/configs`` (a link to ``../configs`` in a checkout, a copy in a
wheel, see ``[tool.setuptools.package-data]``), so an installed package finds them without a
source checkout. An explicit ``config_dir`` (``--config-dir`` on the command line) always wins.

Layout: ``configs/base/<experiment>.yaml`` holds every value of one experiment, with the reason
for each value that departs from a default; ``configs/<experiment>_<norm>.yaml`` is the preset
that a user names, a defaults list of its base plus the few lines of its norm.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from importlib import resources
from pathlib import Path


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


def preset_names(directory: str | os.PathLike | None = None) -> list[str]:
    """Names of the presets a user can pass as ``--config-name`` (the bases in ``base/`` are not
    presets: they hold no norm)."""
    return sorted(p.stem for p in config_dir(directory).glob("*.yaml"))


def preset_path(name: str, directory: str | os.PathLike | None = None) -> Path:
    """``<config dir>/<name>.yaml``; a ``SystemExit`` listing the presets if it does not exist."""
    path = config_dir(directory) / f"{name}.yaml"
    if not path.is_file():
        raise SystemExit(f"no preset {path}; available: {preset_names(directory)}")
    return path


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
