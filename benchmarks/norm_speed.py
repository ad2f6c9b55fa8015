"""Forward+backward speed and peak memory of every registered norm, relative to nn.LayerNorm.

For each shape ``(T, B, C)`` and padding fraction, every norm (PN in both variants, before and
after its warmup) and ``torch.nn.LayerNorm`` run one training step (forward, backward with a fixed
upstream gradient) in interleaved repetitions in the same process; the median time of each is
reported as a ratio to LayerNorm's. The ratio uses process CPU time (``time.process_time``), which
other load on a shared machine does not inflate; wall-clock medians are reported beside it. Peak
memory is the highest total of live CPU allocations above the step's starting point, from
``torch.profiler``'s memory events.

Usage::

    OMP_NUM_THREADS=1 python benchmarks/norm_speed.py --out results/norm_speed.json

With more than one thread, process CPU time also counts OpenMP workers spinning between ops (more
for the norms that run more ops), so read the wall-clock ratios of multi-thread runs. The fused CPU
kernels are used when available (``PN_FUSED_KERNELS=0`` measures the eager path), and glibc's
allocator is first put in its training-time state (:func:`warm_allocator`).

Issue #6 targets (64x64x512, ~30% padding): PN <= 1.5x LayerNorm, PN-V and BN <= 2x.

``--device cuda`` runs the same steps on the GPU (the norms' eager torch path; the fused kernels
are CPU-only): each step is timed in wall-clock time between ``torch.cuda.synchronize()`` calls
(process CPU time says nothing about GPU work, so ``ratio_to_layernorm`` is the wall ratio
there), and peak memory is ``torch.cuda.max_memory_allocated`` above the step's start.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from powernorm_fairseq.norms import build_norm, fused, norm_configs
from powernorm_fairseq.pipeline.common import git_commit, hardware

DEFAULT_SHAPES = ["64x64x512", "128x32x1024", "128x32x512"]  # the last: 4096 tokens
# (label, registry name, kwargs): every registered norm (and variant), PN inside ("before") and
# past ("after") its warmup (its default unit counts updates, which the benchmark never tells, so
# a warmup of 10**9 never ends and 0 is over from the start)
NORMS = [
    (f"{name}/{variant}/{phase}" if variant else name, name,
     {**({"variant": variant} if variant else {}), "warmup_updates": warm} if name == "power" else {})
    for name, variant in norm_configs()
    for phase, warm in ((("before", 10**9), ("after", 0)) if name == "power" else (("", 0),))
]


class EagerDyT(torch.nn.Module):
    """The eager ``weight * tanh(alpha * x) + bias`` the issue compares ``dyt`` with."""

    def __init__(self, c: int):
        super().__init__()
        self.alpha = torch.nn.Parameter(torch.full((1,), 0.5))
        self.weight, self.bias = torch.nn.Parameter(torch.ones(c)), torch.nn.Parameter(torch.zeros(c))

    def forward(self, x):
        return self.weight * torch.tanh(self.alpha * x) + self.bias


#: the torch modules the norms are measured against (every ratio is also given to LayerNorm)
REFERENCES = {"torch.nn.LayerNorm": torch.nn.LayerNorm, "torch.nn.RMSNorm": torch.nn.RMSNorm,
              "eager DyT": EagerDyT}


def padding_mask(T: int, B: int, fraction: float, gen: torch.Generator) -> torch.Tensor | None:
    """``(B, T)`` mask with right padding; sentence lengths spread so ~``fraction`` is padding."""
    if fraction <= 0:
        return None
    pad_len = (torch.rand(B, generator=gen) * 2 * fraction * T).round().long().clamp(max=T - 1)
    return torch.arange(T).unsqueeze(0) >= (T - pad_len).unsqueeze(1)


def train_step(norm, x, mask, grad_y):
    x.grad = None
    y = norm(x) if mask is None else norm(x, padding_mask=mask)
    y.backward(grad_y)


@contextlib.contextmanager
def _kineto_quiet():
    """Send file descriptor 2 to /dev/null while the profiler starts and stops.

    torch's profiler backend (kineto) writes "USDT: ... profiler_start/stop" lines straight to
    fd 2 for every profiled step (16 per shape here); no setting turns them off
    (``KINETO_LOG_LEVEL`` does not). Python's own ``sys.stderr`` is flushed first.
    """
    sys.stderr.flush()
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def peak_bytes(norm, x, mask, grad_y) -> int:
    """Peak of live CPU allocations during one training step above its start.

    From ``torch.profiler`` memory profiling: every allocation/free is attributed once, as the
    ``self_cpu_memory_usage`` of the innermost op (or a ``[memory]`` event); replayed in start-time
    order. Inputs, parameters and ``grad_y`` exist before the step and are not counted.
    """
    x.grad = None  # freeing it inside the window would be an unattributed event
    with _kineto_quiet(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        train_step(norm, x, mask, grad_y)
    deltas = sorted(
        (e.time_range.start, e.self_cpu_memory_usage)
        for e in prof.events()
        if e.self_cpu_memory_usage
    )
    live = peak = 0
    for _, delta in deltas:
        live += delta
        peak = max(peak, live)
    return peak


def cuda_peak_bytes(norm, x, mask, grad_y) -> int:
    """:func:`peak_bytes` on a CUDA device: ``torch.cuda.max_memory_allocated`` during one
    training step above the allocation at its start."""
    x.grad = None
    torch.cuda.synchronize()
    start = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    train_step(norm, x, mask, grad_y)
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - start


def bench_shape(T, B, C, fraction, reps, warmup, device="cpu"):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(T, B, C, generator=gen)
    grad_y = torch.randn(T, B, C, generator=gen)
    mask = padding_mask(T, B, fraction, gen)
    if mask is not None:
        grad_y[mask.t()] = 0.0  # pads are masked downstream in a transformer
        mask = mask.to(device)
    x, grad_y = x.to(device).requires_grad_(), grad_y.to(device)
    cuda = torch.device(device).type == "cuda"
    norms = {label: (make(C).to(device), None) for label, make in REFERENCES.items()}
    for label, name, kwargs in NORMS:
        norms[label] = (build_norm(name, C, **kwargs).to(device).train(), mask)
    for norm, m in norms.values():
        for _ in range(warmup):
            train_step(norm, x, m, grad_y)
    if cuda:
        torch.cuda.synchronize()
    cpu = {label: [] for label in norms}
    wall = {label: [] for label in norms}
    order = list(norms)
    for rep in range(reps):
        # a fresh order each repetition: the first step after another norm's pays for page
        # faults of memory that norm freed, which would otherwise always land on the same norm
        random.Random(rep).shuffle(order)
        for label in order:
            norm, m = norms[label]
            start_cpu, start_wall = time.process_time(), time.perf_counter()
            train_step(norm, x, m, grad_y)
            if cuda:
                torch.cuda.synchronize()
            cpu[label].append(time.process_time() - start_cpu)
            wall[label].append(time.perf_counter() - start_wall)
    if cuda:  # process CPU time does not measure GPU work: the ratio is the wall-clock one
        cpu = wall
    base_cpu = statistics.median(cpu["torch.nn.LayerNorm"])
    base_wall = statistics.median(wall["torch.nn.LayerNorm"])
    measure_peak = cuda_peak_bytes if cuda else peak_bytes
    rows = []
    for label, (norm, m) in norms.items():
        med_cpu, med_wall = statistics.median(cpu[label]), statistics.median(wall[label])
        rows.append(
            {
                "shape": f"{T}x{B}x{C}",
                "pad": fraction,
                "actual_pad": 0.0 if mask is None else round(mask.float().mean().item(), 3),
                "norm": label,
                "cpu_ms": round(med_cpu * 1e3, 3),
                "wall_ms": round(med_wall * 1e3, 3),
                "ratio_to_layernorm": round(med_cpu / base_cpu, 3),
                "wall_ratio_to_layernorm": round(med_wall / base_wall, 3),
                "device": str(x.device),
                "peak_mib": round(measure_peak(norm, x, m, grad_y) / 2**20, 2),
            }
        )
    return rows


def warm_allocator(mib: int = 31) -> None:
    """Put glibc's allocator in the state it reaches inside a training process.

    glibc serves a request of at least its mmap threshold (initially 128 KiB) with a fresh mmap,
    whose pages are faulted in on first touch (about 1 ms per 8 MiB here), and raises the
    threshold to the size of each mmapped block freed, up to 32 MiB. In training, activations
    larger than a norm's buffers are freed every step, so the norms' (N, C) buffers come from the
    heap without page faults. A benchmark that starts cold instead charges every norm per large
    allocation until some bigger block happens to be freed; allocating and freeing one 31 MiB
    block first gives every norm and LayerNorm the training-time state.
    """
    block = torch.empty(mib * 2**20 // 4, dtype=torch.float32)
    block.fill_(0.0)
    del block


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", nargs="+", default=DEFAULT_SHAPES, help="TxBxC shapes")
    parser.add_argument(
        "--pad", nargs="+", type=float, default=[0.0, 0.3], help="padding fractions"
    )
    parser.add_argument("--reps", type=int, default=30, help="timed repetitions per norm")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps per norm first")
    parser.add_argument("--out", type=Path, help="write the rows as JSON here")
    parser.add_argument(
        "--device", default="cpu",
        help="cpu (default) or cuda[:N]: where the norms and torch.nn.LayerNorm run",
    )
    parser.add_argument(
        "--cold-allocator", action="store_true",
        help="skip the allocator warm-up (see warm_allocator): every large buffer then costs "
        "fresh pages, which penalizes norms by their number of full-size temporaries",
    )
    args = parser.parse_args(argv)
    commit = git_commit()  # the code this process runs, whatever HEAD is by the end
    try:
        device = torch.device(args.device)
    except RuntimeError:
        raise SystemExit(f"--device must be cpu or cuda[:N], got {args.device!r}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--device {args.device}: no CUDA device here "
                         "(torch.cuda.is_available() is False); use --device cpu")
    if device.type not in ("cpu", "cuda"):
        raise SystemExit(f"--device must be cpu or cuda[:N], got {args.device!r}")
    if not args.cold_allocator:
        warm_allocator()
    try:
        shapes = [tuple(int(v) for v in s.lower().split("x")) for s in args.shapes]
    except ValueError:
        raise SystemExit(f"--shapes must look like 64x64x512, got {args.shapes}") from None
    if any(len(s) != 3 for s in shapes):
        raise SystemExit(f"--shapes must look like 64x64x512, got {args.shapes}")

    rows = []
    header = (
        f"{'shape':>12} {'pad':>5} {'norm':<24} {'cpu ms':>8} {'x LN':>6} {'wall ms':>8} "
        f"{'x LN':>6} {'peak MiB':>9}"
    )
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}, {platform.processor() or ''}"
        + (f", device {device} ({gpu})" if gpu else "")
    )
    print(header)
    print("-" * len(header))
    for T, B, C in shapes:
        for fraction in args.pad:
            for row in bench_shape(T, B, C, fraction, args.reps, args.warmup, device):
                rows.append(row)
                print(
                    f"{row['shape']:>12} {row['actual_pad']:>5.2f} {row['norm']:<24} "
                    f"{row['cpu_ms']:>8.2f} {row['ratio_to_layernorm']:>6.2f} "
                    f"{row['wall_ms']:>8.2f} {row['wall_ratio_to_layernorm']:>6.2f} "
                    f"{row['peak_mib']:>9.1f}",
                    flush=True,
                )
    if args.out:
        result = {
            "threads": torch.get_num_threads(),  # benchmarks/report.py picks its timer by it
            "hardware": hardware(torch.get_num_threads()),  # CPU model, cores, platform, torch
            "reps": args.reps,
            "timer": ("ratio: median process_time; wall: median perf_counter"
                      if gpu is None else
                      "ratio and wall: median perf_counter between torch.cuda.synchronize()"),
            "device": str(device),
            "gpu": gpu,
            "cuda": torch.version.cuda if gpu else None,
            "fused_kernels": fused.available() and gpu is None,
            "allocator_warmup": not args.cold_allocator,
            "commit": commit,
            "argv": sys.argv,
            "loadavg_after": os.getloadavg(),
            "rows": rows,
        }
        args.out.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(
            "w", dir=args.out.parent, delete=False, suffix=".tmp"
        ) as tmp:
            json.dump(result, tmp, indent=1)
        os.replace(tmp.name, args.out)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
