"""Average the parameters of the last N fairseq checkpoints (the paper averages the last 5/10).

Floating-point tensors (parameters and float buffers such as running statistics) are averaged in
float64 and cast back. Integer and bool tensors are step counters or flags (``iters``,
``num_updates``, ``num_batches_tracked``): dividing them is meaningless, so they are copied from the
newest checkpoint. The config and the optimizer history (update count, lr schedule) also come from
the newest checkpoint, so fairseq-generate / fairseq-eval-lm load the result like any checkpoint.

An average is not a training state: it is written without the optimizer state
(``last_optimizer_state``) and without the data-iterator position (``extra_state.train_iterator``),
and carries an ``average`` field (inputs, update count, how each tensor was combined). Training
refuses to resume from it (``compat/checkpoints.py``); fine-tuning from it needs ``--reset-optimizer``.

Files are never lost: the output may not be one of the inputs, nor a name fairseq writes itself
(``checkpoint_last.pt`` / ``checkpoint_best.pt`` / ``checkpointE.pt`` / ``checkpoint_E_U.pt``,
which a resume or the next averaging would pick up), nor an existing file unless ``--force``.
Evaluation records keyed to the output's path (``<output>.bleu.json``, ``<output>.bleu.hyp.txt``,
``<output>.ppl.json``, the default names of ``pipeline/evaluate.py``) describe the file being
replaced, so they are deleted before the new average is written: no score outlives its weights.
"""

from __future__ import annotations

import argparse
import pickle
import re
import sys
import zipfile
from argparse import Namespace
from pathlib import Path

import torch

from powernorm_fairseq.pipeline.common import atomic_path, log
from powernorm_fairseq.pipeline.evaluate import record_files

# Names fairseq itself writes and reads back (resume, best, epoch/update checkpoints).
_FAIRSEQ_NAMES = re.compile(r"checkpoint(_last|_best|\d+|_\d+_\d+)\.pt|checkpoint\.best_.*\.pt")
# Evaluation records of a checkpoint C at their default paths (pipeline/evaluate.py).

# Config fields whose difference means a different model (shapes are checked separately).
_ARCH_KEY = re.compile(r"(^arch$|^_name$|layers|embed_dim|ffn|heads|norm|^share|^pn_|^bn_|"
                       r"normalize_before|activation_fn|group_num)")


def find_checkpoints(directory: str | Path, num: int, kind: str) -> list[Path]:
    """The last ``num`` epoch (``checkpointE.pt``) or update (``checkpoint_E_U.pt``) checkpoints.

    Returns them oldest first.
    """
    pattern = re.compile(r"checkpoint(\d+)\.pt$" if kind == "epoch" else r"checkpoint_\d+_(\d+)\.pt$")
    found = sorted((int(m.group(1)), p) for p in Path(directory).iterdir()
                   if (m := pattern.fullmatch(p.name)))
    if len(found) < num:
        raise SystemExit(f"{directory} has {len(found)} {kind} checkpoints "
                         f"({[p.name for _, p in found]}), {num} requested; train longer or ask "
                         "for fewer.")
    return [p for _, p in found[-num:]]


def load_checkpoint(path: str | Path) -> dict:
    """Load a fairseq checkpoint on CPU; a truncated or foreign file raises ``SystemExit``.

    ``weights_only=False`` is needed because fairseq pickles its config (an argparse ``Namespace``
    or omegaconf ``DictConfig``) into the checkpoint, which torch>=2.6's default safe loader rejects.
    Only load checkpoints you trust (a pickle can run code).
    """
    path = Path(path)
    if not path.is_file():
        raise SystemExit(f"checkpoint not found: {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except (RuntimeError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile, ValueError,
            OSError) as e:
        raise SystemExit(f"cannot read checkpoint {path}: {e}. The file is truncated or not a "
                         "torch checkpoint (was it copied while being written?).") from e
    if not isinstance(state, dict) or "model" not in state:
        raise SystemExit(f"{path} is not a fairseq checkpoint (no 'model' entry)")
    return state


def _model_config(state: dict) -> dict:
    cfg = state.get("cfg")
    model = cfg["model"] if cfg is not None else state.get("args")
    if model is None:
        return {}
    if isinstance(model, Namespace):
        items = vars(model)
    else:
        from omegaconf import OmegaConf

        items = OmegaConf.to_container(model, resolve=True) if OmegaConf.is_config(model) else dict(model)
    return {k: v for k, v in items.items() if _ARCH_KEY.search(k)}


def _num_updates(state: dict) -> int:
    history = state.get("optimizer_history") or [{}]
    return int(history[-1].get("num_updates", -1))


def check_same_architecture(states: list[dict], paths: list[Path]) -> None:
    """Refuse to average checkpoints of different models (keys, shapes, dtypes or model config)."""
    ref, ref_path = states[0]["model"], paths[0]
    ref_cfg = _model_config(states[0])
    for state, path in zip(states[1:], paths[1:], strict=True):
        model = state["model"]
        if set(model) != set(ref):
            only_a, only_b = sorted(set(ref) - set(model))[:5], sorted(set(model) - set(ref))[:5]
            raise SystemExit(f"cannot average {ref_path} and {path}: different parameter names "
                             f"(only in the first: {only_a}; only in the second: {only_b}). "
                             "They are different architectures.")
        for k, v in ref.items():
            w = model[k]
            if torch.is_tensor(v) and (not torch.is_tensor(w) or v.shape != w.shape or v.dtype != w.dtype):
                raise SystemExit(f"cannot average {ref_path} and {path}: {k} is "
                                 f"{tuple(v.shape)} {v.dtype} vs {tuple(getattr(w, 'shape', ()))} "
                                 f"{getattr(w, 'dtype', type(w))}. They are different architectures.")
        cfg = _model_config(state)
        diff = {k: (ref_cfg.get(k), cfg.get(k)) for k in set(ref_cfg) | set(cfg) if ref_cfg.get(k) != cfg.get(k)}
        if diff:
            raise SystemExit(f"cannot average {ref_path} and {path}: model settings differ {diff}")


def average_states(states: list[dict]) -> tuple[dict, dict]:
    """Average ``states`` (fairseq checkpoint dicts). Returns (new state, {key: how}) where ``how``
    is ``"mean"`` or ``"newest"``. The newest state (most updates; ties: the last) is the base."""
    newest = max(range(len(states)), key=lambda i: (_num_updates(states[i]), i))
    out = dict(states[newest])
    model, how = {}, {}
    for k, v in states[newest]["model"].items():
        if torch.is_tensor(v) and v.is_floating_point():
            acc = torch.zeros_like(v, dtype=torch.float64)
            for s in states:
                acc += s["model"][k].to(torch.float64)
            model[k] = (acc / len(states)).to(v.dtype)
            how[k] = "mean"
        else:
            model[k] = v
            how[k] = "newest"
    out["model"] = model
    return out, how


def check_output(output: Path, inputs: list[Path], force: bool) -> None:
    """Refuse an output that would destroy an input, a file fairseq uses, or (without ``force``)
    any existing file. Checked before anything is read or written."""
    for p in inputs:
        if output.resolve() == p.resolve() or (output.exists() and p.exists() and output.samefile(p)):
            raise SystemExit(f"--output {output} is one of the checkpoints being averaged; "
                             "write the average to a new file (e.g. checkpoint_avg.pt)")
    if _FAIRSEQ_NAMES.fullmatch(output.name):
        raise SystemExit(f"--output {output}: {output.name} is a name fairseq writes and reads back "
                         "(resume, best, epoch/update checkpoints); an average there would be resumed "
                         "from or averaged again. Use another name, e.g. checkpoint_avg.pt")
    if output.exists() and not force:
        raise SystemExit(f"--output {output} exists; pass --force to replace it (its evaluation "
                         f"records {', '.join(p.name for p in record_files(output))} are then removed)")


def stale_records(output: Path) -> list[Path]:
    """The evaluation records of ``output`` at their default paths that exist."""
    return [r for r in record_files(output) if r.exists()]


def average_checkpoints(inputs: list[str | Path], output: str | Path, *, force: bool = False) -> dict:
    """Average ``inputs`` into ``output`` (written atomically). Returns a summary dict.

    Refusals (``SystemExit``, nothing written): see :func:`check_output`. The records of a
    replaced average are deleted (see the module docstring).
    """
    paths, output = [Path(p) for p in inputs], Path(output)
    if not paths:
        raise SystemExit("no checkpoints to average")
    check_output(output, paths, force)
    states = [load_checkpoint(p) for p in paths]
    check_same_architecture(states, paths)
    state, how = average_states(states)
    # Not a training state: no optimizer moments, no position in the data (a resume from it would
    # silently continue from averaged weights with the newest input's optimizer and epoch).
    state.pop("last_optimizer_state", None)
    extra = dict(state.get("extra_state") or {})
    extra.pop("train_iterator", None)
    state["extra_state"] = extra
    kept = sorted(k for k, h in how.items() if h == "newest")
    state["average"] = {"inputs": [str(p) for p in paths], "num_updates": _num_updates(state),
                        "floats": "mean (float64)", "kept_from_newest": kept}
    state["averaged_from"] = [str(p) for p in paths]
    removed = stale_records(output)
    for r in removed:
        r.unlink()
    with atomic_path(output) as tmp:
        torch.save(state, tmp)
    summary = {"output": str(output), "inputs": [str(p) for p in paths],
               "num_updates": _num_updates(state), "kept_from_newest": kept,
               "removed_records": [str(r) for r in removed]}
    log(f"averaged {len(paths)} checkpoints -> {output} (kept from newest: {len(kept)} tensors)"
        + (f"; removed the records of the replaced file: {[r.name for r in removed]}" if removed else ""))
    return summary


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="powernorm-average", description=__doc__.split("\n")[0])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--inputs", nargs="+", help="checkpoint files, or one directory with "
                     "--num-epoch-checkpoints/--num-update-checkpoints")
    p.add_argument("--num-epoch-checkpoints", type=int, help="average the last N checkpointE.pt")
    p.add_argument("--num-update-checkpoints", type=int, help="average the last N checkpoint_E_U.pt")
    src.add_argument("--dir", help="checkpoint directory (same as a single --inputs DIR)")
    p.add_argument("--output", required=True,
                   help="where to write the averaged checkpoint: a new file, not an input nor a "
                   "name fairseq writes (checkpoint_last.pt, checkpoint_best.pt, checkpointE.pt, "
                   "checkpoint_E_U.pt)")
    p.add_argument("--force", action="store_true",
                   help="replace an existing --output (its evaluation records, <output>.bleu.json "
                   "with its translations and <output>.ppl.json, are deleted with it)")
    return p


def main(argv=None) -> dict:
    args = build_parser().parse_args(argv)
    directory = args.dir or (args.inputs[0] if len(args.inputs) == 1 and Path(args.inputs[0]).is_dir() else None)
    if args.num_epoch_checkpoints and args.num_update_checkpoints:
        raise SystemExit("pass only one of --num-epoch-checkpoints / --num-update-checkpoints")
    n = args.num_epoch_checkpoints or args.num_update_checkpoints
    if directory is not None:
        if not n:
            raise SystemExit("with a directory, pass --num-epoch-checkpoints N or --num-update-checkpoints N")
        inputs = find_checkpoints(directory, n, "epoch" if args.num_epoch_checkpoints else "update")
    else:
        if n:
            raise SystemExit("--num-*-checkpoints selects files in a directory: pass --dir DIR")
        inputs = args.inputs
    return average_checkpoints(inputs, args.output, force=args.force)


if __name__ == "__main__":
    sys.exit(main() and 0)
