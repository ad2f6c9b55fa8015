r"""Per-step statistics of normalization layers during training (Figs. 2-4 of the paper).

:func:`attach_tracker` registers hooks on chosen norm layers of a model and appends one CSV row per
training forward call per layer. Tracking is opt-in: when it is not attached, no hook exists and
the model runs exactly as without this module. The module is pure torch (no fairseq import); it
works with any norm that takes ``norm(x, padding_mask=None)``.

Notation (one tracked layer, one training forward call). ``x`` is the layer's input restricted to
the B non-pad tokens, a (B, d) matrix with d = C (for a norm with a per-token pre-scaling, such as
the reference PowerNorm's GroupScaling, ``x`` is the pre-scaled input, i.e. what the statistics are
taken over). All operations are per feature and elementwise; ``||.||`` is the Euclidean norm over
the d features; ``eps`` is the layer's ``eps`` (1e-5 if it has none).

Forward statistics of the batch::

    mu_B      = (1/B) sum_i x_i
    sigma_B^2 = (1/B) sum_i (x_i - mu_B)^2          (biased, as used for normalizing)
                (BN with the released pad filling, ``pad_statistics="released"``, normalizes by
                its own, (1/(T*B)) sum_i (x_i - mu_B)^2 over the T*B rows, pads included, and
                sigma_B^2 here is that one)
    psi_B^2   = (1/B) sum_i x_i^2                   (quadratic mean, PN-V / PN)

Running statistics ``mu``, ``sigma^2``, ``psi^2`` are read *before* this call's update: the layer's
own running statistics where it has them (:meth:`~powernorm_fairseq.norms.MaskedNorm.running_statistics`:
mean and variance for BN, ``psi^2`` for PN-V / PN), otherwise a shadow EMA kept by the tracker with BN's rule
(``mu <- (1-m) mu + m mu_B``, ``sigma^2 <- (1-m) sigma^2 + m B/(B-1) sigma_B^2``,
``psi^2 <- (1-m) psi^2 + m psi_B^2``; init 0, 1, 1; ``m = shadow_momentum``), so that every norm
gets comparable numbers.

Backward terms. ``g_i = gamma * dL/dy_i`` where ``dL/dy`` is the upstream gradient of the layer's
output and ``gamma`` its weight (1 without affine). ``L`` is the loss that is backpropagated: in
fairseq the micro-batch's summed token loss (the trainer divides the gradients by the sample size
only afterwards), so backward columns scale with the batch size; compare runs of equal batch
size. With ``sigma_B = sqrt(sigma_B^2 + eps)``, ``xs_i = (x_i - mu_B) / sigma_B`` (BN's normalized input),
``psi_B = sqrt(psi_B^2 + eps)``, ``xp_i = x_i / psi_B`` (PN-V's normalized input)::

    g_mu         = -(1/sigma_B) (1/B) sum_k g_k                       (same for every token)
    g_sigma^2_i  = -(1/sigma_B) xs_i (1/B) sum_k g_k xs_k
    g_psi^2_i    = -(1/psi_B)   xp_i (1/B) sum_k g_k xp_k

These are the contributions of mu_B, sigma_B^2 (BN) and psi_B^2 (PN-V) to dL/dx (docs/SPEC.md
section 1); they are computed for every norm from the same ``x`` and ``g``.
For the stability quantities of PN (docs/SPEC.md section 7), ``z_i`` is the normalized activation the
layer actually produced, recovered from its output as ``z_i = (y_i - beta) / gamma``::

    Gamma_t  = (1/B) sum_i z_i^2          Lambda_t = (1/B) sum_i g_i z_i          (vectors in R^d)

and ``nu`` is the layer's backward state *before* this call's backward (``nu_{t-1}``, the value
that enters this step's gradient): the ``nu`` buffer of the paper PN, or
``(1 - alpha_bkw) * ema_gz`` for the reference PN.

CSV columns, one row per training forward call and tracked layer:

==============  ========================================================================
``step``        update index: the ``num_updates`` fairseq passes to ``set_num_updates``
                before each forward (0 for the first update); without it a counter of
                training forward calls, continued from the last row of an existing file
``micro``       index of the forward call within the step (gradient accumulation)
``layer``       the module's qualified name, e.g. ``encoder.layers.0.self_attn_layer_norm``
``norm``        ``layer`` / ``batch`` / ``power_v`` / ``power`` (else the class name)
``tokens``      B, the number of non-pad tokens
``d``           C, the number of features
``mu_dist``     (1/d) ||mu_B - mu||
``var_dist``    (1/d) ||sigma_B^2 - sigma^2||
``psi2_dist``   (1/d) ||psi_B^2 - psi^2||
``g_mu``        (1/d) ||g_mu||
``g_var``       (1/B) sum_i (1/d) ||g_sigma^2_i||
``g_psi2``      (1/B) sum_i (1/d) ||g_psi^2_i||
``gamma_mean``  mean over features of Gamma_t (PN only, else empty)
``gamma_max``   max over features of Gamma_t (PN only; stability needs
                (1 - alpha_bkw) Gamma_t <= 1)
``lambda``      (1/d) ||Lambda_t|| (PN only)
``nu``          (1/d) ||nu_{t-1}|| (PN only)
==============  ========================================================================

Backward columns are empty for a forward call whose output received no gradient; a call with no
real token (all pads) gets no row. Rows are buffered and appended every ``flush_every`` rows and
at exit. Under ``torch.distributed`` only rank 0 records.

An existing file is continued only when this is a resume of the run that wrote it: the same
header, the same (layer, norm) pairs, and, when the run's first update index ``start_step`` is
known (fairseq: the restored ``num_updates``), ``start_step > 0`` and at least the file's first
step. Rows with ``step >= start_step`` (logged after the checkpoint that was restored, recomputed
by the resumed run) are dropped first. Anything else (a new run, ``start_step = 0``; another norm
or layer; a file of a later part of training) raises ``ValueError`` naming the file; nothing in it
is changed. Without ``start_step`` (plain torch use) the step counter continues after the last row.

Example::

    >>> tracker = attach_tracker(model, "stats.csv")          # first norm of the encoder
    >>> ...train...
    >>> tracker.close()                                       # flush and remove the hooks
"""

from __future__ import annotations

import atexit
import csv
import logging
import os
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from powernorm_fairseq.norms import MaskedNorm

from .tracking_helpers import (
    _RUNNING_KEYS,
    _dist,
    _find_layers,
    _fmt,
    _LayerState,
    _mean_token_norm,
    _non_pad,
    _prescaled,
)

__all__ = ["COLUMNS", "DEFAULT_LAYERS", "NormStatsTracker", "attach_tracker"]

logger = logging.getLogger(__name__)

COLUMNS: tuple[str, ...] = (
    "step", "micro", "layer", "norm", "tokens", "d",
    "mu_dist", "var_dist", "psi2_dist",
    "g_mu", "g_var", "g_psi2",
    "gamma_mean", "gamma_max", "lambda", "nu",
)  # fmt: skip
DEFAULT_LAYERS: tuple[str, ...] = ("encoder.layers.0.self_attn_layer_norm",)

















class NormStatsTracker:
    """Hooks on norm layers that log batch-vs-running statistics and gradient terms to CSV.

    Use :func:`attach_tracker` to create one. See the module docstring for the exact formula of
    every column.

    Args:
        modules: ``{qualified_name: norm_module}`` to track.
        path: CSV file; created with a header, or continued if it already has the same header.
        shadow_momentum: EMA weight of the batch statistic for the shadow running statistics kept
            for layers without their own (BN's convention; default 0.1, the ``batch`` norm's
            default momentum).
        flush_every: number of buffered rows that triggers an append to ``path``.
        start_step: the update index the run starts at (a resumed fairseq run: the restored
            ``num_updates``), or None if unknown; decides whether an existing ``path`` is
            continued (see the module docstring).
    """

    def __init__(
        self,
        modules: dict[str, nn.Module],
        path: str | os.PathLike,
        shadow_momentum: float = 0.1,
        flush_every: int = 50,
        start_step: int | None = None,
    ) -> None:
        if not 0.0 < shadow_momentum <= 1.0:
            raise ValueError(f"shadow_momentum must be in (0, 1], got {shadow_momentum}")
        if flush_every < 1:
            raise ValueError(f"flush_every must be >= 1, got {flush_every}")
        self.path = os.fspath(path)
        self.flush_every = flush_every
        self.num_updates: int | None = None
        self._rows: list[dict] = []
        self._handles: list = []
        self._patched: list[nn.Module] = []
        self.layers = [_LayerState(n, m, shadow_momentum) for n, m in modules.items()]
        first_step = self._prepare_file(start_step)
        for state in self.layers:
            state.next_step = first_step
        for state in self.layers:
            self._install(state)
        atexit.register(self.flush)

    # ----------------------------------------------------------------------------- file
    def _prepare_file(self, start_step: int | None) -> int:
        """Check, continue or create the CSV; return the next value of the fallback step counter.

        Raises ``ValueError`` (file untouched) when the file is not this run's (module docstring).
        """
        refuse = ("; it is not continued. Remove it, or pass another --track-norm-stats file "
                  "(tracking never appends to another run's file)")
        if os.path.exists(self.path) and os.path.getsize(self.path) > 0:
            with open(self.path, newline="") as f:
                header = next(csv.reader(f), [])
                rows = list(csv.reader(f))
            if tuple(header) != COLUMNS:
                raise ValueError(f"{self.path} exists with a different header ({header[:4]}...)" + refuse)
            if not rows:
                return start_step or 0
            ours = {(s.name, s.kind) for s in self.layers}
            theirs = {(r[2], r[3]) for r in rows if len(r) > 3}
            if theirs != ours:
                raise ValueError(f"{self.path} holds statistics of {sorted(theirs)}, this run tracks "
                                 f"{sorted(ours)} (another norm or layer)" + refuse)
            steps = [int(r[0]) for r in rows]
            if start_step is None:
                return steps[-1] + 1
            if start_step == 0 or start_step <= steps[0]:
                raise ValueError(f"{self.path} holds steps {steps[0]}..{steps[-1]} of an earlier run; "
                                 f"this run starts at update {start_step}" +
                                 (" (a new run)" if start_step == 0 else "") + refuse)
            keep = [r for r, step in zip(rows, steps, strict=True) if step < start_step]
            if len(keep) < len(rows):  # logged after the restored checkpoint: recomputed now
                tmp = f"{self.path}.tmp"
                with open(tmp, "w", newline="") as f:
                    csv.writer(f).writerows([list(COLUMNS), *keep])
                os.replace(tmp, self.path)  # atomic: the old rows or the trimmed file, whole
            gap = f" (updates {steps[-1] + 1}..{start_step - 1} were never flushed)" \
                if steps[-1] + 1 < start_step else ""
            logger.info(f"--track-norm-stats: resumed run, continuing {self.path} at update {start_step} "
                 f"({len(rows) - len(keep)} rows logged after the restored checkpoint dropped){gap}")
            return start_step
        parent = os.path.dirname(os.path.abspath(self.path))
        os.makedirs(parent, exist_ok=True)
        with open(self.path, "w", newline="") as f:
            csv.writer(f).writerow(COLUMNS)
        return start_step or 0

    def flush(self) -> None:
        """Append the buffered rows to the CSV (append, not rewrite: a long log grows by rows)."""
        for state in self.layers:
            if state.pending is not None:
                self._emit(state)
        if not self._rows:
            return
        with open(self.path, "a", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=COLUMNS)
            writer.writerows(self._rows)
        self._rows.clear()

    def close(self) -> None:
        """Flush, remove every hook, and restore the layers' ``set_num_updates``."""
        self.flush()
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        for module in self._patched:
            del module.set_num_updates
        self._patched.clear()
        atexit.unregister(self.flush)

    # ---------------------------------------------------------------------------- steps
    def set_num_updates(self, num_updates: int) -> None:
        """Record the current update index (fairseq calls this before every training forward)."""
        self.num_updates = int(num_updates)

    def _patch_set_num_updates(self, module: nn.Module) -> None:
        # fairseq's BaseFairseqModel.set_num_updates calls every submodule that has this method,
        # so wrapping the tracked layer's own method (or adding one) gives the update index
        # without touching the model class.
        original = getattr(module, "set_num_updates", None)

        def set_num_updates(num_updates: int) -> None:
            self.set_num_updates(num_updates)
            if original is not None:
                original(num_updates)

        module.set_num_updates = set_num_updates
        self._patched.append(module)

    def _step(self, state: _LayerState) -> tuple[int, int]:
        """(step, micro) of a new training forward call of ``state``'s layer."""
        if self.num_updates is None:
            step = state.next_step
            state.next_step += 1
        else:
            step = self.num_updates
        state.micro = state.micro + 1 if step == state.last_step else 0
        state.last_step = step
        return step, state.micro

    # ---------------------------------------------------------------------------- hooks
    def _install(self, state: _LayerState) -> None:
        module = state.module
        self._handles.append(
            module.register_forward_pre_hook(self._make_pre_hook(state), with_kwargs=True)
        )
        self._handles.append(module.register_forward_hook(self._make_hook(state)))
        self._patch_set_num_updates(module)

    def _make_pre_hook(self, state: _LayerState):
        def pre_hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            if not module.training:
                return
            if state.pending is not None:  # the previous call got no gradient
                self._emit(state)
            x = args[0] if args else kwargs.get("x", kwargs.get("input"))
            mask = args[1] if len(args) > 1 else kwargs.get("padding_mask")
            state.x = _non_pad(_prescaled(module, x), mask)
            state.rows = x.shape[0] * x.shape[1] if x.dim() == 3 else x.shape[0]  # pads included
            state.mask = mask.detach() if isinstance(mask, Tensor) else None
            state.before = {s: v for s in _RUNNING_KEYS if (v := state.running(s)) is not None}

        return pre_hook

    def _make_hook(self, state: _LayerState):
        def hook(module: nn.Module, args: tuple, output) -> None:
            if not module.training or state.x is None:
                return
            y = output[0] if isinstance(output, tuple) else output
            if state.x.shape[0] == 0:  # only pads: no statistic is defined
                state.x = None
                return
            state.pending = self._forward_row(state)
            if state.kind == "power":  # Gamma_t and Lambda_t need the normalized activation
                state.pending["_y"] = _non_pad(y, state.mask)
            state.x = None
            if isinstance(y, Tensor) and y.requires_grad:
                y.register_hook(self._make_grad_hook(state))
            else:
                self._emit(state)

        return hook

    def _make_grad_hook(self, state: _LayerState):
        def grad_hook(grad: Tensor) -> None:
            if state.pending is None:
                return
            state.pending.update(self._backward_terms(state, _non_pad(grad, state.mask)))
            self._emit(state)

        return grad_hook

    # ------------------------------------------------------------------------------ math
    def _forward_row(self, state: _LayerState) -> dict:
        """Batch statistics, distances to the running ones, and the shadow EMA update."""
        x = state.x
        n, d = x.shape
        eps = float(getattr(state.module, "eps", 1e-5))
        mu_b = x.mean(0)
        var_b = x.var(0, unbiased=False)
        if getattr(state.module, "pad_statistics", None) == "released" and state.rows > n:
            # BN with the released pad filling divides the real tokens' squared deviations by
            # all T*B rows (pads sit at the mean): its sigma_B^2 is diluted by n / (T*B)
            var_b = var_b * (n / state.rows)
        psi2_b = x.pow(2).mean(0)
        batch = {"mu": mu_b, "var": var_b, "psi2": psi2_b}
        step, micro = self._step(state)
        row: dict = {
            "step": step, "micro": micro, "layer": state.name, "norm": state.kind,
            "tokens": n, "d": d,
        }  # fmt: skip
        for stat, col in (("mu", "mu_dist"), ("var", "var_dist"), ("psi2", "psi2_dist")):
            own = state.before.get(stat)
            if own is None or own.numel() != d:
                if stat not in state.shadow:
                    init = torch.zeros(d) if stat == "mu" else torch.ones(d)
                    state.shadow[stat] = init.to(x.device)
                own = state.shadow[stat]
                target = batch[stat] * (n / (n - 1) if stat == "var" and n > 1 else 1.0)
                state.shadow[stat] = (1 - state.momentum) * own + state.momentum * target
            row[col] = _dist(batch[stat], own)
        row["_x"], row["_eps"], row["_batch"] = x, eps, batch
        return row

    def _backward_terms(self, state: _LayerState, grad: Tensor) -> dict:
        """g_mu, g_sigma^2, g_psi^2 and (PN) Gamma, Lambda, nu from dL/dy on the non-pad tokens."""
        row = state.pending
        x, eps, batch = row["_x"], row["_eps"], row["_batch"]
        module = state.module
        weight = getattr(module, "weight", None)
        gamma = weight.detach().reshape(-1).float() if isinstance(weight, Tensor) else None
        g = grad * gamma if gamma is not None else grad
        sigma = (batch["var"] + eps).sqrt()
        xs = (x - batch["mu"]) / sigma
        psi = (batch["psi2"] + eps).sqrt()
        xp = x / psi
        out = {
            "g_mu": (g.mean(0) / sigma).norm().item() / x.shape[1],
            "g_var": _mean_token_norm(xs * (g * xs).mean(0) / sigma),
            "g_psi2": _mean_token_norm(xp * (g * xp).mean(0) / psi),
        }
        if state.kind == "power":
            bias = getattr(module, "bias", None)
            z = row["_y"]
            if isinstance(bias, Tensor):
                z = z - bias.detach().reshape(-1).float()
            if gamma is not None:
                z = z / gamma
            big_gamma = z.pow(2).mean(0)
            out["gamma_mean"] = big_gamma.mean().item()
            out["gamma_max"] = big_gamma.max().item()
            out["lambda"] = (g * z).mean(0).norm().item() / x.shape[1]
            nu = self._nu(module)
            if nu is not None:
                out["nu"] = nu.norm().item() / nu.numel()
        return out

    @staticmethod
    def _nu(module: nn.Module) -> Tensor | None:
        """nu_{t-1}: the paper PN's ``nu`` buffer or the reference's ``(1-alpha_bkw) ema_gz``."""
        return module.backward_nu() if isinstance(module, MaskedNorm) else None

    def _emit(self, state: _LayerState) -> None:
        """Move the pending row of ``state`` to the write buffer (missing columns empty)."""
        row = {k: _fmt(v) for k, v in state.pending.items() if not k.startswith("_")}
        state.pending = None
        self._rows.append({c: row.get(c, "") for c in COLUMNS})
        if len(self._rows) >= self.flush_every:
            self.flush()






def attach_tracker(
    model: nn.Module,
    path: str | os.PathLike | None,
    layer_names: str | Sequence[str] | None = None,
    shadow_momentum: float = 0.1,
    flush_every: int = 50,
    start_step: int | None = None,
) -> NormStatsTracker | None:
    """Log batch/running statistics and gradient terms of norm layers to a CSV, every training step.

    Args:
        model: the model (e.g. a fairseq ``transformer_pn``), built.
        path: CSV file, or None / "" for no tracking (nothing is registered; returns None).
        layer_names: qualified module names, a list or a comma-separated string; ``[k]`` and
            ``.k`` indexing are both accepted. Default: ``encoder.layers.0.self_attn_layer_norm``,
            the first norm applied in a pre-norm encoder.
        shadow_momentum: momentum of the shadow running statistics (see the module docstring).
        flush_every: rows buffered between appends to ``path``.
        start_step: the update index the run starts at (0 for a new run), or None if unknown;
            an existing ``path`` is continued only by a resume of its run (module docstring).

    Returns:
        The :class:`NormStatsTracker` (call ``close()`` to flush and remove the hooks), or None when
        ``path`` is empty or this process is not rank 0 of an initialized process group.
    """
    if not path:
        return None
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        if torch.distributed.get_rank() != 0:
            return None
    if layer_names is None or layer_names == "":
        layer_names = DEFAULT_LAYERS
    elif isinstance(layer_names, str):
        layer_names = [n for n in layer_names.split(",") if n.strip()]
    modules = _find_layers(model, layer_names)
    return NormStatsTracker(modules, path, shadow_momentum=shadow_momentum, flush_every=flush_every,
                            start_step=start_step)
