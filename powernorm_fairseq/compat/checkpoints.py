"""Checkpoints: unusable ones fail with one clear line, copies are atomic, ``--patience`` counts
across a resume (items 2, 4, 6 and 9 of :mod:`powernorm_fairseq.compat`)."""

from __future__ import annotations

import functools
import os
import pickle
import re
import shutil
import sys
import zipfile

from .errors import CheckpointError, EvaluationError, OptionError
from .state import ORIGINAL, TRAINING_LOAD


def _checked_load_checkpoint_to_cpu(load):
    """Wrap ``checkpoint_utils.load_checkpoint_to_cpu`` so unreadable files raise CheckpointError."""

    @functools.wraps(load)
    def load_checkpoint_to_cpu(path, *args, **kwargs):
        try:
            state = load(path, *args, **kwargs)
        except pickle.UnpicklingError as e:
            if "Unsupported global" in str(e):
                raise CheckpointError(
                    f"checkpoint {path} holds a Python object that is not allow-listed for "
                    f"torch.load(weights_only=True) ({_first_line(e)}). If you trust the file, "
                    "allow-list that class with torch.serialization.add_safe_globals([...]) "
                    "before loading."
                ) from e
            raise CheckpointError(_corrupt_message(path, e)) from e
        except (RuntimeError, EOFError, zipfile.BadZipFile) as e:
            raise CheckpointError(_corrupt_message(path, e)) from e
        except KeyError as e:
            raise CheckpointError(
                f"{path} is not a fairseq checkpoint (it has no {e} entry): pass a checkpoint "
                "written by fairseq-train (checkpoint_*.pt) or an average of such checkpoints"
            ) from e
        if TRAINING_LOAD.get("active") and not TRAINING_LOAD.get("reset_optimizer") \
                and isinstance(state, dict) and state.get("average"):
            raise CheckpointError(
                f"{path} is an average of checkpoints (scripts/average_checkpoints.py, "
                "powernorm-average): it has no "
                "optimizer state and no position in the data, so training cannot resume from it. "
                "To continue the run, train from its checkpoint_last.pt; to fine-tune from the "
                "averaged weights, add --reset-optimizer --reset-dataloader --reset-meters."
            )
        return state

    return load_checkpoint_to_cpu


def _first_line(e: BaseException) -> str:
    # torch's weights_only errors are long; the part from "Unsupported" says what went wrong.
    for line in str(e).splitlines():
        if "Unsupported" in line:
            return line[line.index("Unsupported"):].strip()
    return (str(e).splitlines() or [type(e).__name__])[0]


def _corrupt_message(path, e: BaseException) -> str:
    return (
        f"cannot read checkpoint {path}: it is truncated or corrupt ({type(e).__name__}: "
        f"{_first_line(e)}). This happens when a run is killed while saving. Point "
        "--restore-file/--path to another checkpoint (checkpoint_best.pt, an epoch checkpoint) "
        "or delete this file to start from scratch."
    )


PATIENCE_KEY = "powernorm_patience"  # extra_state of a checkpoint: --patience's state (item 9)


def _stop_functions() -> list:
    """fairseq's early-stopping function, which holds the patience state as attributes (``best``,
    ``num_runs``), of every loaded copy of ``fairseq_cli.train``: the imported module
    (``fairseq-train``, ``fairseq-hydra-train``) and ``__main__`` under ``python -m
    fairseq_cli.train``; none outside a training."""
    main = sys.modules.get("__main__")
    modules = [sys.modules.get("fairseq_cli.train"),
               main if getattr(getattr(main, "__spec__", None), "name", None) == "fairseq_cli.train" else None]
    found = [getattr(m, "should_stop_early", None) for m in modules]
    return [f for i, f in enumerate(found) if f is not None and f not in found[:i]]


def _patience_saved(save):
    """Wrap ``Trainer.save_checkpoint``: the checkpoint carries the patience state (item 9).
    fairseq validates and updates that state before it saves the epoch's checkpoint."""

    @functools.wraps(save)
    def save_checkpoint(self, filename, extra_state):
        for stop in _stop_functions():  # the copy that is validating is the one with a state
            if getattr(stop, "best", None) is not None:
                extra_state = {**extra_state,
                               PATIENCE_KEY: {"best": stop.best, "num_runs": getattr(stop, "num_runs", 0)}}
        return save(self, filename, extra_state)

    return save_checkpoint


def _restore_patience(extra_state) -> None:
    """Give ``should_stop_early`` the state a checkpoint saved (item 9); from a checkpoint saved
    before that, its best loss (``save_checkpoint.best``'s, the same metric) and a count of 0."""
    saved = (extra_state or {}).get(PATIENCE_KEY)
    if saved is None and (extra_state or {}).get("best") is not None:
        saved = {"best": extra_state["best"], "num_runs": 0}
    for stop in _stop_functions() if saved is not None else ():
        stop.best, stop.num_runs = saved["best"], saved["num_runs"]


def _checked_trainer_load_checkpoint(load):
    """Wrap ``Trainer.load_checkpoint``: parameters that do not fit the model raise CheckpointError."""

    @functools.wraps(load)
    def load_checkpoint(self, filename, *args, **kwargs):
        reset_optimizer = kwargs.get("reset_optimizer", args[0] if args else False)
        reset_meters = kwargs.get("reset_meters", args[3] if len(args) > 3 else False)
        TRAINING_LOAD.update(active=True, reset_optimizer=bool(reset_optimizer))
        try:
            extra_state = load(self, filename, *args, **kwargs)
            if not (reset_optimizer or reset_meters):
                _restore_patience(extra_state)
            return extra_state
        except CheckpointError:
            raise
        except Exception as e:
            if not str(e).startswith("Cannot load model parameters"):
                raise
            cause = e.__cause__ or e.__context__ or e
            detail = " ".join(str(cause).split())  # torch lists the mismatched keys over lines
            if len(detail) > 400:
                detail = detail[:400] + " ..."
            raise CheckpointError(
                f"checkpoint {filename} does not fit the model being trained ({detail}). "
                "It was saved from another architecture or other norm options: train with the "
                "--arch and --*-norm/--pn-* options it was saved with (see its cfg.model), or "
                "start without it (other --save-dir or --restore-file, or add "
                "--reset-optimizer --reset-dataloader --reset-meters only to fine-tune a "
                "matching model)."
            ) from e
        finally:
            TRAINING_LOAD.clear()

    return load_checkpoint


_SIZE_MISMATCH = re.compile(
    r"size mismatch for (\S*(?:embed_tokens|output_projection)\.weight): copying a param with "
    r"shape torch\.Size\(\[(\d+), \d+\]\) from checkpoint, the shape in current model is "
    r"torch\.Size\(\[(\d+), \d+\]\)")


def _checked_load_model_ensemble_and_task(load):
    """Wrap ``checkpoint_utils.load_model_ensemble_and_task`` (generate, interactive, eval-lm):
    a checkpoint trained with a dictionary of another size raises CheckpointError."""

    @functools.wraps(load)
    def load_model_ensemble_and_task(filenames, *args, **kwargs):
        try:
            return load(filenames, *args, **kwargs)
        except RuntimeError as e:
            m = _SIZE_MISMATCH.search(str(e))
            if m is None:
                raise
            name, trained, given = m.groups()
            raise CheckpointError(
                f"checkpoint {', '.join(map(str, filenames))} was trained with a dictionary of "
                f"{trained} entries ({name}), but the data directory's dictionary has {given}: "
                "pass the data-bin the model was trained on (the same dict.*.txt)."
            ) from e

    return load_model_ensemble_and_task


def _atomic_copy_path_manager(base: type) -> type:
    """A subclass of fairseq's ``PathManager`` whose ``copy`` to a local file is atomic."""

    class AtomicCopyPathManager(base):
        @staticmethod
        def copy(src_path: str, dst_path: str, overwrite: bool = False) -> bool:
            if not base.supports_rename(dst_path):
                return base.copy(src_path, dst_path, overwrite=overwrite)
            if not overwrite and os.path.exists(dst_path):
                return False  # iopath's answer for an existing target without overwrite
            tmp = f"{dst_path}.tmp"
            try:
                shutil.copyfile(src_path, tmp)
                os.replace(tmp, dst_path)  # atomic on one filesystem: old or new, never half
            finally:
                if os.path.exists(tmp):
                    os.remove(tmp)
            return True

    AtomicCopyPathManager.__qualname__ = f"atomic_copy({base.__qualname__})"
    return AtomicCopyPathManager


def _excepthook(previous):
    def hook(exc_type, exc, tb):
        if issubclass(exc_type, (CheckpointError, EvaluationError, OptionError)):
            print(f"error: {exc}", file=sys.stderr)
        else:
            previous(exc_type, exc, tb)

    hook.powernorm = True
    return hook



def install_checkpoints() -> None:
    """Wrap fairseq's checkpoint loading and saving, and its copies of a checkpoint."""
    from fairseq import checkpoint_utils, trainer

    ORIGINAL["load_checkpoint_to_cpu"] = checkpoint_utils.load_checkpoint_to_cpu
    checkpoint_utils.load_checkpoint_to_cpu = _checked_load_checkpoint_to_cpu(
        checkpoint_utils.load_checkpoint_to_cpu
    )
    ORIGINAL["Trainer.load_checkpoint"] = trainer.Trainer.load_checkpoint
    trainer.Trainer.load_checkpoint = _checked_trainer_load_checkpoint(trainer.Trainer.load_checkpoint)
    ORIGINAL["Trainer.save_checkpoint"] = trainer.Trainer.save_checkpoint
    trainer.Trainer.save_checkpoint = _patience_saved(trainer.Trainer.save_checkpoint)
    ORIGINAL["load_model_ensemble_and_task"] = checkpoint_utils.load_model_ensemble_and_task
    checkpoint_utils.load_model_ensemble_and_task = _checked_load_model_ensemble_and_task(
        checkpoint_utils.load_model_ensemble_and_task
    )
    ORIGINAL["checkpoint_utils.PathManager"] = checkpoint_utils.PathManager
    checkpoint_utils.PathManager = _atomic_copy_path_manager(checkpoint_utils.PathManager)
    # on the command line a CheckpointError / EvaluationError is the whole story: print it without the traceback
    if not getattr(sys.excepthook, "powernorm", False):
        sys.excepthook = _excepthook(sys.excepthook)
