#!/usr/bin/env python
"""Average the last N fairseq checkpoints. See powernorm_fairseq/pipeline/average.py.

    scripts/average_checkpoints.py --dir checkpoints/iwslt14_pn --num-epoch-checkpoints 5 \
        --output checkpoints/iwslt14_pn/checkpoint_avg5.pt
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

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
