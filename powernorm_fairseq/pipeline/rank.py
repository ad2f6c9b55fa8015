"""Run one training process (one rank) of fairseq, optionally recording a digest of its parameters.

``python -m powernorm_fairseq.pipeline.rank [--param-digest FILE] {train,hydra} ARGS...`` runs
``fairseq_cli.train`` (``train``: fairseq-train flags) or ``powernorm_fairseq.hydra_train``
(``hydra``: a preset plus ``key=value`` overrides) in this process. With ``--param-digest``, after
training it writes the sha256 of every parameter of the trained model to FILE; the launcher compares
the files of all ranks to prove that data-parallel ranks really trained one model.

Nothing describing the run is written before fairseq has accepted the checkpoint it resumes from
(a checkpoint of another architecture or other norms fails in ``Trainer.load_checkpoint``): rank 0
writes the run's records only when that call returned. These are ``<save_dir>/config.yaml``
(``train``), and what the launcher (``pipeline/train.py``) hands over in the environment variable
``POWERNORM_ON_START``, a JSON object: ``launch_json`` / ``record`` (the launch record to write)
and ``hydra_pending`` / ``hydra_final`` (hydra's output directory of this launch, written under a
temporary name, renamed over the previous one).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
from pathlib import Path

from powernorm_fairseq.pipeline.common import atomic_write_json, atomic_write_text, import_plugin

ON_START_ENV = "POWERNORM_ON_START"


def param_digest(model) -> dict:
    """{"params": sha256 over all parameters (name order), "buffers": {name: sha256}}.

    Buffers are listed per name: the running statistics of BN/PN are per-rank state (never
    synchronized unless ``--norm-sync-stats``), so they may differ between ranks by design.
    """
    h = hashlib.sha256()
    for name, p in sorted(model.named_parameters()):
        h.update(name.encode())
        h.update(p.detach().cpu().contiguous().numpy().tobytes())
    buffers = {name: hashlib.sha256(b.detach().cpu().contiguous().numpy().tobytes()).hexdigest()
               for name, b in sorted(model.named_buffers())}
    return {"params": h.hexdigest(), "buffers": buffers}


class OnStart:
    """What rank 0 writes once the checkpoint is accepted (see the module docstring); runs once."""

    def __init__(self) -> None:
        self.spec = json.loads(os.environ.get(ON_START_ENV) or "{}")
        self.config: tuple[Path, str] | None = None  # (path, text) of config.yaml (train mode)
        self.done = False

    def __call__(self) -> None:
        if self.done:
            return
        self.done = True
        if self.config is not None:
            atomic_write_text(*self.config)
        if self.spec.get("launch_json"):
            atomic_write_json(self.spec["launch_json"], self.spec["record"])
        pending, final = self.spec.get("hydra_pending"), self.spec.get("hydra_final")
        if pending and os.path.isdir(pending):
            if os.path.isdir(final):
                shutil.rmtree(final)
            os.replace(pending, final)


def write_config_and_train(fairseq_train, argv: list[str], on_start: OnStart) -> None:
    """``fairseq_cli.train.cli_main`` with one addition: rank 0 writes the resolved config.

    The file ``<save_dir>/config.yaml`` is the complete configuration fairseq runs with (every
    default filled in), written once the checkpoint to resume from is accepted.
    """
    from fairseq import distributed_utils, options
    from fairseq.dataclass.utils import convert_namespace_to_omegaconf
    from omegaconf import OmegaConf

    sys.argv = ["fairseq-train", *argv]
    args = options.parse_args_and_arch(options.get_training_parser())
    cfg = convert_namespace_to_omegaconf(args)
    on_start.config = (Path(cfg.checkpoint.save_dir) / "config.yaml", OmegaConf.to_yaml(cfg))
    distributed_utils.call_main(cfg, fairseq_train.main)


def main(argv=None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    digest_path = None
    if argv[:1] == ["--param-digest"]:
        digest_path, argv = argv[1], argv[2:]
    if not argv or argv[0] not in ("train", "hydra"):
        raise SystemExit("usage: rank [--param-digest FILE] {train,hydra} ARGS...")
    entry, argv = argv[0], argv[1:]

    import fairseq_cli.train as fairseq_train

    import_plugin()

    trainers = []
    on_start = OnStart()
    # fairseq_cli.train.main builds the Trainer and keeps it local; record it to read the final
    # parameters after main() returns, and write the run's records once the checkpoint loaded.
    base = fairseq_train.Trainer

    class RecordingTrainer(base):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            trainers.append(self)

        def load_checkpoint(self, *args, **kwargs):
            result = super().load_checkpoint(*args, **kwargs)  # raises on an unusable checkpoint
            if self.data_parallel_rank == 0:
                on_start()
            return result

    fairseq_train.Trainer = RecordingTrainer
    if entry == "train":
        write_config_and_train(fairseq_train, argv, on_start)
    else:
        from powernorm_fairseq import hydra_train

        sys.argv = ["powernorm-hydra-train", *argv]
        hydra_train.cli_main()
    if digest_path:
        if not trainers:
            raise SystemExit("training ended before a Trainer was built; no parameter digest")
        trainer = trainers[-1]
        record = param_digest(trainer.get_model())
        record.update(rank=trainer.data_parallel_rank, world_size=trainer.data_parallel_world_size,
                      num_updates=trainer.get_num_updates())
        atomic_write_json(digest_path, record)


if __name__ == "__main__":
    main()
