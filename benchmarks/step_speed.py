"""Training-step CPU time of the same fairseq transformer with LayerNorm and with each norm, in one
process, interleaved step by step on the same batches.

``train_speed.py`` times whole ``fairseq-train`` runs, one process per run: two runs of one norm
differ by up to 13-35% there (start-up, memory layout, the machine's phase), more than the
difference it is asked to resolve. This benchmark builds one fairseq ``Trainer`` per norm
configuration (the models, criterion, optimizer and schedule of ``train_speed.train_cmd``: the
paper's IWSLT14 settings) in one process, draws one list of training batches, and then, for each
batch, runs ``Trainer.train_step`` of every norm in a fresh random order, timing each step's
process CPU time. Every norm sees the same batches in the same order; the machine's phase is
shared by all norms within a round. After ``--warmup`` rounds (allocator and thread-pool
warm-up), it reports target words per CPU second (total words over total CPU time) and its ratio to
LN, with a 95% bootstrap interval of that ratio over the rounds (1000 resamples of the rounds,
the same rounds for LN and the norm).

    OMP_NUM_THREADS=1 python benchmarks/step_speed.py --sizes multi30k iwslt --out step_speed.json

The measure excludes what does not depend on the norm (data loading, logging, checkpointing);
with one thread, process CPU time is the step's own work.
"""

from __future__ import annotations

import argparse
import os
import random
import shlex
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_speed import SITES, SIZES, make_corpus, norm_flag_sets, train_cmd  # noqa: E402

from powernorm_fairseq.pipeline.common import atomic_write_json, git_commit, hardware, log  # noqa: E402

BOOTSTRAP = 1000  # resamples of the rounds for the ratio's interval


def build_trainer(data_bin: Path, arch: str, flags: list[str], max_tokens: int):
    """A fairseq ``Trainer`` for ``train_speed.train_cmd``'s command line (CPU), its task built."""
    from fairseq import options, tasks
    from fairseq.dataclass.utils import convert_namespace_to_omegaconf
    from fairseq.trainer import Trainer

    argv = train_cmd(data_bin, arch, flags, 10**6, max_tokens, None)
    argv = argv[argv.index(str(data_bin)):] + ["--cpu"]
    from powernorm_fairseq import criterions, models  # noqa: F401 - registers them (fairseq is loaded)
    parser = options.get_training_parser()
    cfg = convert_namespace_to_omegaconf(options.parse_args_and_arch(parser, argv))
    torch.manual_seed(cfg.common.seed)
    task = tasks.setup_task(cfg.task)
    task.load_dataset("train")
    model, criterion = task.build_model(cfg.model), task.build_criterion(cfg.criterion)
    return Trainer(cfg, task, model, criterion), task, cfg


def batches(task, cfg, n: int) -> list[dict]:
    """The first ``n`` training batches of epoch 1 (fairseq's own batching and order; fewer
    where the epoch has fewer)."""
    itr = task.get_batch_iterator(
        dataset=task.dataset("train"), max_tokens=cfg.dataset.max_tokens, seed=cfg.common.seed,
        num_workers=0, epoch=1).next_epoch_itr(shuffle=True)
    out = []
    for sample in itr:
        out.append(sample)
        if len(out) == n:
            break
    return out


def measure_size(args: argparse.Namespace, data_bin: Path, size: str) -> dict:
    """Interleaved steps of LN and the ``--norms`` at one model size: words per CPU second."""
    flag_sets = norm_flag_sets(args.norms, args.sites)
    trainers = {}
    for norm, flags in flag_sets.items():
        extra = shlex.split(args.pn_args) if norm != "LN" else []
        trainers[norm], task, cfg = build_trainer(data_bin, SIZES[size], flags + extra, args.max_tokens)
    rounds = args.warmup + args.steps
    samples = batches(task, cfg, rounds)
    samples = (samples * -(-rounds // len(samples)))[:rounds]  # the epoch again where it is short
    rng = random.Random(args.seed)
    cpu = {norm: [] for norm in flag_sets}
    wall = {norm: [] for norm in flag_sets}
    for i, sample in enumerate(samples):
        order = list(flag_sets)
        rng.shuffle(order)
        for norm in order:
            start, start_wall = time.process_time(), time.perf_counter()
            trainers[norm].train_step([sample])
            if i >= args.warmup:
                cpu[norm].append(time.process_time() - start)
                wall[norm].append(time.perf_counter() - start_wall)
    words = sum(s["ntokens"] for s in samples[args.warmup:])
    row = {"size": size, "arch": SIZES[size], "sites": list(args.sites), "steps": args.steps,
           "words": words, "cpu_s_per_step": cpu, "wall_s_per_step": wall}
    for clock, times, wps, ratio in (("CPU", cpu, "cpu_wps", "ratio"), ("wall", wall, "wall_wps", "wall_ratio")):
        row.update(summarize(times, words, args.seed, wps, ratio))
        for norm in [n for n in flag_sets if n != "LN"]:
            low, high = row[f"{ratio}_ci95_{norm}"]
            log(f"{size} {norm}: {row[f'{wps}_{norm}']:.1f} words per {clock} second, "
                f"{row[f'{ratio}_{norm}']:.3f}x LN (95% interval over rounds {low:.3f}-{high:.3f})")
    return row


def summarize(times: dict[str, list[float]], words: int, seed: int, wps: str = "cpu_wps",
              ratio: str = "ratio") -> dict:
    """Words per second of each norm (``{wps}_{norm}``: ``words`` over its total time) and, for
    each norm but LN, its ratio to LN (``{ratio}_{norm}``) with a 95% bootstrap interval over the
    rounds (``{ratio}_ci95_{norm}``): the rounds resampled with replacement, LN's time over the
    norm's in the same rounds. ``times[norm][i]`` is the norm's step time in round ``i``."""
    steps = len(times["LN"])
    boot = random.Random(seed)
    picks = [[boot.randrange(steps) for _ in range(steps)] for _ in range(BOOTSTRAP)]
    out = {f"{wps}_{norm}": words / sum(t) for norm, t in times.items()}
    for norm in [n for n in times if n != "LN"]:
        out[f"{ratio}_{norm}"] = out[f"{wps}_{norm}"] / out[f"{wps}_LN"]
        ratios = sorted(sum(times["LN"][i] for i in pick) / sum(times[norm][i] for i in pick)
                        for pick in picks)
        out[f"{ratio}_ci95_{norm}"] = [ratios[int(0.025 * BOOTSTRAP)], ratios[int(0.975 * BOOTSTRAP) - 1]]
    return out


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", nargs="+", choices=sorted(SIZES), default=["multi30k", "iwslt"])
    p.add_argument("--norms", nargs="+", default=["pn", "pnpaper", "pnv", "bn"], metavar="SHORT",
                   help="norm configurations (configs/norm/) measured beside LN")
    p.add_argument("--sites", nargs="+", choices=SITES, default=list(SITES),
                   help="where the norm replaces LN (default: both; the quickstart and the translation "
                   "presets, as the released code: encoder)")
    p.add_argument("--pn-args", default="", help="extra fairseq options of the norms other than LN, "
                   "e.g. '--pn-warmup-updates 0' to measure PN past its warmup")
    p.add_argument("--steps", type=int, default=60, help="measured rounds of steps (60)")
    p.add_argument("--warmup", type=int, default=5, help="rounds not measured first (5)")
    p.add_argument("--max-tokens", type=int, default=2048, help="tokens per batch (2048)")
    p.add_argument("--train-sentences", type=int, default=6000)
    p.add_argument("--seed", type=int, default=1, help="the order of the norms in each round")
    p.add_argument("--workdir", type=Path, help="corpus (default: a temporary dir)")
    p.add_argument("--out", type=Path, help="write the results as JSON here")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    commit = git_commit()  # the code this process imports now, whatever HEAD is by the end
    with tempfile.TemporaryDirectory(prefix="step_speed_") as tmp:
        data_bin = make_corpus(args.workdir or Path(tmp), args.train_sentences, 200)
        load_before = os.getloadavg()
        started = time.time()
        rows = [measure_size(args, data_bin, size) for size in args.sizes]
    result = {"benchmark": "step_speed", "settings": {k: str(v) if isinstance(v, Path) else v
                                                     for k, v in vars(args).items()},
              "rows": rows, "threads": torch.get_num_threads(),
              "loadavg_before_after": [load_before, os.getloadavg()],
              "wall_s": round(time.time() - started, 1), "commit": commit,
              "hardware": hardware(), "argv": sys.argv}
    print(f"{'size':<10} {'norm':<9} {'words/CPU s':>12} {'x LN':>7} {'95% interval':>14}"
          f" {'words/wall s':>13} {'x LN':>7} {'95% interval':>14}")
    for r in rows:
        for norm in [k[len("cpu_wps_"):] for k in r if k.startswith("cpu_wps_")]:
            line = f"{r['size']:<10} {norm:<9}"
            for key, ratio_key in (("cpu_wps", "ratio"), ("wall_wps", "wall_ratio")):
                ratio = r[f"{key}_{norm}"] / r[f"{key}_LN"]
                spread = r.get(f"{ratio_key}_ci95_{norm}")
                line += (f" {r[f'{key}_{norm}']:>12.1f} {ratio:>7.3f} "
                         + (f"{spread[0]:>8.3f}-{spread[1]:.3f}" if spread else " " * 14))
            print(line)
    if args.out:
        atomic_write_json(args.out, result)
    return result


if __name__ == "__main__":
    main()
