#!/usr/bin/env python
"""Average the last N fairseq checkpoints (``powernorm-average``; see powernorm_fairseq/pipeline/average.py)."""
from powernorm_fairseq.cli import average

average()
