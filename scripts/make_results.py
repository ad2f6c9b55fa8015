#!/usr/bin/env python
"""Results tables and plots from the run records (``powernorm-results``; see powernorm_fairseq/campaign/make.py)."""
from powernorm_fairseq.cli import results

results()
