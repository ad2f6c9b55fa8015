"""``fairseq-hydra-train`` with the plugin imported first and the repository's presets found.

Usage::

    powernorm-hydra-train --config-name iwslt14_pn task.data=data-bin/iwslt14.tokenized.de-en
    python -m powernorm_fairseq.hydra_train --config-name ptb_pn task.data=data-bin/ptb

fairseq's own ``fairseq-hydra-train`` completes the composed config with each component's
dataclass defaults (``add_defaults``) *before* it imports ``common.user_dir``, so the plugin's
models are unknown at that point (``transformer_lm_pn`` loses its defaults). This entry point
imports the plugin first and then runs fairseq's hydra training unchanged. Without
``--config-dir``/``-cd`` it looks for presets in the repository's ``configs/``.
"""

from __future__ import annotations

import sys
from pathlib import Path

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"


def _with_config_dir(argv: list[str]) -> list[str]:
    """``argv`` plus ``--config-dir CONFIG_DIR`` unless a config dir is already given."""
    given = any(a in ("--config-dir", "-cd") or a.startswith("--config-dir=") for a in argv)
    if given or not CONFIG_DIR.is_dir():
        return argv
    return [argv[0], "--config-dir", str(CONFIG_DIR), *argv[1:]]


def cli_main() -> None:
    """Console script ``powernorm-hydra-train`` (arguments as ``fairseq-hydra-train``)."""
    from fairseq_cli import hydra_train

    import powernorm_fairseq.models  # noqa: F401  (registers the models, applies compat)

    sys.argv = _with_config_dir(sys.argv)
    hydra_train.cli_main()


if __name__ == "__main__":
    cli_main()
