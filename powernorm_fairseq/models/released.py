"""Import state dicts and checkpoints of the paper's released program (sIncerass/powernorm).

The released code is a fairseq 0.8 fork whose ``transformer`` model chooses a norm per site with
``--encoder-norm-self``, ``--encoder-norm-ff``, ``--decoder-norm-self``, ``--decoder-norm-ff``
(``layer``, ``batch``, ``power``). Its parameter names are fairseq's, so our ``transformer_pn``
with the matching options (``configs/iwslt14_*.yaml``) has the same keys except:

==========================================  =================================================
released key                                ours
==========================================  =================================================
``*.num_batches_tracked`` (BN sites)        dropped: our BN has no counter (momentum is fixed,
                                            the released counter is never read)
(absent; PN sites)                          ``*.num_unstable`` filled with 0 by the norm's
                                            legacy-state upgrade (:class:`PowerNormReference`)
(absent; shared embeddings)                 ``decoder.output_projection.weight`` =
                                            ``decoder.embed_tokens.weight`` (fairseq >= 0.10
                                            names the tied output projection)
==========================================  =================================================

Everything else (``running_phi`` ``(1, C, 1, 1)``, ``ema_gz``, ``iters``, ``running_mean``,
``running_var``, ``version`` buffers) keeps name, shape and dtype. The returned state dict carries
no ``_metadata``: the module versions recorded by the released program describe its classes, not
ours, so our norms treat the entries as released-format (legacy) state.

Usage::

    from powernorm_fairseq.models.released import load_released_checkpoint
    ckpt = load_released_checkpoint("checkpoint_best.pt")   # model mapped, args kept
    model.load_state_dict(ckpt["model"], strict=True)
    # with: --arch transformer_pn_iwslt_de_en and released_model_options(ckpt["args"])
"""

from __future__ import annotations

import re
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

#: Released norm names (``NormSelect``) -> our norm families; the released ``batch`` is
#: ``MaskSyncBatchNorm`` with LayerScaling (our ``batch`` with ``bn_prescale``), ``power`` is
#: ``MaskPowerNorm`` (our ``power`` with ``pn_variant=reference``).
RELEASED_NORMS = {"layer": "layer", "batch": "batch", "power": "power"}

#: Released criterion classes -> ours (fairseq checks the name when restoring the optimizer):
#: fairseq 0.8's label smoothing is our ``label_smoothed_cross_entropy_uniform``.
RELEASED_CRITERIA = {"LabelSmoothedCrossEntropyCriterion": "UniformLabelSmoothedCrossEntropyCriterion"}

_BN_COUNTER = re.compile(r"\.num_batches_tracked$")


def map_released_state_dict(state_dict: Mapping[str, Tensor],
                            share_output_projection: bool | None = None) -> OrderedDict:
    """Our ``transformer_pn`` state dict from a released-program model state dict.

    Args:
        state_dict: ``checkpoint["model"]`` of the released program (or ``model.state_dict()``).
        share_output_projection: add ``decoder.output_projection.weight`` tied to
            ``decoder.embed_tokens.weight`` (released ``--share-decoder-input-output-embed`` or
            ``--share-all-embeddings``); None = when the state dict has no ``decoder.embed_out``.

    Returns:
        A new ``OrderedDict`` (same tensors, no copies, no ``_metadata``) that loads strictly into
        the matching ``transformer_pn`` model.

    Raises:
        ValueError: the state dict is not a released transformer's (no ``encoder.``/``decoder.``
            keys), or already has our keys (``output_projection``, ``num_unstable``).
    """
    keys = list(state_dict)
    if not any(k.startswith("encoder.") for k in keys) or not any(
            k.startswith("decoder.") for k in keys):
        raise ValueError("not a released transformer state dict: no encoder./decoder. keys "
                         f"(first keys: {keys[:3]})")
    ours = [k for k in keys if k.endswith(".num_unstable") or "output_projection" in k]
    if ours:
        raise ValueError(f"state dict already in transformer_pn format (has {ours[0]}); load it "
                         "directly")
    out: OrderedDict[str, Tensor] = OrderedDict()
    for key, value in state_dict.items():
        if _BN_COUNTER.search(key):
            continue
        out[key] = value
        if key == "decoder.embed_tokens.weight":
            share = ("decoder.embed_out" not in state_dict if share_output_projection is None
                     else share_output_projection)
            if share:
                out["decoder.output_projection.weight"] = value
    if "decoder.embed_out" in out:  # untied output matrix: fairseq >= 0.10's name
        out["decoder.output_projection.weight"] = out.pop("decoder.embed_out")
    return out


def released_model_options(args) -> dict[str, Any]:
    """Our model options (``transformer_pn`` config keys) for a released run's ``args``.

    The released ``--encoder-norm-ff`` also chooses the encoder's output norm (its
    ``encoder.layer_norm``), likewise on the decoder side. PN sites take the released
    ``--warmup-updates`` (shared with the learning rate), the output norms 1000 (the released
    ``NormSelect`` default). The encoder's padded positions keep the pad embedding (fairseq 0.8).

    Raises:
        ValueError: a released norm name we do not implement (``group`` etc.).
    """
    options: dict[str, Any] = {"encoder_pad_inputs": "embedding"}  # fairseq 0.8 kept the pads
    for side in ("encoder", "decoder"):
        names = {site: getattr(args, f"{side}_norm_{flag}", "layer")
                 for site, flag in (("self_attn", "self"), ("ffn", "ff"))}
        for name in names.values():
            if name not in RELEASED_NORMS:
                raise ValueError(f"released --{side}-norm-* {name!r} has no counterpart here; "
                                 f"supported: {sorted(RELEASED_NORMS)}")
        options[f"{side}_self_attn_norm"] = RELEASED_NORMS[names["self_attn"]]
        options[f"{side}_ffn_norm"] = RELEASED_NORMS[names["ffn"]]
        options[f"{side}_final_norm"] = RELEASED_NORMS[names["ffn"]]
        if side == "decoder":  # released: the encoder-attention norm follows --decoder-norm-self
            options["decoder_cross_attn_norm"] = RELEASED_NORMS[names["self_attn"]]
    if "power" in options.values():
        options.update(pn_variant="reference", pn_group_num=-1, pn_alpha_fwd=0.9,
                       pn_alpha_bkw=0.9, pn_warmup_updates=int(getattr(args, "warmup_updates", 0)),
                       pn_final_warmup_updates=1000)
    if "batch" in options.values():
        options.update(bn_momentum=0.05, bn_prescale=True, bn_pad_statistics="released")
    return options


def load_released_checkpoint(path) -> dict:
    """A released-program checkpoint with its ``model`` mapped to our names.

    The other entries (``args``, ``optimizer_history``, ``last_optimizer_state``,
    ``extra_state``) are kept: parameter order, hence the optimizer state, is the same in both
    programs. The optimizer history names our criterion (:data:`RELEASED_CRITERIA`), which
    fairseq checks before restoring the optimizer state. ``extra_state["train_meters"]`` (fairseq
    0.8's pickled meter objects) is dropped. Only load checkpoints you trust (a pickle can run code).
    """
    state = torch.load(path, map_location="cpu", weights_only=False)
    if not isinstance(state, dict) or "model" not in state:
        raise ValueError(f"{path} is not a fairseq checkpoint (no 'model' entry)")
    state = dict(state)
    state["model"] = map_released_state_dict(state["model"])
    # fairseq 0.8 pickles its trainer meters (fairseq.meters.AverageMeter ...) here; fairseq
    # 0.12 neither reads them nor unpickles them with the safe loader
    extra = dict(state.get("extra_state") or {})
    extra.pop("train_meters", None)
    state["extra_state"] = extra
    state["optimizer_history"] = [
        dict(h, criterion_name=RELEASED_CRITERIA.get(h.get("criterion_name"),
                                                     h.get("criterion_name")))
        for h in state.get("optimizer_history", [])]
    return state


_SITE_ATTRS = ("self_attn_layer_norm", "encoder_attn_layer_norm", "final_layer_norm",
               "layer_norm")


def _named_norms(model: nn.Module) -> Iterable[tuple[str, nn.Module]]:
    for name, module in model.named_modules():
        if name.rsplit(".", 1)[-1] in _SITE_ATTRS:
            yield name, module


def norm_sites(model: nn.Module) -> list[dict[str, Any]]:
    """Every norm site of a ``transformer_pn`` model: name, type, groups, warmup and counter.

    ``type`` is ``layer``, ``batch`` or ``power`` (``power_v`` for PN-V); ``groups`` the
    GroupScaling groups of a reference PN (0 = none; for BN 1 with LayerScaling, else 0);
    ``warmup`` the PN warmup length (None where there is none); ``counter`` the step-counter
    buffer's name and value (None where there is none).
    """
    from powernorm_fairseq.norms import LayerNorm, MaskedBatchNorm, PowerNormV
    from powernorm_fairseq.norms.power_norm import PowerNormPaper, PowerNormReference

    sites = []
    for name, module in _named_norms(model):
        entry: dict[str, Any] = {"site": name, "groups": 0, "warmup": None, "counter": None}
        if isinstance(module, PowerNormReference):
            entry.update(type="power", variant="reference", groups=module.group_num,
                         warmup=module.warmup_updates,
                         counter={"name": "iters", "value": int(module.iters[0]),
                                  "per": "training forward"})
        elif isinstance(module, PowerNormPaper):
            entry.update(type="power", variant="paper", warmup=module.warmup_updates,
                         counter={"name": "num_updates", "value": int(module.num_updates[0]),
                                  "per": "optimizer update"})
        elif isinstance(module, MaskedBatchNorm):
            entry.update(type="batch", groups=1 if module.prescale else 0,
                         momentum=module.momentum, pads=module.pad_statistics)
        elif isinstance(module, PowerNormV):
            entry.update(type="power_v", momentum=module.momentum)
        elif isinstance(module, (LayerNorm, nn.LayerNorm)):
            entry.update(type="layer")
        else:
            entry.update(type=type(module).__name__)
        sites.append(entry)
    return sites
