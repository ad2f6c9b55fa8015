"""Decoding speed of LN vs unfolded PN vs folded PN through fairseq-generate (sentences/s).

Trains an LN and two PN transformers (PN in encoder and decoder: the plugin's default reference
variant, whose GroupScaling pre-scaling survives folding, and the paper's Algorithm 2, which
folds away completely) for a few updates on the synthetic corpus of ``train_speed.py`` (quality
does not matter for speed), then decodes the same test set with the same beam, interleaved:

- unfolded: ``python -m fairseq_cli.generate`` (the models as trained);
- folded: ``python -m powernorm_fairseq.inference.generate`` (``fold_norms`` on the loaded model).

Two metrics, each the median per variant with its ratio to LN:

- ``sentences/s`` (wall clock): fairseq's own figure (time inside beam search; loading excluded);
- ``cpu_sentences/s`` (CPU time): test sentences minus valid sentences, divided by the CPU
  seconds of the test decode minus those of a decode of the small valid split (one batch) with
  the same command, so start-up cancels. Unlike the wall clock, it does not measure the other
  jobs of a shared machine.

It also reports whether the folded and the unfolded PN models produce identical hypotheses. By default every hypothesis is forced to ``--fixed-len`` tokens
(``--min-len L --max-len-a 0 --max-len-b L``): barely trained models differ wildly in output
length, which would otherwise dominate the timing.

    python benchmarks/decode_speed.py --out results/decode_speed.json
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import sys
import tempfile
from pathlib import Path

from train_speed import NORM_FLAGS, SIZES, cpu_seconds_of, make_corpus, train_cmd

from powernorm_fairseq.pipeline.common import (
    PLUGIN_DIR,
    atomic_write_json,
    git_commit,
    hardware,
    log,
    python_module_cmd,
    run_cmd,
)

# trained model -> (norm of train_speed.NORM_FLAGS, extra fairseq-train options)
MODELS = {
    "LN": ("LN", []),
    "PN": ("PN", []),  # the plugin's default PN: reference variant, GroupScaling kept
    "PN_paper": ("PN", ["--pn-variant", "paper"]),  # Algorithm 2: no pre-scaling left
}
FOLD = "powernorm_fairseq.inference.generate"
VARIANTS = {  # variant -> (trained model, generate module)
    "LN": ("LN", "fairseq_cli.generate"),
    "PN": ("PN", "fairseq_cli.generate"),
    "PN_folded": ("PN", FOLD),
    "PN_paper": ("PN_paper", "fairseq_cli.generate"),
    "PN_paper_folded": ("PN_paper", FOLD),
}
_SPEED = re.compile(
    r"Translated ([\d,]+) sentences \([\d,]+ tokens\) in [\d.]+s \(([\d.]+) sentences/s"
)
_HYPO = re.compile(r"^H-(\d+)\t\S+\t(.*)$", re.MULTILINE)


def generate_cmd(
    module: str, data_bin: Path, checkpoint: Path, subset: str, args: argparse.Namespace
) -> list[str]:
    cmd = python_module_cmd(module) + [
        str(data_bin), "--user-dir", str(PLUGIN_DIR), "--task", "translation",
        "--path", str(checkpoint), "--gen-subset", subset, "--beam", str(args.beam),
        "--batch-size", str(args.batch_size), "--num-workers", "0",
    ]  # fmt: skip
    if args.fixed_len:
        length = str(args.fixed_len)
        cmd += ["--min-len", length, "--max-len-a", "0", "--max-len-b", length]
    return cmd


def translated(output: str) -> tuple[int, float]:
    """(sentences, sentences/s) of fairseq-generate's 'Translated ...' line."""
    match = _SPEED.search(output)
    if match is None:
        raise SystemExit("fairseq-generate printed no 'Translated ... sentences/s' line")
    return int(match.group(1).replace(",", "")), float(match.group(2))


def hypotheses(output: str) -> dict[int, str]:
    return {int(i): hypo for i, hypo in _HYPO.findall(output)}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--size", choices=sorted(SIZES), default="multi30k")
    p.add_argument("--train-updates", type=int, default=20, help="updates per model (20)")
    p.add_argument("--test-sentences", type=int, default=500)
    p.add_argument("--beam", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--fixed-len", type=int, default=20, help="hypothesis length; 0 = free (20)")
    p.add_argument("--repeats", type=int, default=3, help="decodes per variant, interleaved (3)")
    p.add_argument("--workdir", type=Path, help="corpus, checkpoints, logs (default: temporary)")
    p.add_argument("--out", type=Path, help="write the results as JSON here")
    args = p.parse_args(argv)
    if min(args.train_updates, args.test_sentences, args.beam, args.repeats) < 1:
        p.error("--train-updates, --test-sentences, --beam and --repeats must be >= 1")
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    commit = git_commit()  # the code this process runs, whatever HEAD is by the end
    with tempfile.TemporaryDirectory(prefix="decode_speed_") as tmp:
        workdir = args.workdir or Path(tmp)
        data_bin = make_corpus(workdir, 2000, args.test_sentences, n_valid=args.batch_size)
        checkpoints = {}
        for model, (norm, extra) in MODELS.items():
            save_dir = workdir / f"ckpt_{model}"
            cmd = train_cmd(
                data_bin, SIZES[args.size], NORM_FLAGS[norm], args.train_updates, 2048, save_dir, extra
            )
            run_cmd(cmd, log_file=workdir / f"train_{model}.log")
            checkpoints[model] = save_dir / "checkpoint_last.pt"
            log(f"trained {model} for {args.train_updates} updates")
        load_before = os.getloadavg()

        def decode(variant: str, subset: str, name: str) -> tuple[str, int, float, float]:
            model, module = VARIANTS[variant]
            cmd = generate_cmd(module, data_bin, checkpoints[model], subset, args)
            out, cpu = cpu_seconds_of(cmd, workdir / f"generate_{variant}_{name}.log")
            return (out, *translated(out), cpu)

        # CPU seconds of start-up plus one batch, subtracted from every test decode
        startup = {v: decode(v, "valid", "startup")[1:] for v in VARIANTS}
        runs = {v: {"sentences/s": [], "cpu_sentences/s": []} for v in VARIANTS}
        hypos: dict[str, dict[int, str]] = {}
        for rep in range(args.repeats):
            for variant in VARIANTS:
                out, n, wall_sps, cpu = decode(variant, "test", str(rep))
                n0, _, cpu0 = startup[variant]
                runs[variant]["sentences/s"].append(wall_sps)
                runs[variant]["cpu_sentences/s"].append((n - n0) / (cpu - cpu0))
                hypos.setdefault(variant, hypotheses(out))
                log(f"{variant} run {rep}: {wall_sps:.2f} sentences/s, "
                    f"{runs[variant]['cpu_sentences/s'][-1]:.2f} per CPU second")  # fmt: skip
    metrics = ("sentences/s", "cpu_sentences/s")
    median = {m: {v: statistics.median(runs[v][m]) for v in VARIANTS} for m in metrics}
    identical = {
        model: sum(h == hypos[f"{model}_folded"].get(i) for i, h in hypos[model].items())
        for model in ("PN", "PN_paper")
    }
    result = {
        "benchmark": "decode_speed",
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "arch": SIZES[args.size],
        "models": {m: NORM_FLAGS[norm] + extra for m, (norm, extra) in MODELS.items()},
        "median": median,
        "ratio_to_LN": {m: {v: median[m][v] / median[m]["LN"] for v in VARIANTS} for m in metrics},
        "runs": runs,
        "startup_valid_sentences_cpu_s": {v: [st[0], st[2]] for v, st in startup.items()},
        "folded_identical_hypotheses": identical,
        "hypotheses": len(hypos["LN"]),
        "loadavg_before_after": [load_before, os.getloadavg()],
        "commit": commit,
        "hardware": hardware(),
        "argv": sys.argv,
    }
    print(f"{'variant':<16} {'sent/s':>8} {'vs LN':>7} {'cpu sent/s':>11} {'vs LN':>7}")
    for v in VARIANTS:
        cells = [f"{median[m][v]:>{w}.2f} {result['ratio_to_LN'][m][v]:>7.3f}"
                 for m, w in zip(metrics, (8, 11), strict=True)]  # fmt: skip
        print(f"{v:<16} " + " ".join(cells))
    for model, same in identical.items():
        print(f"{model} folded vs unfolded: {same}/{len(hypos[model])} identical hypotheses")
    if args.out:
        atomic_write_json(args.out, result)
    return result


if __name__ == "__main__":
    main()
