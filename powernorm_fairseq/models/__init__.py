"""fairseq models of the plugin: ``transformer_pn`` (translation), ``transformer_lm_pn`` (LM).

Importing this package applies the fairseq-fixed workarounds (:mod:`powernorm_fairseq.compat`) and
registers both models and their architectures with fairseq.
"""

from powernorm_fairseq import compat

compat.install()

from . import transformer_lm_pn, transformer_pn  # noqa: E402  (registration)

__all__ = ["transformer_lm_pn", "transformer_pn"]
