"""PowerNorm (Shen et al., ICML 2020) for fairseq: use as ``--user-dir powernorm_fairseq``.

fairseq imports this package (after importing itself) when given ``--user-dir``; the fairseq
models are registered then. The pure-torch parts (``powernorm_fairseq.norms``, ``.inference``)
stay importable without fairseq: the registration is skipped unless fairseq is already loaded.
Import :mod:`powernorm_fairseq.models` to register explicitly.
"""

import sys

if sys.modules.get("fairseq") is not None:  # None = import of fairseq blocked
    # registers transformer_pn, transformer_lm_pn and label_smoothed_cross_entropy_uniform
    from powernorm_fairseq import criterions, models  # noqa: F401
