"""The runtime shims of the two trainers (the released program under today's torch; float64
training for both, each a no-op in float32), and what both sides share: paths, dtypes, records."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
PRESETS = {"power": "iwslt14_pn", "batch": "iwslt14_bn", "layer": "iwslt14_ln"}
RELEASED_ARCH = "transformer_iwslt_de_en_v2"
NORM_BUFFERS = ("running_phi", "ema_gz", "iters", "running_mean", "running_var",
                "num_batches_tracked", "num_unstable")
#: PN step counter set for the post-warmup forward/backward (past every site's warmup).
POST_WARMUP_ITERS = 10**6
DTYPES = {"float32": torch.float32, "float64": torch.float64}
SITE_ATTRS = ("self_attn_layer_norm", "encoder_attn_layer_norm", "final_layer_norm", "layer_norm")

#: Runtime shims applied in the released program's process only (name: why).
RELEASED_SHIMS = {
    "numpy.float": "numpy >= 1.24 removed the alias np.float that fairseq 0.8's "
                   "indexed_dataset.py uses in its dtype table; set to the builtin float",
    "torch.load weights_only=False": "torch >= 2.6 loads with weights_only=True by default; "
                                     "fairseq 0.8 checkpoints pickle an argparse Namespace",
    "autograd ctx.saved_variables": "removed from torch; MaskPowerNorm's backward reads it, "
                                    "aliased to ctx.saved_tensors (same tensors)",
    "integer Tensor.div_ (averaging only)": "torch < 1.5 divided integer tensors in place with "
                                            "floor division, torch 2 raises; the released "
                                            "average_checkpoints.py divides every tensor, "
                                            "counters included",
}


#: Runtime shims of the float64 comparison (name: why). Each one acts on float64 tensors only and
#: leaves every float32 computation as it was; both processes list the ones they applied.
FLOAT64_SHIMS = {
    "softmax/log_softmax keep float64 (both programs)":
        "fairseq 0.8's and 0.12's utils.softmax/log_softmax pass dtype=torch.float32 (fp16 "
        "safety), which would compute the output log-probabilities of a float64 model in "
        "float32; for float64 inputs they compute in float64, other inputs take the original",
    "float64 gradient norm (ours)":
        "fairseq 0.12's utils.clip_grad_norm_ takes every per-tensor norm with "
        "dtype=torch.float32, which torch refuses for float64 gradients; for float64 gradients "
        "the norm is sqrt(sum_p ||g_p||^2) in float64 (clipping as fairseq's), other gradients "
        "take the original",
    "Adam in the parameters' dtype (released)":
        "fairseq 0.8's Adam.step works on p.grad.float() and p.data.float() and copies back, i.e. "
        "in float32 for float64 parameters; during its step Tensor.float() returns a float64 "
        "tensor unchanged (for float32 tensors .float() is the identity anyway)",
}


def _dump(obj, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _load(path: Path):
    return torch.load(path, map_location="cpu", weights_only=False)


def _norm_buffers(model) -> dict:
    out = {}
    for name, buf in model.named_buffers():
        parts = name.rsplit(".", 2)
        if len(parts) == 3 and parts[-1] in NORM_BUFFERS and parts[-2] in SITE_ATTRS:
            out[name] = buf.detach().clone()
    return out


def _batches(path: Path) -> list[dict]:
    return _load(path)


def apply_released_shims(released: Path) -> list[str]:
    """Patch what fairseq 0.8 needs (see ``RELEASED_SHIMS``) in a worker whose ``PYTHONPATH``
    starts with ``released`` (``_run_worker``); returns the shim names."""
    import importlib.util

    import numpy as np

    found = importlib.util.find_spec("fairseq")  # where `import fairseq` will come from, unrun
    if found is None or not Path(found.origin).resolve().is_relative_to(released.resolve()):
        raise SystemExit(f"the released worker would import fairseq from {found and found.origin}, "
                         f"not from {released}: start it through _run_worker (PYTHONPATH={released})")
    if not hasattr(np, "float") or np.float is not float:  # numpy >= 1.24
        np.float = float
    load = torch.load

    def load_full(*args, **kwargs):
        kwargs.setdefault("weights_only", False)
        return load(*args, **kwargs)

    torch.load = load_full
    from torch.autograd.function import BackwardCFunction

    if not hasattr(BackwardCFunction, "saved_variables"):
        BackwardCFunction.saved_variables = property(lambda ctx: ctx.saved_tensors)
    import fairseq

    if Path(fairseq.__file__).resolve().parents[1] != released.resolve():
        raise SystemExit(f"--released {released}: imported fairseq from {fairseq.__file__}, not "
                         "from the released checkout")
    return list(RELEASED_SHIMS)


def softmax_keeping_float64(original, torch_fn):
    """``fairseq.utils.softmax``/``log_softmax`` (``original``) that computes a float64 ``x``
    in float64 with ``torch_fn`` (``F.softmax``/``F.log_softmax``) instead of float32."""

    def softmax(x, dim, onnx_trace=False):
        if x.dtype == torch.float64:
            return torch_fn(x, dim=dim)
        return original(x, dim, onnx_trace=onnx_trace)

    return softmax


def clip_grad_norm_any_dtype(original):
    """fairseq 0.12's ``utils.clip_grad_norm_`` (``original``) extended to float64 gradients.

    For float64 gradients ``g_p``: ``total = sqrt(sum_p ||g_p||_2^2)`` in float64, then, when
    ``max_norm > 0``, every gradient is scaled by ``min(1, max_norm / (total + 1e-6))`` (fairseq's
    clipping). Any other gradients go to ``original`` unchanged. Returns ``total`` (0-dim tensor).
    """

    @torch.no_grad()
    def clip_grad_norm_(params, max_norm, aggregate_norm_fn=None):
        params = [params] if isinstance(params, torch.Tensor) else list(params)
        grads = [p.grad.detach() for p in params
                 if p is not None and getattr(p, "grad", None) is not None]
        if not grads or any(g.dtype != torch.float64 for g in grads):
            return original(params, max_norm, aggregate_norm_fn)
        total = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
        if aggregate_norm_fn is not None:
            total = aggregate_norm_fn(total)
        if max_norm > 0:
            torch._foreach_mul_(grads, (float(max_norm) / (total + 1e-6)).clamp_(max=1))
        return total

    return clip_grad_norm_


@contextlib.contextmanager
def float_keeps_float64():
    """``Tensor.float()`` returns a float64 tensor itself (not a float32 copy) inside the block."""
    own = "float" in torch.Tensor.__dict__
    original = torch.Tensor.float

    def float_(self, *args, **kwargs):
        if self.dtype == torch.float64 and not args and not kwargs:
            return self
        return original(self, *args, **kwargs)

    torch.Tensor.float = float_
    try:
        yield
    finally:
        if own:
            torch.Tensor.float = original
        else:
            del torch.Tensor.float


def step_in_param_dtype(step):
    """An optimizer ``step`` run under :func:`float_keeps_float64`."""

    def wrapped(self, closure=None):
        with float_keeps_float64():
            return step(self, closure)

    return wrapped


def apply_float64_shims(side: str) -> list[str]:
    """Apply ``FLOAT64_SHIMS`` to the ``fairseq`` imported in this process (``side``: ``ours``
    or ``released``); returns the names applied."""
    import torch.nn.functional as F
    from fairseq import utils

    utils.softmax = softmax_keeping_float64(utils.softmax, F.softmax)
    utils.log_softmax = softmax_keeping_float64(utils.log_softmax, F.log_softmax)
    names = ["softmax/log_softmax keep float64 (both programs)"]
    if side == "ours":
        utils.clip_grad_norm_ = clip_grad_norm_any_dtype(utils.clip_grad_norm_)
        names.append("float64 gradient norm (ours)")
    else:
        from fairseq.optim import adam

        adam.Adam.step = step_in_param_dtype(adam.Adam.step)
        names.append("Adam in the parameters' dtype (released)")
    return names


@contextlib.contextmanager
def legacy_integer_div():
    """Integer ``Tensor.div_`` as floor division (torch < 1.5), for the released averaging."""
    div_ = torch.Tensor.div_

    def floor_div_(self, other, *args, **kwargs):
        if not (self.is_floating_point() or self.is_complex()) and not args and not kwargs:
            return self.floor_divide_(other)
        return div_(self, other, *args, **kwargs)

    torch.Tensor.div_ = floor_div_
    try:
        yield
    finally:
        torch.Tensor.div_ = div_

