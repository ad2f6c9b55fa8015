"""``fairseq-hydra-train`` with the plugin imported first and the repository's presets found.

Usage::

    powernorm-hydra-train --config-name iwslt14_pn task.data=data-bin/iwslt14.tokenized.de-en
    powernorm-hydra-train --config-name iwslt14 norm=pn task.data=...   # the same preset
    python -m powernorm_fairseq.hydra_train --config-name ptb_pn task.data=data-bin/ptb

fairseq's own ``fairseq-hydra-train`` completes the composed config with each component's
dataclass defaults (``add_defaults``) *before* it imports ``common.user_dir``, so the plugin's
models are unknown at that point (``transformer_lm_pn`` loses its defaults). This entry point
imports the plugin first and then runs fairseq's hydra training unchanged. Without
``--config-dir``/``-cd`` it finds the presets shipped in the package (``powernorm_fairseq/configs``,
the repository's ``configs/``; see :mod:`powernorm_fairseq.presets`), in a checkout and in an
installed wheel alike.
"""

from __future__ import annotations

import sys
from pathlib import Path

from powernorm_fairseq import presets


def _with_config_dir(argv: list[str]) -> list[str]:
    """``argv`` with the presets hydra loads (:func:`presets.materialize`): ``--config-dir``
    the composed presets of the given directory (a directory of presets in this project's layout,
    ``base/`` and ``norm/``; any other is passed on as it is) or of the package's; and
    ``--config-name <experiment> norm=<short>`` (``norm`` the config group, default
    :data:`presets.DEFAULT_NORM`) as the preset ``<experiment>_<short>``."""
    argv = list(argv)
    given = None
    for i, a in enumerate(argv):
        if a in ("--config-dir", "-cd") and i + 1 < len(argv):
            given, at = argv[i + 1], (i, i + 2)
        elif a.startswith(("--config-dir=", "-cd=")):
            given, at = a.split("=", 1)[1], (i, i + 1)
    if given is not None:
        if not ((Path(given) / "base").is_dir() and (Path(given) / "norm").is_dir()):
            return argv  # the user's own presets
        del argv[at[0]:at[1]]
    directory = presets.config_dir(given)
    argv = _norm_group(argv, directory)
    return [argv[0], "--config-dir", str(presets.materialize(directory)), *argv[1:]]


def _norm_group(argv: list[str], directory) -> list[str]:
    """``--config-name <experiment>`` with ``norm=<short>`` (or none: the default norm) as
    ``--config-name <experiment>_<short>``; a preset name is left as it is."""
    for i, a in enumerate(argv):
        if a in ("--config-name", "-cn") and i + 1 < len(argv):
            at, name = i + 1, argv[i + 1]
        elif a.startswith(("--config-name=", "-cn=")):
            at, name = None, a.split("=", 1)[1]
        else:
            continue
        if name not in presets.experiments(directory):
            return argv
        chosen = [x for x in argv if x.startswith("norm=")]
        norm = chosen[-1].split("=", 1)[1] if chosen else presets.DEFAULT_NORM
        presets.norm_config(norm, directory)  # an unknown norm: one line naming the choices
        out = [x for x in argv if not x.startswith("norm=")]
        index = out.index(a)
        if at is None:
            out[index] = f"--config-name={name}_{norm}"
        else:
            out[index + 1] = f"{name}_{norm}"
        return out
    return argv


def check_config(cfg) -> None:
    """Fail early, naming the hydra key, on a composed config that cannot train.

    Raises:
        SystemExit: ``task.data`` is not set (fairseq would fail deep inside the task with
            ``TypeError: argument of type 'NoneType' is not iterable``).
        OptionError: a norm option out of range (see ``pn_config.check_norm_options``).
    """
    from omegaconf import OmegaConf

    from powernorm_fairseq.models import transformer_lm_pn, transformer_pn
    from powernorm_fairseq.models.pn_config import check_norm_options

    data = OmegaConf.select(cfg, "task.data", throw_on_missing=False)
    if data in (None, "", "???"):
        raise SystemExit("error: task.data is not set: add task.data=DIR, the data-bin directory "
                         "written by scripts/prepare_<corpus>.sh (e.g. task.data=data/multi30k/data-bin)")
    model = OmegaConf.select(cfg, "model")
    name = str(OmegaConf.select(cfg, "model._name") or "")
    if model is not None and name.startswith("transformer_lm_pn"):
        check_norm_options(model, transformer_lm_pn._LM_NORM_FIELDS)
    elif model is not None and name.startswith("transformer_pn"):
        check_norm_options(model, transformer_pn._NORM_FIELDS)


def _checked(hydra_main):
    """fairseq's ``_hydra_main`` after :func:`check_config`; the plugin's errors as one line
    (hydra would print them with its own traceback)."""

    def run(cfg, **kwargs):
        from powernorm_fairseq.compat import CheckpointError, OptionError

        try:
            check_config(cfg)
            return hydra_main(cfg, **kwargs)
        except (CheckpointError, OptionError) as e:
            raise SystemExit(f"error: {e}") from e

    return run


def cli_main() -> None:
    """Console script ``powernorm-hydra-train`` (arguments as ``fairseq-hydra-train``)."""
    from fairseq_cli import hydra_train

    # the plugin's models and criterions, registered before hydra composes, so that their
    # dataclass defaults are in the config (fairseq would import common.user_dir only later)
    import powernorm_fairseq.criterions  # noqa: F401
    import powernorm_fairseq.models  # noqa: F401  (also applies compat)

    sys.argv = _with_config_dir(sys.argv)
    # hydra_main (hydra's entry) calls the module's _hydra_main by name: check the config first
    hydra_train._hydra_main = _checked(hydra_train._hydra_main)
    hydra_train.cli_main()


if __name__ == "__main__":
    cli_main()
