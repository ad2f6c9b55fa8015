"""Train one experiment of the paper on what this machine has: CPU, one GPU, all GPUs, or nodes.

Usage::

    # the preset <experiment>_<norm> (configs/base/ with configs/norm/, hydra); overrides are hydra key=value pairs
    python -m powernorm_fairseq.pipeline.train iwslt14 pn --data data/iwslt14/data-bin
    # no preset: the overrides are plain fairseq-train flags (used by the quickstart and tests)
    python -m powernorm_fairseq.pipeline.train flags pn --data DIR --save-dir DIR -- --arch ...

Launch modes (the world size W decides the gradient accumulation, see below):

* CPU, one process: ``--cpu``. CPU data parallel: ``--cpu-workers N`` starts N ranks itself (gloo;
  fairseq's own launchers cannot run on CPU) and checks that all ranks end with the same parameters.
* GPUs of this node: fairseq spawns one process per visible GPU (W = number of GPUs).
* Several nodes with torchrun: on every node ``torchrun --nnodes M --nproc-per-node G
  --rdzv-endpoint HOST:PORT -m powernorm_fairseq.pipeline.train ...`` (fairseq reads RANK /
  WORLD_SIZE / LOCAL_RANK; W = WORLD_SIZE).
* SLURM: ``srun --ntasks-per-node G python -m powernorm_fairseq.pipeline.train ... --port 12345``
  (one task per GPU; fairseq builds the rendezvous from SLURM's variables; W = SLURM_NTASKS).

Effective batch: the preset's ``max_tokens * update_freq`` (LM presets: ``batch_size *
update_freq``) is the paper's batch on one device; with W ranks, ``update_freq`` becomes
``ceil(target / (max_tokens * W))`` so that ``max_tokens * update_freq * W`` stays at (or just
above) the paper's. ``--effective-tokens`` (alias ``--effective-batch``) sets another target.

Resuming: fairseq restores ``<save-dir>/checkpoint_last.pt``, so rerunning the same command continues
an interrupted run (Ctrl-C stops every rank and prints that command, no traceback). Options are
never abbreviated (``--cpu-worker`` is an error, not ``--cpu-workers``). The full resolved configuration is written to ``<save-dir>/config.yaml`` (by
rank 0 in flags mode; copied from hydra's output in preset mode) and the launch details (command, world size, batch arithmetic) to ``<save-dir>/launch.json``.
A failed launch leaves the directory's records as they were: ``launch.json``, ``config.yaml`` and
hydra's ``hydra/.hydra/`` are written only once fairseq has accepted the checkpoint it resumes
from (see ``pipeline/rank.py``), so ``--save-dir`` of another run with another norm is refused
with that run's records intact.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shlex
import shutil
import sys
import time
import zipfile
from pathlib import Path

from powernorm_fairseq import presets
from powernorm_fairseq.pipeline.common import (
    PLUGIN_DIR,
    atomic_path,
    git_commit,
    hydra_quote,
    invocation,
    log,
    stage_command,
)
from powernorm_fairseq.pipeline.launch import _launch
from powernorm_fairseq.pipeline.rank import ON_START_ENV


def norm_flags(config: presets.NormConfig, sites: tuple[str, ...]) -> list[str]:
    """fairseq model flags that put the norm configuration ``config`` (``configs/norm/<short>.yaml``)
    at the norm ``sites`` (``encoder``, ``decoder``), each of its options named explicitly
    (``--pn-variant``), so that a run's command says what it trained whatever the model's defaults."""
    return config.flags(*sites)


def check_data_dir(data: str | Path, splits: tuple[str, ...] = ("train", "valid")) -> Path:
    """Fail with a clear message if ``data`` is not a complete fairseq data-bin directory.

    A directory made by the prepare step is complete once it exists (it is swapped in atomically);
    a ``.tmp`` sibling or a missing ``binarize`` done-marker beside it means an interrupted prepare.
    """
    data = Path(data)
    if not data.is_dir():
        prepare = stage_command("scripts/prepare_<corpus>.sh", "powernorm-prepare <corpus>")
        raise SystemExit(f"data directory {data} does not exist: run {prepare} first (or pass "
                         "--data to the data-bin directory it wrote).")
    markers = data.parent / ".done"
    if markers.is_dir() and not (markers / "binarize").exists():
        raise SystemExit(f"{data} is from an unfinished prepare run (no {markers / 'binarize'}); "
                         "rerun the same prepare command to finish it.")
    dicts = list(data.glob("dict*.txt"))
    if not dicts:
        raise SystemExit(f"{data} has no dict*.txt: not a fairseq data-bin directory "
                         "(point --data at the data-bin folder written by prepare).")
    for split in splits:
        idx = list(data.glob(f"{split}*.idx"))
        if not idx:
            raise SystemExit(f"{data} has no {split} split ({split}*.idx); rerun prepare.")
        for i in idx:
            b = i.with_suffix(".bin")
            if not b.exists() or b.stat().st_size == 0:
                raise SystemExit(f"{b} is missing or empty: the data directory is half-written; "
                                 "rerun prepare.")
    return data


def _readable_checkpoint(path: Path) -> bool:
    """A torch checkpoint is a zip file; a truncated one has no central directory (cheap check)."""
    try:
        with zipfile.ZipFile(path):
            return True
    except (zipfile.BadZipFile, OSError):
        return False


def repair_last_checkpoint(save_dir: Path) -> str | None:
    """Make ``checkpoint_last.pt`` loadable before resuming; returns what was done, if anything.

    fairseq writes ``checkpoint_E_U.pt`` atomically but then *copies* it to ``checkpoint_last.pt``;
    a kill during that copy leaves a truncated ``checkpoint_last.pt`` and every rerun would fail.
    It is replaced (atomically) by the newest readable epoch/update checkpoint.
    """
    last = save_dir / "checkpoint_last.pt"
    if not last.exists() or _readable_checkpoint(last):
        return None
    candidates = sorted((p for p in save_dir.glob("checkpoint*.pt")
                         if re.fullmatch(r"checkpoint(\d+|_\d+_\d+)\.pt", p.name)),
                        key=lambda p: p.stat().st_mtime, reverse=True)
    for cand in candidates:
        if _readable_checkpoint(cand):
            with atomic_path(last) as tmp:
                shutil.copyfile(cand, tmp)
            msg = f"{last} was truncated (killed while being copied); replaced by {cand.name}"
            log(msg)
            return msg
    raise SystemExit(f"{last} is truncated and no intact checkpoint is left in {save_dir}; delete it "
                     "to start over.")




def _flag_value(flags: list[str], name: str, default=None):
    """The last value given for ``--name`` in a flag list (argparse semantics: the last wins)."""
    value = default
    for i, f in enumerate(flags):
        if f == name and i + 1 < len(flags):
            value = flags[i + 1]
        elif f.startswith(name + "="):
            value = f.split("=", 1)[1]
    return value


def world_size(args) -> tuple[int, str]:
    """(W, how): the number of data-parallel ranks this launch will have."""
    if args.cpu_workers:
        return args.cpu_workers, "cpu-workers"
    if "WORLD_SIZE" in os.environ:
        world = int(os.environ["WORLD_SIZE"])
        if world > 1 and not _cuda(args):
            # fairseq sizes its world from the CUDA devices and ignores torchrun's environment on
            # CPU: each rank trained its own copy into the same save dir, silently (issue 38)
            raise SystemExit(
                f"error: torchrun with {world} processes on CPU: fairseq-fixed would train {world} "
                "independent copies (its world size counts GPUs). On one machine use "
                "--cpu-workers N instead (one model over N gloo workers); training on several CPU "
                "machines is not supported. Nothing was started.")
        return world, "torchrun"
    if "SLURM_NTASKS" in os.environ and args.port:
        return int(os.environ["SLURM_NTASKS"]), "slurm"
    if _cuda(args):
        import torch

        return torch.cuda.device_count(), "local-gpus"
    return 1, "cpu"


def _cuda(args) -> bool:
    """Whether this launch trains on GPUs (not ``--cpu``, and CUDA is there)."""
    if args.cpu:
        return False
    import torch

    return torch.cuda.is_available()


def scale_update_freq(per_rank: int, update_freq: int, world: int, target: int | None,
                      unit: str = "tokens") -> dict:
    """Per-rank batch and gradient accumulation that keep ``per_rank * update_freq * world`` at
    the target (default: ``per_rank * update_freq``, the batch as given for one device).

    ``per_rank`` is ``max_tokens`` (unit tokens) or ``batch_size`` (unit sequences, LM presets).
    ``update_freq`` grows while one step of all ranks is below the target; when even one batch per
    rank exceeds it (many ranks), the per-rank batch shrinks to ``ceil(target / world)`` instead.
    """
    target = target or per_rank * update_freq
    if per_rank * world > target:
        per_rank, new_freq = math.ceil(target / world), 1
    else:
        new_freq = math.ceil(target / (per_rank * world))
    return {"unit": unit, "target": target, "per_rank": per_rank, "world_size": world,
            "update_freq": new_freq, "effective": per_rank * new_freq * world}


def preset_path(experiment: str, norm: str, config_dir=None) -> Path:
    """The overlay hydra loads for the preset ``<experiment>_<norm>`` (default: the package's presets)."""
    try:
        return presets.preset_path(f"{experiment}_{norm}", config_dir)
    except SystemExit as e:
        raise SystemExit(f"{e}. Use EXPERIMENT 'flags' to pass plain fairseq-train flags "
                         "instead.") from None


def build_flags_command(args, overrides: list[str], world: int) -> tuple[list[str], dict]:
    """fairseq-train flags for 'flags' mode: the caller's flags plus data, save dir, norm, batch."""
    flags = [str(args.data), "--user-dir", str(PLUGIN_DIR), "--save-dir", str(args.save_dir)]
    arch = _flag_value(overrides, "--arch", "")
    configs = presets.norm_configs(getattr(args, "config_dir", None))
    if args.norm not in configs:
        raise SystemExit(f"unknown norm {args.norm!r}; choose from {sorted(configs)}")
    if arch.startswith("transformer_lm_pn"):
        flags += norm_flags(configs[args.norm], ("decoder",))
    elif arch.startswith("transformer_pn"):
        flags += norm_flags(configs[args.norm], ("encoder",))
    flags += overrides
    max_tokens, batch_size = _flag_value(flags, "--max-tokens"), _flag_value(flags, "--batch-size")
    batch = {}
    if max_tokens is None and batch_size is None and world > 1:
        raise SystemExit("pass --max-tokens or --batch-size so the effective batch can be scaled "
                         "to the world size")
    if max_tokens is not None or batch_size is not None:
        unit = "tokens" if max_tokens is not None else "sequences"
        batch = scale_update_freq(int(max_tokens or batch_size),
                                  int(_flag_value(flags, "--update-freq", 1)), world,
                                  args.effective_batch, unit)
        flags += ["--max-tokens" if unit == "tokens" else "--batch-size", str(batch["per_rank"]),
                  "--update-freq", str(batch["update_freq"])]
    if args.cpu or args.cpu_workers:
        flags.append("--cpu")
    return flags, batch


def build_preset_command(args, overrides: list[str], world: int) -> tuple[list[str], dict]:
    """Hydra arguments for preset mode: the preset plus data, save dir, batch, user overrides."""
    from omegaconf import OmegaConf

    bad = [o for o in overrides if o.startswith("--")]
    if bad:
        raise SystemExit(f"preset mode takes hydra overrides key=value, got {bad}; e.g. "
                         "optimization.max_update=1000 (or use EXPERIMENT 'flags' for fairseq flags)")
    path = preset_path(args.experiment, args.norm, getattr(args, "config_dir", None))
    # the preset as composed (its base through the defaults list), without fairseq's defaults
    cfg = OmegaConf.to_container(presets.compose(path.stem, directory=path.parent))
    ds, opt = cfg.get("dataset", {}) or {}, cfg.get("optimization", {}) or {}
    # No common.user_dir: the hydra entry (powernorm_fairseq.hydra_train) imports the plugin
    # itself, so a preset resolves to the same config here as with `powernorm-hydra-train`.
    # quoted: a path with a comma (or a space, a bracket) would be a list to hydra
    hydra_args = ["--config-dir", str(path.parent), "--config-name", path.stem,
                  f"task.data={hydra_quote(args.data)}", f"checkpoint.save_dir={hydra_quote(args.save_dir)}",
                  f"hydra.run.dir={hydra_quote(Path(args.save_dir) / 'hydra')}"]
    # The preset's batch (max_tokens or batch_size, times update_freq) is the paper's, the target.
    # A per-rank batch given as an override takes part in the arithmetic; an explicit update_freq
    # override is kept as is. Hydra refuses a key given twice, so ours replace the user's.
    given = dict(o.split("=", 1) for o in overrides if "=" in o)
    freq = opt.get("update_freq", [1])
    freq = int(freq[0] if isinstance(freq, list) else freq)
    batch = {}
    for unit, key in (("tokens", "max_tokens"), ("sequences", "batch_size")):
        paper = ds.get(key)
        if not paper or "optimization.update_freq" in given:
            continue
        per_rank = int(given.get(f"dataset.{key}", paper))
        target = args.effective_batch or int(paper) * freq
        batch = scale_update_freq(per_rank, 1, world, target, unit)
        overrides = [o for o in overrides if not o.startswith(f"dataset.{key}=")]
        hydra_args += [f"dataset.{key}={batch['per_rank']}",
                       f"optimization.update_freq=[{batch['update_freq']}]"]
        break
    if args.cpu or args.cpu_workers:
        hydra_args.append("common.cpu=true")
    return hydra_args + overrides, batch






def train(args, overrides: list[str], echo=None) -> dict:
    """Launch training; returns the launch record (also written to ``save_dir/launch.json``)."""
    echo = echo or (lambda line: print(line, flush=True))
    # absolute, with symbolic links kept: the paths in the config are the ones the caller named
    args.data = Path(os.path.abspath(check_data_dir(args.data)))
    args.save_dir = Path(os.path.abspath(args.save_dir or Path("checkpoints") / f"{args.experiment}_{args.norm}"))
    mode = "flags" if args.experiment == "flags" else "preset"
    world, how = world_size(args)
    build = build_flags_command if mode == "flags" else build_preset_command
    base, batch = build(args, overrides, world)  # an unknown preset or bad override: nothing written
    args.save_dir.mkdir(parents=True, exist_ok=True)
    repaired = repair_last_checkpoint(args.save_dir)
    if batch:
        log(f"world size {world} ({how}): {batch['per_rank']} {batch['unit']} x update_freq "
            f"{batch['update_freq']} x {world} = {batch['effective']} {batch['unit']} per update "
            f"(target {batch['target']})")
        if batch["effective"] != batch["target"]:
            log("note: the target is not a multiple of the per-rank batch x world size; rounded up")
    entry = "train" if mode == "flags" else "hydra"
    record = {"experiment": args.experiment, "norm": args.norm, "mode": mode, "world_size": world,
              "launch": how, "batch": batch, "save_dir": str(args.save_dir), "data": str(args.data),
              "command": getattr(args, "command", None) or " ".join(sys.argv), "fairseq_args": base, "git_commit": git_commit(),
              "started": time.strftime("%Y-%m-%dT%H:%M:%S"), "repaired": repaired}
    # Written by rank 0 only once the checkpoint is accepted (a refused launch writes nothing).
    hydra_pending = args.save_dir / "hydra" / ".hydra.pending"
    on_start = {"launch_json": str(args.save_dir / "launch.json"), "record": record}
    if mode == "preset":
        base = [*base, f"hydra.output_subdir={hydra_pending.name}"]
        on_start.update(hydra_pending=str(hydra_pending), hydra_final=str(hydra_pending.parent / ".hydra"))
    launch_env = {ON_START_ENV: json.dumps(on_start)}
    try:
        return _launch(args, how, world, entry, base, record, launch_env, echo)
    finally:
        if hydra_pending.is_dir():  # the launch failed before the checkpoint was accepted
            shutil.rmtree(hydra_pending)








def build_parser() -> argparse.ArgumentParser:
    # No abbreviations: `--cpu-worker 2` must not silently mean --cpu-workers (see _no_abbreviations).
    p = argparse.ArgumentParser(prog="powernorm-train", description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False)
    p.add_argument("experiment", help="an experiment (configs/base/<experiment>.yaml: the preset <experiment>_<norm>) or 'flags'")
    p.add_argument("norm", help="a norm configuration, configs/norm/<norm>.yaml (ln, bn, pnv, pn, pnpaper, ...); "
                   "preset mode trains the preset <experiment>_<norm>")
    p.add_argument("--data", required=True, help="fairseq data-bin directory (from prepare)")
    p.add_argument("--save-dir", help="checkpoint directory (default ./checkpoints/<experiment>_<norm>)")
    p.add_argument("--config-dir", help="directory of the presets (default: the package's, a copy "
                   "of the repository's configs/)")
    p.add_argument("--cpu", action="store_true", help="train on CPU even if GPUs are visible")
    p.add_argument("--cpu-workers", type=int, default=0, help="CPU data parallel with N ranks (gloo)")
    p.add_argument("--effective-tokens", "--effective-batch", dest="effective_batch", type=int,
                   help="tokens (or LM sequences) per update to keep "
                   "(default: the preset's max_tokens (batch_size) x update_freq, the paper's batch)")
    p.add_argument("--port", type=int, help="rendezvous port (CPU workers; required for SLURM)")
    return p


def _no_abbreviations(parser: argparse.ArgumentParser, unknown: list[str]) -> None:
    """Refuse an unknown option that is a prefix of one of ours (argparse's abbreviations are
    off, so it would otherwise go on to fairseq or hydra as an override)."""
    ours = [o for a in parser._actions for o in a.option_strings if o.startswith("--")]
    for arg in unknown:
        name = arg.split("=", 1)[0]
        if not name.startswith("--"):
            continue
        meant = [o for o in ours if o.startswith(name) and o != name]
        if meant:
            parser.error(f"unknown option {name} (did you mean {' or '.join(meant)}? options "
                         "are not abbreviated)")


def _interrupted_message(args, argv: list[str]) -> str:
    """The one line printed on Ctrl-C: how to resume (or that nothing was saved yet)."""
    command = f"{os.environ.get('PN_TRAIN_COMMAND') or 'python -m powernorm_fairseq.pipeline.train'} " \
        + shlex.join(argv)
    save_dir = getattr(args, "save_dir", None)
    last = Path(save_dir) / "checkpoint_last.pt" if save_dir else None
    if last is not None and last.exists():
        return f"interrupted; resume from {last} with: {command}"
    return f"interrupted before the first checkpoint; rerun to start again: {command}"


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    """(options, overrides) of a command line: everything after ``--``, and every argument that
    is not an option of ours, is passed on to fairseq (flags mode) or hydra (preset mode)."""
    parser = build_parser()
    if "--" in argv:
        i = argv.index("--")
        args, rest = parser.parse_known_args(argv[:i])
        overrides = rest + argv[i + 1:]
    else:
        args, rest = parser.parse_known_args(argv)
        overrides = rest
    _no_abbreviations(parser, rest)
    return args, overrides


def main(argv=None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    args, overrides = parse_args(argv)
    args.command = invocation("powernorm_fairseq.pipeline.train", argv)
    try:
        return train(args, overrides)
    except KeyboardInterrupt:
        print(f"\n{_interrupted_message(args, argv)}", file=sys.stderr, flush=True)
        raise SystemExit(130) from None


if __name__ == "__main__":
    main()
