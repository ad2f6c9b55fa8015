#!/usr/bin/env python
"""The paper's campaigns, resumably (``powernorm-reproduce``; see powernorm_fairseq/campaign/)."""
from powernorm_fairseq.cli import reproduce

reproduce()
