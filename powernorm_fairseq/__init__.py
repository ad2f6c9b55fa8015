"""PowerNorm (Shen et al., ICML 2020) for fairseq: use as ``--user-dir powernorm_fairseq``.

fairseq imports this package (after importing itself) when given ``--user-dir``; the fairseq
models are registered then. The pure-torch parts (``powernorm_fairseq.norms``, ``.inference``)
stay importable without fairseq: the registration is skipped unless fairseq is already loaded.
Import :mod:`powernorm_fairseq.models` to register explicitly.
"""

import logging
import sys


class _NoTensorboardNotice(logging.Filter):
    """Drops fairseq's "Please install tensorboardX" line.

    ``import fairseq`` imports every fairseq task, the speech tasks included, and
    ``fairseq.tasks.text_to_speech`` logs that line at import although nothing here uses
    tensorboard. Only possible when this package is imported before fairseq (the project's entry
    points: ``python -m powernorm_fairseq...``, ``powernorm-hydra-train``); under
    ``fairseq-train --user-dir`` fairseq has printed it before the plugin loads.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Please install tensorboardX")


if "fairseq" not in sys.modules:
    logging.getLogger("fairseq.tasks.text_to_speech").addFilter(_NoTensorboardNotice())

if sys.modules.get("fairseq") is not None:  # None = import of fairseq blocked
    # registers transformer_pn, transformer_lm_pn and label_smoothed_cross_entropy_uniform
    from powernorm_fairseq import criterions, models  # noqa: F401
