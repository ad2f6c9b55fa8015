"""State and input handling shared by every norm family.

:class:`MaskedNorm` owns what is common (torch's ``_NormBase`` pattern): the affine parameters,
the running buffers' reset, ``extra_repr``, state-dict versioning, input/mask validation and the
``(T, B, C)`` / ``(N, C)`` plumbing, plus float32 statistics under half precision and autocast.
Subclasses implement only :meth:`MaskedNorm._normalize` on a ``(N, C)`` view.

It also makes the stateful norms safe under activation checkpointing and ``torch.compile``
(see :meth:`MaskedNorm.forward`).
"""

from __future__ import annotations

import collections
import contextlib
import warnings

import torch
from torch import Tensor, nn

from .defaults import EPS, GROUP_NUM_AUTO, GROUP_NUM_HEADS, UNTOLD_WARN_AFTER
from .distributed import sync_enabled
from .functional import keep_vector

_FULL_PRECISION = (torch.float32, torch.float64)
_NO_CONTEXT = contextlib.nullcontext()  # reusable and reentrant


def _may_be_recomputed() -> bool:
    """Whether a training forward running now may be recomputed in the backward, so that the
    norm must keep a snapshot of its state (the one place that tells; torch has no public API):
    under reentrant checkpointing (``torch.utils.checkpoint(use_reentrant=True)``, fairseq's
    ``--checkpoint-activations``) the first pass runs without gradients; non-reentrant
    checkpointing (and ``--offload-activations``) installs saved-tensor hooks. A plain training
    forward is neither, and pays no buffer copy. Where the torch build lacks the query, always."""
    if not torch.is_grad_enabled():
        return True
    top = getattr(torch._C._autograd, "_top_saved_tensors_default_hooks", None)
    return top is None or top(False) is not None


def set_num_updates(model: nn.Module, num_updates: int) -> None:
    """Tell every norm of ``model`` the number of optimizer updates done, as fairseq does after
    each update: call it after each ``optimizer.step()`` in a plain-torch loop, so that a PN
    warmup (counted in updates) ends. Modules other than these norms are left alone.

    Example::

        >>> for step, batch in enumerate(loader, start=1):
        ...     loss(model(batch)).backward(); optimizer.step(); optimizer.zero_grad()
        ...     set_num_updates(model, step)
    """
    for module in model.modules():
        if isinstance(module, MaskedNorm):
            module.set_num_updates(num_updates)


def group_num_option(options, num_heads: int, auto: int) -> int | None:
    """GroupScaling groups from ``options.pn_group_num``: ``-1`` (:data:`~.defaults.GROUP_NUM_AUTO`)
    = ``auto``, the norm's own default; ``-2`` (:data:`~.defaults.GROUP_NUM_HEADS`) = the
    attention heads ``num_heads``; ``N >= 0`` = N groups (0 = none). None when unset."""
    value = getattr(options, "pn_group_num", None)
    if value is None:
        return None
    value = int(value)
    return {GROUP_NUM_AUTO: auto, GROUP_NUM_HEADS: num_heads}.get(value, value)


class MaskedNorm(nn.Module):
    """Base class of the padding-aware norms ``norm(x, padding_mask=None)``.

    Args:
        num_features: number of channels ``C``.
        eps: added to the variance-like statistic before the square root. Default: 1e-5.
        affine: learn a per-channel ``weight`` (init 1) and ``bias`` (init 0); when False both
            are registered as None. Default: True.
        bias: with ``affine``, learn the ``bias`` too (False: ``weight`` only, the bias registered
            as None), as ``torch.nn.LayerNorm``'s ``bias``. Default: True.
        batch_first: ``x`` is ``(B, T, C)`` (most models outside fairseq) instead of fairseq's
            ``(T, B, C)``; the padding mask is ``(B, T)`` either way. With ``B == T`` the two
            layouts have the same shape, so only this flag tells them apart. Default: False.
        sync_stats: all-reduce the batch statistics over ``process_group`` when
            ``torch.distributed`` is initialized with more than one rank. Default: False.
        process_group: group for ``sync_stats`` (None = world).
        device, dtype: of the parameters and floating buffers.

    Shape:
        - x: ``(T, B, C)`` (``(B, T, C)`` with ``batch_first``) or ``(N, C)``, any floating dtype.
        - padding_mask: ``(B, T)`` bool, True = pad (``(N,)`` for 2-D input), or None.
        - output: shape and dtype of ``x``. Statistics are computed in float32 (float64 for
          float64 input), with autocast disabled inside the layer; running-statistic buffers
          stay float32 when the module is cast to fp16/bf16 (``.half()``, fairseq ``--fp16``).
    """

    _version = 1
    #: Whether training forwards update buffers (running statistics, step counters). Stateful
    #: norms run eagerly under ``torch.compile`` and are recomputed from a snapshot of their state.
    stateful = True
    #: Host-side (Python) attributes a training forward reads or advances, kept with the buffers'
    #: snapshot for a recomputation.
    _host_state: tuple[str, ...] = ()
    #: Snapshots kept for recomputation, newest last (a layer called k <= this many times before
    #: its backward recomputes exactly); older ones are dropped, so memory stays bounded when
    #: nothing is recomputed.
    _max_snapshots = 8
    #: Whether :meth:`_normalize` reads the keep-vector (statistics over the tokens of the batch).
    #: Per-token norms set False and get ``keep=None`` (the mask is still validated).
    reads_padding = True

    def __init__(self, num_features: int, eps: float = EPS, affine: bool = True,
                 sync_stats: bool = False, process_group=None, device=None, dtype=None,
                 bias: bool = True, batch_first: bool = False):
        super().__init__()
        if not isinstance(num_features, int) or num_features <= 0:
            raise ValueError(f"num_features must be a positive int, got {num_features!r}")
        if eps <= 0:
            raise ValueError(f"eps must be > 0, got {eps}")
        self.num_features = num_features
        self.eps = eps
        self.affine = affine
        self.sync_stats = sync_stats
        self.process_group = process_group
        self.batch_first = bool(batch_first)
        factory = {"device": device, "dtype": dtype}
        self.register_parameter("weight", nn.Parameter(torch.empty(num_features, **factory)) if affine else None)
        self.register_parameter("bias", nn.Parameter(torch.empty(num_features, **factory))
                                if affine and bias else None)
        self._snapshots: collections.deque = collections.deque(maxlen=self._max_snapshots)

    def _apply(self, fn, recurse=True):
        # fairseq --fp16 / bf16 casts whole models; running statistics such as psi^2 = E[x^2]
        # overflow fp16 easily, so floating buffers stay float32 (device moves still apply).
        super()._apply(fn, recurse)
        for name, buf in self._buffers.items():
            if buf is not None and buf.dtype in (torch.float16, torch.bfloat16):
                self._buffers[name] = buf.float()
        return self

    def __prepare_scriptable__(self):
        # torch.jit.script calls this on every submodule first: fail with a sentence instead of
        # a TorchScript compiler trace (the forward takes PEP 604 unions, calls autograd
        # Functions with Python callbacks and the ctypes kernels, none of which TorchScript
        # compiles)
        raise RuntimeError(
            f"{type(self).__name__}: powernorm_fairseq norms do not support TorchScript "
            "(torch.jit.script). Run the model eagerly, or compile it with torch.compile.")

    def reset_running_stats(self) -> None:
        """Reset running buffers to their initial values (no-op for stateless norms)."""

    def reset_parameters(self) -> None:
        """Reset running buffers, ``weight`` to 1 and ``bias`` to 0."""
        self.reset_running_stats()
        if self.weight is not None:
            nn.init.ones_(self.weight)
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def set_num_updates(self, num_updates: int) -> None:
        """Told by fairseq the number of optimizer updates done; no-op unless overridden."""

    def _check_warmup_clock(self) -> None:
        """For a norm whose warmup counts optimizer updates: after :data:`~.defaults.UNTOLD_WARN_AFTER`
        training forwards without a :meth:`set_num_updates`, warn once that its warmup cannot end."""
        if getattr(self, "_told", False) or getattr(self, "_warned_untold", False):
            return
        self._untold = getattr(self, "_untold", 0) + 1
        if self._untold >= UNTOLD_WARN_AFTER:
            self._warned_untold = True
            warnings.warn(
                f"{type(self).__name__}: warmup_updates={self.warmup_updates} counts optimizer updates, "
                f"but set_num_updates was never called in {self._untold} training forwards, so the "
                "warmup never ends. Call powernorm_fairseq.norms.set_num_updates(model, step) after "
                "each optimizer step (fairseq does), or build with warmup_unit='forwards'.",
                RuntimeWarning, stacklevel=3)

    @classmethod
    def from_options(cls, options, *, num_heads: int = 1, final: bool = False) -> dict:
        """The keyword arguments of this norm from an options object (fairseq's model config: the
        ``--bn-*`` / ``--pn-*`` / ``--norm-*`` flags as attributes; a missing attribute leaves the
        keyword at the class's default). Each norm reads the options it takes, so nothing outside
        its module has a branch per norm (:func:`~.registry.build_norm_from_options`).

        Args:
            options: the options, as attributes.
            num_heads: attention heads of the side (the default GroupScaling groups).
            final: the norm is an encoder/decoder output norm.

        Default: ``sync_stats`` from ``norm_sync_stats`` where the class takes it, nothing else.
        """
        from .registry import accepted_kwargs

        if "sync_stats" in accepted_kwargs(cls) and getattr(options, "norm_sync_stats", None) is not None:
            return {"sync_stats": bool(options.norm_sync_stats)}
        return {}

    def eval_affine(self) -> tuple[Tensor, Tensor] | None:
        """Per-channel ``(scale, shift)``, each ``(C,)``, of the eval-mode map, or None if none."""
        return None

    # The state other code reads (inference/fold.py, analysis/tracking.py) goes through these
    # methods, not through buffer or attribute names, which differ between the families.

    def prescale_groups(self) -> int:
        """Channel groups of the per-token RMS pre-scaling ``x_g / sqrt(mean_g(x^2) + eps)``
        that precedes the statistics, in training and eval: 0 = none (the default), 1 = over all
        channels (BN's ``prescale``), ``group_num`` (PN's GroupScaling)."""
        return 0

    @property
    def has_prescale(self) -> bool:
        """Whether a per-token pre-scaling precedes the per-channel affine eval map."""
        return self.prescale_groups() > 0

    def running_statistics(self) -> dict[str, Tensor]:
        """The running (eval-time) statistics by what they estimate, each a ``(C,)`` view of a
        buffer (do not modify): ``"mean"`` and ``"var"`` (BN; unbiased variance), ``"psi2"``
        (the quadratic mean of PN-V and PN). Empty for a norm without running statistics."""
        return {}

    def backward_nu(self) -> Tensor | None:
        """PN's backward statistic ``nu_{t-1}`` of Algorithm 2 as a float32 ``(C,)`` tensor (do
        not modify), or None for a norm that has none."""
        return None

    def extra_repr(self) -> str:
        return (f"{self.num_features}, eps={self.eps}, affine={self.affine}, sync_stats={self.sync_stats}"
                + (", batch_first=True" if self.batch_first else ""))

    def _affine_or_identity(self, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """``(weight, bias)`` as ``(C,)`` tensors of ``dtype``, ones/zeros where not learned."""
        weight, bias = self.weight, self.bias
        if weight is not None and bias is not None:  # the common case, first
            if weight.dtype is dtype and bias.dtype is dtype:  # no cast: no dispatch
                return weight, bias
            return weight.to(dtype), bias.to(dtype)
        ref = next(iter([*self.parameters(), *self.buffers()]), None)
        device = ref.device if ref is not None else None
        weight = (torch.ones(self.num_features, dtype=dtype, device=device) if self.weight is None
                  else self.weight.to(dtype))
        bias = (torch.zeros(self.num_features, dtype=dtype, device=device) if self.bias is None
                else self.bias.to(dtype))
        return weight, bias

    def _check_input(self, x: Tensor, padding_mask: Tensor | None) -> Tensor | None:
        """Validate shapes (host-side metadata only) and return a bool mask or None."""
        layout = "(B, T, C)" if self.batch_first else "(T, B, C)"
        if x.dim() not in (2, 3) or x.shape[-1] != self.num_features:
            raise ValueError(
                f"{type(self).__name__} expects x of shape {layout.replace('C', str(self.num_features))} "
                f"or (N, {self.num_features}), got {tuple(x.shape)}")
        if padding_mask is None:
            return None
        if x.dim() == 3:
            expected = (x.shape[0], x.shape[1]) if self.batch_first else (x.shape[1], x.shape[0])
        else:
            expected = (x.shape[0],)
        if tuple(padding_mask.shape) != expected:
            if x.dim() == 3:
                other = "batch_first=False for (T, B, C)" if self.batch_first else "batch_first=True for (B, T, C)"
                raise ValueError(
                    f"padding_mask must have shape (B, T) = {expected}: x of shape {tuple(x.shape)} is read "
                    f"as {layout} (batch_first={self.batch_first}); got {tuple(padding_mask.shape)}. "
                    f"Build the norm with {other} if that is your layout")
            raise ValueError(f"padding_mask must have shape (N,) = {expected} for x of shape "
                             f"{tuple(x.shape)}, got {tuple(padding_mask.shape)}")
        if padding_mask.is_floating_point():
            raise ValueError("padding_mask must be a bool tensor (True = pad), got "
                             f"{padding_mask.dtype}")
        return padding_mask.bool()

    def forward(self, x: Tensor, padding_mask: Tensor | None = None) -> Tensor:
        """Normalize ``x`` (see the class docstring for shapes).

        A training forward of a stateful norm that may be recomputed (under activation
        checkpointing, :func:`_may_be_recomputed`) first keeps a snapshot of the buffers; one that
        runs while autograd executes a backward pass is a recomputation (``torch.utils.checkpoint``, reentrant or not; fairseq's
        ``checkpoint_wrapper``, i.e. ``--checkpoint-activations``, with or without
        ``--offload-activations``). It runs on the state the original forward saw (a snapshot
        of the buffers taken before that forward, newest first) and leaves the state as it
        found it, so it reproduces the original output bit for bit and updates no statistic;
        the backward then updates the backward-time statistics (``nu``, ``ema_gz``) once.

        Stateful norms run eagerly under ``torch.compile`` (a clean graph break): their custom
        autograd Functions update buffers in the forward and backward and call the fused CPU
        kernels through ``ctypes``, neither of which a traced graph can reproduce.
        """
        if not self.stateful:
            return self._forward(x, padding_mask)
        if torch.compiler.is_compiling():
            from ._compile import forward_eagerly  # imports torch._dynamo: only when compiling

            return forward_eagerly(self, x, padding_mask)
        return self._forward_stateful(x, padding_mask)

    def _forward_stateful(self, x: Tensor, padding_mask: Tensor | None) -> Tensor:
        if not self.training:
            return self._forward(x, padding_mask)
        if torch._C._current_graph_task_id() != -1:  # inside a backward pass: a recomputation
            return self._recompute(x, padding_mask)
        if _may_be_recomputed():
            self._snapshots.append(self._snapshot())
        return self._forward(x, padding_mask)

    def _snapshot(self) -> dict:
        with torch.no_grad():
            state = {name: buf.clone() for name, buf in self._buffers.items() if buf is not None}
        state.update((attr, getattr(self, attr)) for attr in self._host_state)
        return state

    def _restore(self, state: dict) -> None:
        with torch.no_grad():
            for name, buf in self._buffers.items():
                if buf is not None:
                    buf.copy_(state[name])
        for attr in self._host_state:
            setattr(self, attr, state[attr])

    def _recompute(self, x: Tensor, padding_mask: Tensor | None) -> Tensor:
        # no snapshot left (a forward called from a backward hook, a second recomputation):
        # run on the current state, still without changing it
        current = self._snapshot()
        self._restore(self._snapshots.pop() if self._snapshots else current)
        try:
            return self._forward(x, padding_mask)
        finally:
            self._restore(current)

    def _forward(self, x: Tensor, padding_mask: Tensor | None) -> Tensor:
        mask = self._check_input(x, padding_mask)
        dtype = x.dtype
        # float32/float64 compute as they are; half precision in float32 (skipping the no-op
        # casts and the autocast switch where they do nothing: each is a dispatch per call)
        compute_dtype = dtype if dtype in _FULL_PRECISION else torch.promote_types(dtype, torch.float32)
        device_type = "cpu" if x.is_cpu else x.device.type
        no_autocast = (torch.autocast(device_type, enabled=False)
                       if torch.is_autocast_enabled(device_type) else _NO_CONTEXT)
        with no_autocast:
            x2d = x.reshape(-1, self.num_features)
            if compute_dtype is not dtype:
                x2d = x2d.to(compute_dtype)
            # rows of x2d: t * B + b for (T, B, C), b * T + t for (B, T, C)
            batch_major = self.batch_first and x.dim() == 3
            keep = keep_vector(mask, compute_dtype, batch_major=batch_major) if self.reads_padding else None
            y2d = self._normalize(x2d, keep)
        y = y2d.reshape(x.shape)
        return y if y.dtype is dtype else y.to(dtype)

    def _normalize(self, x2d: Tensor, keep: Tensor | None) -> Tensor:
        """Normalize ``x2d: (N, C)`` given the keep-vector ``keep: (N,)`` (1 = real) or None."""
        raise NotImplementedError

    def _sync(self) -> bool:
        return self.training and sync_enabled(self.sync_stats, self.process_group)

    def _upgrade_legacy_state(self, state_dict: dict, prefix: str) -> None:
        """Fill in what a state dict older than ``_version`` may lack (released-code format)."""

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        # no metadata (a plain dict) or an older version: torch stamps every module's
        # state_dict with its class's _version, so the released modules' carry version 1
        version = local_metadata.get("version")
        if version is None or version < self._version:
            self._upgrade_legacy_state(state_dict, prefix)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)
