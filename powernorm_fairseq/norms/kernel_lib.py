"""Building, loading and calling the fused CPU kernels (``kernels/``): the compiler call, the
cache, the ctypes signatures and the switch that turns them off. :mod:`.fused` holds the Python
entry points the norms call; see its docstring for what the kernels compute.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
import warnings
from pathlib import Path

import torch
from torch import Tensor

_SRC_DIR = Path(__file__).resolve().parent / "kernels"
_SOURCES = ("pn_kernels.c", "pn_kernels_impl.h")
_ABI_VERSION = 9

_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
_funcs: dict[tuple[str, torch.dtype], ctypes._CFuncPtr] = {}  # (name, dtype) -> C function
_load_failed = False
_enabled = os.environ.get("PN_FUSED_KERNELS", "1").strip().lower() not in ("0", "false", "no",
                                                                           "off")

_F = ctypes.c_void_p  # every pointer argument is passed as an address (or None)
_SIGNATURES = {
    "pn_colstats": [_F, _F, _F, ctypes.c_int64, ctypes.c_int64, _F, _F, _F, ctypes.c_int],
    "pn_affine_colstats": [_F, _F, _F, _F, ctypes.c_int64, ctypes.c_int64, _F, _F,
                           ctypes.c_int],
    "pn_bwd_sums": [_F, _F, _F, ctypes.c_int64, ctypes.c_int64, _F, _F, _F, ctypes.c_int],
    "pn_bwd_apply": [_F, _F, _F, _F, _F, _F, _F, ctypes.c_int64, ctypes.c_int64, _F, _F, _F, _F,
                     ctypes.c_int],
    "pn_group_rms_fwd": [_F, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64, ctypes.c_double, _F,
                         _F, ctypes.c_int],
    "pn_group_rms_bwd": [_F, _F, _F, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64, _F,
                         ctypes.c_int],
    "pn_grms_colstats": [_F, _F, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64, ctypes.c_double,
                         _F, _F, _F, ctypes.c_int],
    "pn_grms_affine": [_F, _F, _F, _F, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64, _F,
                       ctypes.c_int],
    "pn_grms_bwd": [_F, _F, _F, _F, _F, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64, _F, _F, _F,
                    ctypes.c_int],
    "pn_paper_fwd": [_F, _F, _F, _F, _F, ctypes.c_int64, ctypes.c_int64, ctypes.c_double,
                     ctypes.c_double, ctypes.c_double, _F, _F, _F, _F, _F, ctypes.c_int],
    "pn_paper_bwd": [_F, _F, _F, _F, _F, _F, _F, _F, ctypes.c_int64, ctypes.c_int64,
                     ctypes.c_double, ctypes.c_int, _F, _F, _F, ctypes.c_int],
    "pn_ref_fwd_stats": [_F, _F, ctypes.c_int64, ctypes.c_int64, _F, _F, _F, ctypes.c_int64,
                         ctypes.c_int64, ctypes.c_double, ctypes.c_double, ctypes.c_double, _F,
                         _F, _F, _F, _F],
    "pn_ref_grms_fwd": [_F, _F, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64, ctypes.c_double,
                        _F, _F, _F, _F, ctypes.c_int64, ctypes.c_int64, ctypes.c_double,
                        ctypes.c_double, ctypes.c_double, _F, _F, _F, _F, _F, _F, _F, _F, _F,
                        ctypes.c_int],
    "pn_ref_bwd_coef": [_F, _F, _F, _F, ctypes.c_int64, ctypes.c_double, _F, _F],
    "pn_ref_bwd_finish": [_F, _F, _F, _F, _F, _F, ctypes.c_int64, ctypes.c_double, _F, _F, _F],
    "pn_ref_grms_backward": [_F, _F, _F, _F, _F, _F, _F, _F, _F, _F, ctypes.c_int64, ctypes.c_int64,
                             ctypes.c_int64, ctypes.c_double, _F, _F, _F, _F, ctypes.c_int],
    "pn_dyt_bwd": [_F, _F, _F, _F, _F, ctypes.c_int64, ctypes.c_int64, _F, _F, _F, _F, ctypes.c_int],
    "pn_batch_fwd_stats": [_F, _F, ctypes.c_int64, ctypes.c_int64, ctypes.c_int, ctypes.c_double,
                           _F, _F, _F, _F, _F, _F, _F, _F, _F, _F, _F, _F, ctypes.c_double,
                           ctypes.c_double, ctypes.c_int],
    "pn_batch_bwd": [_F, _F, _F, _F, _F, _F, _F, _F, _F, ctypes.c_int64, ctypes.c_int64,
                     ctypes.c_double, ctypes.c_int, _F, _F, _F, ctypes.c_int],
}
_SUFFIX = {torch.float32: "f32", torch.float64: "f64"}
# kernels built for float32 only (their float64 path stays eager)
_F32_ONLY = {"pn_dyt_fwd": [_F, _F, _F, _F, ctypes.c_int64, ctypes.c_int64, _F, _F, ctypes.c_int]}


def set_enabled(flag: bool) -> bool:
    """Use the fused kernels (True) or the eager torch path (False); returns the old setting."""
    global _enabled
    old, _enabled = _enabled, bool(flag)
    return old


def cache_dir() -> Path:
    return Path(os.environ.get("PN_KERNEL_CACHE",
                               Path.home() / ".cache" / "powernorm-fairseq" / "kernels"))


def _cpu_flags() -> str:
    """The CPU's feature flags (Linux), part of the cache key of the ``-march=native`` build."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor()


def _build(target: Path) -> None:
    """Compile the kernels into ``target`` (temp file in the same folder, then rename)."""
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        raise RuntimeError("no C compiler (set CC, or install gcc)")
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        base = [cc, "-O3", "-fopenmp", "-fPIC", "-shared", "-o", tmp,
                str(_SRC_DIR / "pn_kernels.c")]
        # -march=native: the sums are compute-bound without wide vectors; the cache key holds
        # this CPU's feature flags, so the binary is only reused on a CPU that can run it
        for cmd in (base[:2] + ["-march=native"] + base[2:], base):
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode == 0:
                break
        if proc.returncode:
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-2000:]}")
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _load() -> ctypes.CDLL | None:
    global _lib, _load_failed
    if _lib is not None or _load_failed:
        return _lib
    with _lock:
        if _lib is not None or _load_failed:
            return _lib
        try:
            digest = hashlib.sha256()
            for name in _SOURCES:
                digest.update((_SRC_DIR / name).read_bytes())
            digest.update(platform.machine().encode())
            digest.update(_cpu_flags().encode())
            target = cache_dir() / f"pn_kernels_{digest.hexdigest()[:16]}.so"
            if not target.exists():
                _build(target)
            lib = ctypes.CDLL(str(target))
            if lib.pn_abi_version() != _ABI_VERSION:
                raise RuntimeError(f"{target} has ABI {lib.pn_abi_version()}, "
                                   f"expected {_ABI_VERSION}; delete it")
            for name, argtypes, dtypes in [*((n, a, _SUFFIX) for n, a in _SIGNATURES.items()),
                                           *((n, a, {torch.float32: "f32"}) for n, a in _F32_ONLY.items())]:
                for dtype, suffix in dtypes.items():
                    fn = getattr(lib, f"{name}_{suffix}")
                    fn.argtypes, fn.restype = argtypes, ctypes.c_int
                    _funcs[name, dtype] = fn
            _lib = lib
        except Exception as err:  # noqa: BLE001 - any failure means: run eagerly
            _load_failed = True
            warnings.warn(f"powernorm_fairseq: fused CPU kernels unavailable ({err}); using the "
                          "eager torch path (same results, slower). Set PN_FUSED_KERNELS=0 to "
                          "silence this.", RuntimeWarning, stacklevel=3)
    return _lib


def available() -> bool:
    """Whether the kernels are enabled and could be built/loaded on this machine."""
    return _enabled and _load() is not None


def usable(*tensors: Tensor | None) -> bool:
    """True when the fused path applies: enabled, built, not being traced (``torch.compile``,
    ``torch.jit.trace``: a graph cannot record a ``ctypes`` call), and every given tensor is a
    CPU tensor of one dtype, float32 or float64 (None entries are ignored)."""
    if (not _enabled or torch.compiler.is_compiling() or torch.jit.is_tracing()
            or (_lib is None and _load() is None)):
        return False
    dtype = None
    for t in tensors:
        if t is None:
            continue
        if dtype is None:
            dtype = t.dtype
            if dtype not in _SUFFIX:
                return False
        if not t.is_cpu or t.dtype is not dtype:
            return False
    return dtype is not None


def _fn(name: str, dtype: torch.dtype):
    fn = _funcs.get((name, dtype))
    if fn is None:
        if _load() is None:
            raise RuntimeError("powernorm_fairseq fused CPU kernels are unavailable; check "
                               "fused.usable(...) first")
        fn = _funcs[name, dtype]
    return fn


def _ptr(t: Tensor | None):
    return None if t is None else t.data_ptr()


def _c(t: Tensor | None) -> Tensor | None:
    return None if t is None else t.contiguous()


def _sums(n: int, want: bool, like: Tensor) -> Tensor | None:  # a (C,) output if wanted
    return like.new_empty(n) if want else None


def _check(rc: int) -> None:
    if rc:
        raise MemoryError("powernorm_fairseq fused kernel could not allocate its scratch memory")


def _outputs(like: Tensor, *lengths: int) -> tuple[tuple[Tensor, ...], list[int]]:
    """Consecutive output vectors of ``lengths`` elements (``like``'s dtype and device) in one
    buffer, and the address of each, for a kernel's ``(C,)`` and scalar outputs (the addresses
    by arithmetic: a view's ``data_ptr`` costs a call each, ``Tensor.split`` a Python wrapper)."""
    buf = like.new_empty(sum(lengths))
    base, size, at, offset = buf.data_ptr(), buf.element_size(), [], 0
    for n in lengths:
        at.append(base + offset * size)
        offset += n
    return buf.split_with_sizes(lengths), at
