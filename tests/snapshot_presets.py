"""Write ``tests/data/resolved_presets.json``: every preset resolved as ``powernorm-hydra-train``
trains with it (:func:`powernorm_fairseq.presets.resolve`), keys sorted.

Usage (from the checkout; only when a preset changes on purpose, listed in
``tests/test_presets.py:INTENDED``)::

    PYTHONPATH=$PWD python tests/snapshot_presets.py [--config-dir configs]

``tests/test_presets.py`` composes the presets again and compares them with this snapshot, so a
refactoring of ``configs/`` that changes any resolved value fails there.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from powernorm_fairseq.pipeline.common import atomic_write_text
from powernorm_fairseq.presets import preset_names, resolve

SNAPSHOT = Path(__file__).resolve().parent / "data" / "resolved_presets.json"


def snapshot(directory: str | None = None) -> dict[str, dict]:
    """``{preset name: resolved config}`` for every preset in ``directory``."""
    return {name: resolve(name, directory=directory) for name in preset_names(directory)}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config-dir", help="presets to resolve (default: the package's)")
    p.add_argument("--out", type=Path, default=SNAPSHOT, help=f"default {SNAPSHOT}")
    args = p.parse_args(argv)
    presets = snapshot(args.config_dir)
    atomic_write_text(args.out, json.dumps(presets, indent=1, sort_keys=True) + "\n")
    print(f"{len(presets)} presets -> {args.out}")


if __name__ == "__main__":
    main()
