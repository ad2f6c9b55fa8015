"""``fairseq-hydra-train`` with the plugin imported first and the repository's presets found.

Usage::

    powernorm-hydra-train --config-name iwslt14_pn task.data=data-bin/iwslt14.tokenized.de-en
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

from powernorm_fairseq import presets


def _with_config_dir(argv: list[str]) -> list[str]:
    """``argv`` plus ``--config-dir <the package's presets>`` unless a config dir is given."""
    given = any(a in ("--config-dir", "-cd") or a.startswith(("--config-dir=", "-cd="))
                for a in argv)
    if given:
        return argv
    return [argv[0], "--config-dir", str(presets.config_dir()), *argv[1:]]


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
