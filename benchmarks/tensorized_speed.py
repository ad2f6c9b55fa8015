"""CPU time of one training update: the Tensorized Transformer LM vs transformer_lm_pn of its width.

For each size, builds (through fairseq's parser, as ``fairseq-train`` does) the language model with
``--self-attention multilinear`` and the same model with fairseq's standard multi-head attention
(same layers, width, FFN and norm; ``--decoder-attention-heads`` for the standard one), and times
one update (forward, cross-entropy, backward, Adam step) on a batch of random tokens of a
10,000-word vocabulary (PTB's size), interleaved (multilinear, standard, multilinear, ...), after
``--warmup`` untimed updates. The measure is process CPU time (``time.process_time``), which other
load on a shared machine does not inflate; the ratio is multilinear / standard of the medians.

Sizes:

- ``paper``: ``transformer_lm_pn_tensorized_ptb`` (3 layers, d=256, FFN 2100, rank 40, 1 core,
  N=32), 120 sequences of 32 tokens per update (run_ptb.sh);
- ``cpu``: the CPU-scale presets ``configs/ptb_cpu_tensorized_*.yaml`` (2 layers, d=128, FFN 512,
  rank 40, 1 core, N=32), 128 sequences of 32 tokens (``max_tokens`` 4096).

Usage::

    OMP_NUM_THREADS=1 python benchmarks/tensorized_speed.py \
        --out results/benchmarks/tensorized_speed.json
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from powernorm_fairseq.pipeline.common import (
    atomic_write_json,
    git_commit,
    hardware,
    log,
)

VOCAB = 10000
SIZES = {
    "paper": {"flags": [], "heads": 4, "batch": 120},
    "cpu": {
        "flags": ["--decoder-layers", "2", "--decoder-embed-dim", "128",
                  "--decoder-ffn-embed-dim", "512"],
        "heads": 4,
        "batch": 128,
    },
}
TOKENS = 32


def build(data: Path, flags: list[str]):
    """(model, padding index) for ``transformer_lm_pn_tensorized_ptb`` with ``flags``."""
    from fairseq import options, tasks
    from fairseq.dataclass.utils import convert_namespace_to_omegaconf

    import powernorm_fairseq.models  # noqa: F401  (registers the models)

    argv = [str(data), "--task", "language_modeling", "--tokens-per-sample", str(TOKENS),
            "--arch", "transformer_lm_pn_tensorized_ptb", *flags]
    args = options.parse_args_and_arch(options.get_training_parser(), argv)
    cfg = convert_namespace_to_omegaconf(args)
    task = tasks.setup_task(cfg.task)
    torch.manual_seed(1)
    return task.build_model(cfg.model), task.dictionary


def time_update(model, optimizer, tokens: torch.Tensor, target: torch.Tensor) -> float:
    """CPU seconds of one update."""
    start = time.process_time()
    optimizer.zero_grad(set_to_none=True)
    logits = model(tokens)[0]
    loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), target.flatten())
    loss.backward()
    optimizer.step()
    return time.process_time() - start


def measure(size: str, reps: int, warmup: int, norm: str, data: Path) -> dict:
    spec = SIZES[size]
    common = [*spec["flags"], "--decoder-norm", norm]
    models = {
        "multilinear": build(data, common),
        "standard": build(
            data, [*common, "--self-attention", "standard",
                   "--decoder-attention-heads", str(spec["heads"])]
        ),
    }
    gen = torch.Generator().manual_seed(1)
    dictionary = models["multilinear"][1]
    shape = (spec["batch"], TOKENS)
    tokens = torch.randint(dictionary.nspecial, len(dictionary), shape, generator=gen)
    target = torch.randint(dictionary.nspecial, len(dictionary), shape, generator=gen)
    optimizers = {k: torch.optim.Adam(m.parameters(), lr=1e-4) for k, (m, _) in models.items()}
    times: dict[str, list[float]] = {k: [] for k in models}
    for rep in range(warmup + reps):
        for name, (model, _) in models.items():
            model.train()
            seconds = time_update(model, optimizers[name], tokens, target)
            if rep >= warmup:
                times[name].append(seconds)
    medians = {k: statistics.median(v) for k, v in times.items()}
    result = {
        "size": size,
        "norm": norm,
        "batch": [spec["batch"], TOKENS],
        "params": {k: sum(p.numel() for p in m.parameters()) for k, (m, _) in models.items()},
        "cpu_seconds": times,
        "median_cpu_seconds": medians,
        "ratio_multilinear_over_standard": medians["multilinear"] / medians["standard"],
        "standard_heads": spec["heads"],
    }
    log(f"{size}: multilinear {medians['multilinear']:.3f}s, standard {medians['standard']:.3f}s "
        f"CPU per update -> ratio {result['ratio_multilinear_over_standard']:.2f}")
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="JSON file to write (atomically)")
    parser.add_argument("--sizes", default="paper,cpu", help="comma-separated: paper, cpu")
    parser.add_argument("--reps", type=int, default=5, help="timed updates per model (default 5)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed updates first (default 1)")
    parser.add_argument("--norm", default="layer", help="--decoder-norm of both models")
    args = parser.parse_args(argv)
    commit = git_commit()  # the code this process runs, whatever HEAD is by the end
    sizes = args.sizes.split(",")
    unknown = set(sizes) - set(SIZES)
    if unknown:
        parser.error(f"--sizes: unknown {sorted(unknown)}; choose from {', '.join(SIZES)}")
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp)
        (data / "dict.txt").write_text("".join(f"w{i} 1\n" for i in range(VOCAB)))
        results = [measure(s, args.reps, args.warmup, args.norm, data) for s in sizes]
    atomic_write_json(args.out, {
        "argv": " ".join(
            ["python", "benchmarks/tensorized_speed.py", *(sys.argv[1:] if argv is None else argv)]
        ),
        "commit": commit,
        "hardware": hardware(),
        "threads": torch.get_num_threads(),
        "measure": "process CPU seconds of one update (forward, loss, backward, Adam step)",
        "results": results,
    })
    log(f"wrote {args.out}")


if __name__ == "__main__":
    main()
