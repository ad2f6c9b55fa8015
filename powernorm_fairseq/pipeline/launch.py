"""Launch the ranks of one training and complete its launch record: N CPU workers (gloo) on this
machine, or one process (one GPU or the CPU, torchrun's and SLURM's ranks); each rank's output
kept, the ranks' parameters checked equal at the end (one model)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from pathlib import Path

from powernorm_fairseq.pipeline.common import (
    atomic_write_json,
    atomic_write_text,
    die_with_parent,
    log,
    python_module_cmd,
    subprocess_env,
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _distributed_args(mode: str, world: int, rank: int, port: int) -> list[str]:
    if mode == "flags":
        return ["--distributed-backend", "gloo", "--distributed-init-method",
                f"tcp://127.0.0.1:{port}", "--distributed-world-size", str(world),
                "--distributed-rank", str(rank), "--distributed-no-spawn",
                "--ddp-backend", "legacy_ddp"]
    d = "distributed_training."
    return [f"{d}distributed_backend=gloo", f"{d}distributed_init_method=tcp://127.0.0.1:{port}",
            f"{d}distributed_world_size={world}", f"{d}distributed_rank={rank}",
            f"{d}distributed_no_spawn=true", f"{d}ddp_backend=legacy_ddp"]


def _stream(procs: list[subprocess.Popen], log_path: Path, echo, grace_s: float = 30.0) -> list[int]:
    """Copy rank 0's output to the log (and ``echo``); wait for all ranks; kill all if one fails.

    When a rank fails, the others get ``grace_s`` seconds to exit on their own before they are
    terminated: a rank that fails for its own reason at the same moment (a bad flag fails every
    rank) then writes that reason to its log, instead of being killed mid-report.
    On Ctrl-C (KeyboardInterrupt) the ranks are interrupted too and given 30 s to exit (their
    checkpoint writes are atomic), then the KeyboardInterrupt propagates.
    """
    with open(log_path, "a", encoding="utf-8") as logf:
        assert procs[0].stdout is not None
        try:
            for line in procs[0].stdout:
                logf.write(line)
                logf.flush()
                echo(line.rstrip("\n"))
        except KeyboardInterrupt:
            for p in procs:  # a terminal's Ctrl-C reached them already; `kill -INT` did not
                if p.poll() is None:
                    p.send_signal(signal.SIGINT)
            for p in procs:
                try:
                    p.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
            raise
    deadline = None
    while any(p.poll() is None for p in procs):
        if deadline is None and any(p.returncode for p in procs):
            deadline = time.monotonic() + grace_s
        if deadline is not None and time.monotonic() > deadline:
            for p in procs:
                if p.poll() is None:
                    p.send_signal(signal.SIGTERM)
            for p in procs:
                p.wait()
            break
        time.sleep(0.05)
    return [p.returncode for p in procs]


def _launch(args, how: str, world: int, entry: str, base: list[str], record: dict,
            launch_env: dict, echo) -> dict:
    """Run the ranks of :func:`train` and complete its launch record."""
    mode = "flags" if entry == "train" else "preset"
    log_path = args.save_dir / "train.log"
    t0 = time.time()
    digest_dir = args.save_dir / "rank_digests"
    if how == "cpu-workers" and world > 1:
        port = args.port or _free_port()
        procs, rank_logs = [], {}
        for rank in range(world):
            cmd = python_module_cmd("powernorm_fairseq.pipeline.rank") + [
                "--param-digest", str(digest_dir / f"rank{rank}.json"), entry,
                *base, *_distributed_args(mode, world, rank, port)]
            # rank 0 streams into train.log; every other rank keeps its own log beside it
            # (appended: a resume adds to it), so a failing worker's error is never lost
            if rank:
                rank_logs[rank] = args.save_dir / f"train.rank{rank}.log"
            out = open(rank_logs[rank], "a") if rank else subprocess.PIPE  # noqa: SIM115 (closed below)
            procs.append(subprocess.Popen(
                cmd, text=True, preexec_fn=die_with_parent, stdout=out, stderr=subprocess.STDOUT,
                # N ranks share the cores: one thread each unless the caller says otherwise
                env=subprocess_env({"OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
                                    **launch_env})))
            if rank:
                out.close()  # the child holds its own descriptor
        codes = _stream(procs, log_path, echo)
        if any(codes):
            raise SystemExit(f"training failed: rank exit codes {codes}; see {log_path}"
                             + _failed_rank_tails(codes, log_path, rank_logs))
        record["rank_check"] = check_rank_digests(digest_dir, world)
    else:
        extra = []
        if how == "slurm":
            extra = [f"--distributed-port={args.port}" if mode == "flags"
                     else f"distributed_training.distributed_port={args.port}"]
        cmd = python_module_cmd("powernorm_fairseq.pipeline.rank") + [entry, *base, *extra]
        proc = subprocess.Popen(cmd, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                env=subprocess_env(launch_env), preexec_fn=die_with_parent)
        codes = _stream([proc], log_path, echo)
        if codes[0]:
            raise SystemExit(f"training failed (exit {codes[0]}); see {log_path}")
    hydra_cfg = args.save_dir / "hydra" / ".hydra" / "config.yaml"
    if mode == "preset" and hydra_cfg.exists():
        atomic_write_text(args.save_dir / "config.yaml", hydra_cfg.read_text())
    record["wall_s"] = round(time.time() - t0, 1)
    atomic_write_json(args.save_dir / "launch.json", record)
    return record


def _failed_rank_tails(codes: list[int], log_path: Path, rank_logs: dict[int, Path], lines: int = 12) -> str:
    """The last lines of each failed rank's log, for the failure message: a worker that dies
    leaves the others with gloo's "Connection closed by peer", which names no cause."""
    out = []
    for rank, code in enumerate(codes):
        if code:
            path = rank_logs.get(rank, log_path)
            text = path.read_text(errors="replace").splitlines()[-lines:] if path.is_file() else []
            out.append(f"\n--- rank {rank} (exit {code}), the end of {path}:\n" + "\n".join(text))
    return "".join(out)


def check_rank_digests(digest_dir: Path, world: int) -> dict:
    """All ranks must end with bit-identical parameters (data parallel = one model)."""
    import json

    digests = []
    for rank in range(world):
        path = digest_dir / f"rank{rank}.json"
        if not path.exists():
            raise SystemExit(f"rank {rank} wrote no parameter digest ({path})")
        digests.append(json.loads(path.read_text()))
    worlds = {d["world_size"] for d in digests}
    if worlds != {world}:
        raise SystemExit(f"ranks report world sizes {worlds}, expected {world}")
    if len({d["params"] for d in digests}) != 1:
        raise SystemExit(f"ranks ended with different parameters: {[d['params'][:12] for d in digests]}; "
                         "the gradients were not synchronized")
    differing = sorted(k for k in digests[0]["buffers"]
                       if len({d["buffers"].get(k) for d in digests}) > 1)
    log(f"rank check: {world} ranks, identical parameters after {digests[0]['num_updates']} updates"
        + (f"; {len(differing)} per-rank buffers differ (running statistics)" if differing else ""))
    return {"world_size": world, "params_sha256": digests[0]["params"],
            "num_updates": digests[0]["num_updates"], "buffers_differing": differing}

