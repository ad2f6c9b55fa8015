"""Shared helpers of the pipeline: atomic writes, done-markers, run records, subprocesses."""

from __future__ import annotations

import fcntl
import gzip
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

#: the plugin package (fairseq's --user-dir): wherever it is imported from, checkout or install
PLUGIN_DIR = Path(__file__).resolve().parents[1]
_UMASK = os.umask(0)
os.umask(_UMASK)


def log(msg: str) -> None:
    """Print one progress line to stderr at once (runs are long; buffering hides progress)."""
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; move it onto ``path`` only if the block succeeds.

    A reader therefore sees either the old file or the complete new one, never a half-written file
    (a killed process leaves only a ``.tmp*`` file, which the next run overwrites).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; give the file the usual permissions
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


@contextmanager
def directory_lock(path: str | os.PathLike) -> Iterator[None]:
    """Hold an exclusive ``flock`` on the directory ``path`` (created if missing) for the block:
    the read-modify-write of a file in it by several processes. Advisory, and no lock file is left
    behind (the lock is on the directory itself)."""
    Path(path).mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the lock


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``path`` atomically (see :func:`atomic_path`)."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def atomic_write_lines(path: str | os.PathLike, lines: Iterable[str]) -> int:
    """Write one line per item atomically; returns the number of lines written."""
    n = 0
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        for line in lines:
            f.write(line.rstrip("\n") + "\n")
            n += 1
    return n


def atomic_write_json(path: str | os.PathLike, obj) -> None:
    """Write ``obj`` as indented JSON atomically."""
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def decode_utf8(data: bytes, name: str | os.PathLike) -> str:
    """``data`` decoded as UTF-8; on bad bytes a ``SystemExit`` naming ``name`` and the line.

    Every corpus file is read through here, so a file in another encoding (Latin-1, UTF-16) is
    reported as "file F, line N" instead of a bare ``UnicodeDecodeError`` from inside a step.
    """
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        bad = data[e.start:e.end]
        raise SystemExit(
            f"{name}, line {line}: not UTF-8 (byte {bad!r} at offset {e.start}). The corpus files "
            "must be UTF-8: convert the file, e.g. `iconv -f latin1 -t utf-8`, and rerun.") from e


def read_lines(path: str | os.PathLike) -> list[str]:
    """Read a UTF-8 text file (``.gz`` transparently) as a list of lines without newlines.

    Raises:
        SystemExit: the file is not UTF-8 (the message names the file and line).
    """
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rt", encoding="utf-8") as f:
            return [line.rstrip("\r\n") for line in f]
    except UnicodeDecodeError:
        with opener(path, "rb") as f:
            decode_utf8(f.read(), path)  # raises, naming the line
        raise


class Steps:
    """Idempotent steps with done-markers in ``<out_dir>/.done/<name>``, run in order.

    A step is skipped when its marker exists, records the same ``key`` (the step's settings, e.g.
    the BPE size), all its declared outputs exist, and no earlier step ran in this invocation
    (a redone step invalidates everything after it, as in make). The marker is written only after
    the step function returned, i.e. after its outputs are in place (each step writes its outputs
    atomically), so an interrupted step has no marker and is redone.
    """

    def __init__(self, out_dir: str | os.PathLike):
        self.out_dir = Path(out_dir)
        self.marker_dir = self.out_dir / ".done"
        self.ran: list[str] = []
        self.skipped: list[str] = []

    def run(self, name: str, fn: Callable[[], object], outputs: Iterable[str | os.PathLike] = (),
            key=None):
        """Run ``fn`` unless already done; returns its result (stored in the marker)."""
        marker = self.marker_dir / name
        outputs = [Path(p) for p in outputs]
        if not self.ran and marker.exists() and all(p.exists() for p in outputs):
            done = json.loads(marker.read_text() or "{}")
            if isinstance(done, dict) and done.get("key") == key and "result" in done:
                log(f"step {name}: done before, skipped")
                self.skipped.append(name)
                return done["result"]
        if marker.exists():
            marker.unlink()
        log(f"step {name}: running")
        t0 = time.time()
        result = fn()
        missing = [str(p) for p in outputs if not p.exists()]
        if missing:
            raise RuntimeError(f"step {name} finished but did not produce {missing}")
        self.marker_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(marker, json.dumps({"key": key, "result": result}))
        log(f"step {name}: done in {time.time() - t0:.1f}s")
        self.ran.append(name)
        return result


def run_cmd(cmd: list[str], *, log_file: str | os.PathLike | None = None, env: dict | None = None,
            echo: Callable[[str], None] | None = None) -> str:
    """Run ``cmd``; return its combined stdout/stderr; raise ``SystemExit`` naming it on failure.

    Args:
        log_file: if given, the output is also appended there (a run's full log survives).
        echo: called with each output line while the command runs (progress streaming).
    """
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=subprocess_env(env), preexec_fn=die_with_parent)
    out_lines = []
    logf = open(log_file, "a", encoding="utf-8") if log_file else None
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            out_lines.append(line)
            if logf:
                logf.write(line)
                logf.flush()
            if echo:
                echo(line.rstrip("\n"))
        rc = proc.wait()
    finally:
        if logf:
            logf.close()
    output = "".join(out_lines)
    if rc != 0:
        tail = "".join(out_lines[-30:])
        raise SystemExit(f"command failed (exit {rc}): {' '.join(cmd)}\n--- last lines ---\n{tail}")
    return output


def die_with_parent() -> None:
    """In a child (Linux): get SIGKILL when the parent dies, so no orphan keeps writing outputs
    (a checkpoint, a half-built data directory) after the pipeline was killed; elsewhere a no-op."""
    if sys.platform.startswith("linux"):
        import ctypes

        PR_SET_PDEATHSIG = 1
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def subprocess_env(extra: dict | None = None) -> dict:
    """The environment for child processes: this one, with the directory this package was
    imported from first on ``PYTHONPATH``.

    Children run ``python -m powernorm_fairseq...`` from the caller's working directory (so relative
    paths on the command line keep their meaning), and they must run the same copy of the code as
    their parent: a checkout used with ``PYTHONPATH`` (or ``python -m`` from its root) while another
    copy is installed would otherwise train with the installed one.
    """
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(PLUGIN_DIR.parent), env.get("PYTHONPATH")) if p)
    env.update(extra or {})
    return env




def stage_command(script: str, console: str) -> str:
    """How the user runs a stage, for a message: the checkout's ``script`` (``scripts/...``)
    where this package runs from a checkout, else the installed ``console`` script (an installed
    wheel has no ``scripts/``)."""
    checkout = PLUGIN_DIR.parent
    return script if (checkout / "scripts").is_dir() and (checkout / "pyproject.toml").is_file() else console

def hydra_quote(value) -> str:
    """``value`` as a quoted hydra override value: a path with a comma, a space, brackets or an
    equals sign is one string, not a list or a sweep (``task.data='/a,b/data-bin'``)."""
    text = str(value).replace("\\", "\\\\").replace("'", "\\'")
    return f"'{text}'"

def git(path: str | os.PathLike, *args: str) -> str:
    """``git -C path ARGS``'s stripped stdout; a failure is a CalledProcessError (no git at all:
    FileNotFoundError)."""
    return subprocess.run(["git", "-C", os.fspath(path), *args], capture_output=True,
                          text=True, check=True).stdout.strip()


def checkout_top(path: str | os.PathLike) -> Path | None:
    """The top directory (resolved) of the git checkout holding ``path``, or None outside one."""
    try:
        return Path(git(path, "rev-parse", "--show-toplevel")).resolve()
    except (subprocess.CalledProcessError, FileNotFoundError, NotADirectoryError):
        return None


def checkout_commit(path: str | os.PathLike, exclude: Iterable[str] = ()) -> str | None:
    """The HEAD commit of the git checkout at ``path``, ``+dirty`` appended when its tracked files
    differ from HEAD (untracked files and the top-level paths in ``exclude`` do not count), or
    None outside a git checkout."""
    try:
        dirty = git(path, "status", "--porcelain", "--untracked-files=no", "--", ":/",
                    *(f":(top,exclude){e}" for e in exclude))
        return git(path, "rev-parse", "HEAD") + ("+dirty" if dirty else "")
    except (subprocess.CalledProcessError, FileNotFoundError, NotADirectoryError):
        return None


def git_commit() -> str | None:
    """The HEAD commit of the git checkout this package runs from, or None (an installed wheel).

    ``+dirty`` is appended when tracked code differs from HEAD. Untracked files (a ``.venv``
    link, prepared data) and ``results/`` (the run records a reproduction rewrites as it goes)
    do not count: they cannot change what a run computes.
    """
    if checkout_top(PLUGIN_DIR) != PLUGIN_DIR.parent:  # an installed wheel, or inside some other repository
        return None
    return checkout_commit(PLUGIN_DIR, exclude=("results",))


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``; ``platform.processor()`` elsewhere)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def hardware(threads: int | None = None) -> dict:
    """What a run ran on, for its record: CPU model, cores, the threads it used (``threads``, else
    ``OMP_NUM_THREADS``), platform, python, torch and GPUs (``gpu`` is None on a CPU-only run)."""
    info = {"cpu": cpu_model(), "cores": os.cpu_count(),
            "threads": threads or int(os.environ.get("OMP_NUM_THREADS") or 0) or None,
            "platform": platform.platform(), "python": platform.python_version(), "gpu": None}
    try:
        import torch

        info["torch"] = torch.__version__
        if torch.cuda.is_available():
            info["gpu"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    except ImportError:
        pass
    return info


def invocation(module: str, argv: list[str] | None) -> str:
    """The command line that reproduces a run: ``python -m module ARGS`` (for run records)."""
    args = sys.argv[1:] if argv is None else argv
    return " ".join(["python", "-m", module, *args])


def python_module_cmd(module: str) -> list[str]:
    """``[python, -m, module]`` with the interpreter running this code (the project's venv)."""
    return [sys.executable, "-m", module]


def import_plugin() -> None:
    """Register the plugin's models with fairseq, as ``--user-dir`` would.

    fairseq's ``import_user_module`` does nothing for a package that is already imported, and any
    process running this pipeline has imported ``powernorm_fairseq`` (the pipeline lives inside it),
    so its ``models/`` would never be registered. Importing them here is idempotent.
    """
    from fairseq.models import import_models

    import_models(str(PLUGIN_DIR / "models"), "powernorm_fairseq.models")
