"""The parts of ``scripts/compare_released.py``, each importable beside the released fairseq 0.8
(this package never imports ``powernorm_fairseq`` at import time): ``shims`` (the runtime shims
of both trainers), ``workers`` (what each worker process runs), ``verdict`` (the comparisons)."""
