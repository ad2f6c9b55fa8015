#!/usr/bin/env python3
"""Average the last N fairseq checkpoints. The logic is in powernorm_fairseq/pipeline/average.py.

    scripts/average_checkpoints.py --dir checkpoints/iwslt14_pn --num-epoch-checkpoints 5 \
        --output checkpoints/iwslt14_pn/checkpoint_avg5.pt
"""

import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

try:
    import torch  # noqa: F401
except ImportError:
    # run as ./scripts/average_checkpoints.py outside the project's environment: use its venv
    venv = ROOT / ".venv" / "bin" / "python"
    if venv.exists() and Path(sys.prefix) != ROOT / ".venv":
        os.execv(str(venv), [str(venv), __file__, *sys.argv[1:]])
    raise SystemExit("torch is not importable: activate the project's environment "
                     "(scripts/setup_env.sh creates .venv)") from None

from powernorm_fairseq.pipeline.average import (  # noqa: E402
    average_checkpoints,
    average_states,
    build_parser,
    check_same_architecture,
    find_checkpoints,
    load_checkpoint,
    main,
)

__all__ = ["average_checkpoints", "average_states", "build_parser", "check_same_architecture",
           "find_checkpoints", "load_checkpoint", "main"]

if __name__ == "__main__":
    main()
