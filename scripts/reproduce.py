#!/usr/bin/env python
"""The paper's campaigns, resumably (``powernorm-reproduce``; see powernorm_fairseq/pipeline/reproduce.py)."""
from powernorm_fairseq.cli import reproduce

reproduce()
