"""Fold eval-mode batch/power norms into the linear layers that consume them.

In eval mode, ``batch``, ``power_v`` and ``power`` are a fixed per-channel affine map after an
optional per-token pre-scaling (the reference PN's GroupScaling, BN's optional LayerScaling)::

    y = p(x) * scale + shift          scale, shift: (C,)      (norm.eval_affine())

A pre-norm transformer feeds every norm output straight into linear layers, ``z = W y + b``, so

    z = (W diag(scale)) p(x) + (b + W shift) = W' p(x) + b'

and the norm disappears at inference: only ``p`` (identity, or the per-token group RMS scaling)
is left. This file is pure torch: it recognises the fairseq transformer structure by attribute
names (duck typing) and never imports fairseq. The pre-scaling that stays is the norms' own
``group_rms_scale``.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator

import torch
from torch import Tensor, nn

from powernorm_fairseq.norms import MaskedNorm
from powernorm_fairseq.norms.autograd import PRESCALE_EPS
from powernorm_fairseq.norms.functional import group_rms_scale

__all__ = ["FoldedAffine", "FoldedNorm", "fold_norms"]


class FoldedNorm(nn.Module):
    r"""What is left of a norm whose affine map was folded into its consumers.

    .. math::
        y = x \quad \text{or, with pre-scaling,} \quad
        y_{g} = x_{g} / \sqrt{\operatorname{mean}_{c \in g}(x_c^2) + \epsilon}

    the per-token RMS scaling over each of ``group_num`` channel groups (the reference PN's
    GroupScaling; one group for BN's LayerScaling), computed in float32 like the norms do.
    Inference only: calling it in training mode raises, because the model no longer contains
    the norm it would have to train.

    Args:
        group_num (int): number of channel groups of the pre-scaling; 0 = no pre-scaling.
            Default: 0
        eps (float): added to the group mean square. Default: 1e-5 (the norms' ``PRESCALE_EPS``)

    Shape:
        - x: (*, C); ``padding_mask`` is accepted and ignored (the map is per token).
        - output: same shape and dtype as x.
    """

    def __init__(self, group_num: int = 0, eps: float = PRESCALE_EPS) -> None:
        super().__init__()
        self.group_num = group_num
        self.eps = eps

    def forward(self, x: Tensor, padding_mask: Tensor | None = None) -> Tensor:
        _check_eval(self)
        if self.group_num == 0:
            return x
        compute_dtype = torch.promote_types(x.dtype, torch.float32)
        return group_rms_scale(x.to(compute_dtype), self.group_num, self.eps).to(x.dtype)

    def extra_repr(self) -> str:
        return f"group_num={self.group_num}, eps={self.eps}"


class FoldedAffine(FoldedNorm):
    r"""An eval-mode norm reduced to one fused per-channel affine map.

    Used where the consumers of a norm cannot absorb its affine map (a tied/shared weight,
    a post-norm layer, a structure this file does not know).

    .. math::
        y = p(x) \cdot \text{scale} + \text{shift}

    Args:
        scale (Tensor): (C,) per-channel multiplier.
        shift (Tensor): (C,) per-channel offset.
        group_num, eps: the pre-scaling ``p`` as in :class:`FoldedNorm`.

    Shape:
        - x: (*, C); output: same shape.
    """

    def __init__(
        self, scale: Tensor, shift: Tensor, group_num: int = 0, eps: float = PRESCALE_EPS
    ) -> None:
        super().__init__(group_num, eps)
        self.register_buffer("scale", scale.detach().clone())
        self.register_buffer("shift", shift.detach().clone())

    def forward(self, x: Tensor, padding_mask: Tensor | None = None) -> Tensor:
        return torch.addcmul(self.shift, super().forward(x), self.scale)


def _check_eval(module: nn.Module) -> None:
    if module.training:
        raise RuntimeError(
            f"{type(module).__name__} is a folded inference-only norm; a folded model cannot be "
            "trained. Rebuild the model from its checkpoint to train it."
        )


def _is_foldable_norm(module: nn.Module) -> bool:
    return callable(getattr(module, "eval_affine", None))


def _is_prenorm_layer(module: nn.Module) -> bool:
    """A fairseq ``Transformer{Encoder,Decoder}LayerBase`` (or a look-alike) in pre-norm mode."""
    return getattr(module, "normalize_before", False) is True and all(
        hasattr(module, a) for a in ("self_attn_layer_norm", "self_attn", "final_layer_norm", "fc1")
    )


def _consumer_plan(model: nn.Module) -> dict[str, list[nn.Module] | None]:
    """Map the qualified name of each norm of known structure to the linears it feeds.

    ``None`` marks a norm whose consumers are known not to be foldable (it gets a fused affine).
    Norms absent from the map have unknown consumers and also get a fused affine.
    """
    plan: dict[str, list[nn.Module] | None] = {}
    layers: set[int] = set()  # ids of the recognised pre-norm layers
    for name, mod in model.named_modules():
        if not _is_prenorm_layer(mod):
            continue
        layers.add(id(mod))
        prefix = f"{name}." if name else ""
        attn = mod.self_attn
        # With cross_self_attention, k/v see cat(encoder_out, x): only part of it is normalized.
        if getattr(mod, "cross_self_attention", False):
            plan[prefix + "self_attn_layer_norm"] = None
        else:
            plan[prefix + "self_attn_layer_norm"] = [attn.q_proj, attn.k_proj, attn.v_proj]
        if getattr(mod, "encoder_attn_layer_norm", None) is not None:
            # k/v of the encoder attention come from the encoder output, not from this norm.
            plan[prefix + "encoder_attn_layer_norm"] = [mod.encoder_attn.q_proj]
        plan[prefix + "final_layer_norm"] = [mod.fc1]

    for name, mod in model.named_modules():
        prefix = f"{name}." if name else ""
        encoder, decoder = getattr(mod, "encoder", None), getattr(mod, "decoder", None)
        if encoder is not None and decoder is not None:
            plan[prefix + "encoder.layer_norm"] = _encoder_out_consumers(decoder, layers)
        if _is_stack(mod, layers) and getattr(mod, "output_projection", None) is not None:
            plan[prefix + "layer_norm"] = _decoder_out_consumers(mod)
    return plan


def _is_stack(module: nn.Module, layers: set[int]) -> bool:
    """An encoder/decoder: ``module.layers`` holds only recognised pre-norm layers."""
    stack = getattr(module, "layers", None)
    return isinstance(stack, nn.ModuleList) and all(id(m) in layers for m in stack)


def _encoder_out_consumers(decoder: nn.Module, layers: set[int]) -> list | None:
    """k/v projections of every decoder layer's encoder attention, the only readers of the
    encoder output in a fairseq encoder-decoder transformer; None for anything else."""
    if not _is_stack(decoder, layers):
        return None
    consumers = []
    for layer in decoder.layers:
        if getattr(layer, "cross_self_attention", False):
            return None
        attn = getattr(layer, "encoder_attn", None)
        if attn is not None:
            consumers += [attn.k_proj, attn.v_proj]
    return consumers


def _decoder_out_consumers(decoder: nn.Module) -> list | None:
    """The decoder's features go through ``project_out_dim`` (if any) to ``output_projection``."""
    if getattr(decoder, "adaptive_softmax", None) is not None:
        return None
    project_out = getattr(decoder, "project_out_dim", None)
    return [project_out if project_out is not None else decoder.output_projection]


def _can_absorb(linear: nn.Module, num_features: int, param_uses: Counter) -> bool:
    return (
        isinstance(linear, nn.Linear)
        and linear.in_features == num_features
        and param_uses[id(linear.weight)] == 1
        and (linear.bias is None or param_uses[id(linear.bias)] == 1)
    )


@torch.no_grad()
def _absorb(linear: nn.Linear, scale: Tensor, shift: Tensor) -> None:
    """W' = W diag(scale), b' = b + W shift, computed in float64 to keep the rounding at one
    final cast."""
    weight = linear.weight.double()
    delta = weight @ shift.double()
    if linear.bias is None:
        linear.bias = nn.Parameter(torch.zeros_like(linear.weight[:, 0]))
    linear.bias.copy_(linear.bias.double() + delta)
    linear.weight.copy_(weight * scale.double())


def _param_uses(model: nn.Module) -> Counter:
    """How many modules hold each parameter (tied embeddings count twice)."""
    return Counter(id(p) for m in model.modules() for p in m.parameters(recurse=False))


def _prescale_groups(norm: nn.Module) -> int:
    """Groups of the norm's per-token RMS pre-scaling: 0 = none; BN's LayerScaling is one
    group, the reference PN's GroupScaling has ``group_num`` (:meth:`MaskedNorm.prescale_groups`).
    A norm of another package that follows the contract of docs/DESIGN.md instead states
    ``has_prescale`` and ``group_num``."""
    if isinstance(norm, MaskedNorm):
        return norm.prescale_groups()
    return int(getattr(norm, "group_num", 1)) if norm.has_prescale else 0


def _named_norms(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    return ((n, m) for n, m in model.named_modules() if _is_foldable_norm(m))


def fold_norms(model: nn.Module) -> dict[str, str]:
    r"""Fold every eval-mode batch/power norm of ``model`` into the linear layers it feeds.

    For a norm with ``norm.eval_affine() -> (scale, shift)`` each of shape (C,), every consumer
    linear ``z = W y + b`` becomes

    .. math::
        W' = W \operatorname{diag}(\text{scale}), \qquad b' = b + W\,\text{shift}

    and the norm is replaced, in place, by a :class:`FoldedNorm` that returns its input
    (or applies only the per-token group RMS pre-scaling when ``norm.has_prescale``).
    Outputs are unchanged up to float rounding.

    What folds, in a pre-norm fairseq transformer (``normalize_before=True``; layers recognised by
    their attribute names):

    - ``self_attn_layer_norm`` into the self-attention's ``q_proj``, ``k_proj``, ``v_proj``;
    - ``encoder_attn_layer_norm`` into the cross-attention's ``q_proj``;
    - a layer's ``final_layer_norm`` into ``fc1``;
    - the encoder's final ``layer_norm`` into ``k_proj``/``v_proj`` of every decoder layer's
      encoder attention (the only readers of the encoder output);
    - the decoder's final ``layer_norm`` into ``project_out_dim``, or ``output_projection``.

    What does not fold, and why:

    - LayerNorm (``eval_affine()`` is None): its statistics are per token, not fixed; untouched.
    - the per-token RMS pre-scaling (the reference PN's GroupScaling, BN's LayerScaling with
      ``prescale=True``): a data-dependent division per token that no linear map reproduces;
      it stays, as a :class:`FoldedNorm` with ``group_num`` groups.
    - a norm whose consumers cannot all absorb the map (a consumer weight shared with another
      module, e.g. ``output_projection`` tied to the embeddings; a post-norm layer, whose norm
      output also feeds the residual; ``cross_self_attention``; adaptive softmax; any structure
      not listed above): it becomes one fused :class:`FoldedAffine` (an ``addcmul``).

    Side effects: the encoder output and the decoder features (``features_only=True``) are the
    pre-norm values after folding; only what their consumers compute is unchanged. The folded
    model cannot be trained, nor its state dict loaded into an unfolded model.

    Args:
        model (nn.Module): any module tree, in eval mode (``model.eval()``).

    Returns:
        dict[str, str]: qualified norm name -> ``"folded"`` or ``"fused"``.

    Raises:
        ValueError: if ``model`` or one of its batch/power norms is in training mode, where the
            norms use batch statistics and are not a fixed affine map.

    Example::

        >>> model.eval()
        >>> fold_norms(model)
        {'encoder.layers.0.self_attn_layer_norm': 'folded', ...}
    """
    norms = list(_named_norms(model))
    training = [n for n, m in norms if m.training]
    if model.training or training:
        where = f" (norms in training mode: {', '.join(training[:3])})" if training else ""
        raise ValueError(
            "fold_norms needs a model in eval mode: batch/power norms use batch statistics in "
            f"training mode, which no linear layer can absorb. Call model.eval() first{where}."
        )
    plan = _consumer_plan(model)
    param_uses = _param_uses(model)
    report: dict[str, str] = {}
    for name, norm in norms:
        affine = norm.eval_affine()
        if affine is None:
            continue
        scale, shift = affine
        group_num = _prescale_groups(norm)
        consumers = plan.get(name)
        if consumers and all(_can_absorb(c, scale.numel(), param_uses) for c in consumers):
            for linear in consumers:
                _absorb(linear, scale, shift)
            replacement: nn.Module = FoldedNorm(group_num)
            report[name] = "folded"
        else:
            replacement = FoldedAffine(scale, shift, group_num)
            report[name] = "fused"
        replacement.eval()
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, replacement)
    return report
