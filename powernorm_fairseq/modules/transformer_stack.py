"""fairseq transformer encoder and decoder built from the PN layers, with a masked output norm.

The stacks differ from fairseq's in four places only: the layer factory hooks build
:class:`~powernorm_fairseq.modules.transformer_layer.TransformerPNEncoderLayer` /
``TransformerPNDecoderLayer``, the output norm (``layer_norm``, present in pre-norm models) is built
by the site factory, fairseq's own forward passes (``forward_scriptable`` /
``extract_features_scriptable``) run with the padding mask set for that output norm
(:mod:`~powernorm_fairseq.modules.padding_mask`), and with ``encoder.pad_inputs = embedding`` the
encoder's first layer gets the padded positions as fairseq 0.8 had them (:func:`restore_pad_inputs`).
"""

from __future__ import annotations

from contextvars import ContextVar

import torch
from fairseq.distributed import fsdp_wrap
from fairseq.models.transformer import TransformerDecoderBase, TransformerEncoderBase
from fairseq.modules.checkpoint_activations import checkpoint_wrapper
from torch import Tensor, nn

from .norm_factory import build_site_norm
from .padding_mask import attach_padding_mask, padding_mask_for_norms
from .transformer_layer import TransformerPNDecoderLayer, TransformerPNEncoderLayer


def _wrap_layer(layer: nn.Module, cfg) -> nn.Module:
    # fairseq's activation checkpointing and FSDP wrapping, as in its build_*_layer.
    checkpoint = cfg.checkpoint_activations
    if checkpoint:
        layer = checkpoint_wrapper(layer, offload_to_cpu=cfg.offload_activations)
    return fsdp_wrap(layer, min_num_params=cfg.min_params_to_wrap if not checkpoint else 0)


# the embedded source (B, S, C) before fairseq zeroed its pads, between the embedding and the
# first layer that runs (encoder.pad_inputs = embedding)
_EMBEDDED_SOURCE: ContextVar[Tensor | None] = ContextVar("powernorm_fairseq_embedded_source",
                                                         default=None)


def restore_pad_inputs(layer: nn.Module, args: tuple, kwargs: dict):
    """Forward pre-hook (``with_kwargs=True``) of every encoder layer for
    ``encoder.pad_inputs = embedding``: the first layer that runs receives, at the padded
    positions, the embedded source as fairseq 0.8 left it (``forward_embedding``'s output), where
    fairseq >= 0.10 has zeros. ``x``: ``(S, B, C)``; ``encoder_padding_mask``: ``(B, S)``."""
    embedded = _EMBEDDED_SOURCE.get()
    mask = kwargs.get("encoder_padding_mask")
    if embedded is None or mask is None or not args:
        return None
    _EMBEDDED_SOURCE.set(None)  # once: later layers see what the first one made of it
    x = torch.where(mask.t().unsqueeze(-1), embedded.transpose(0, 1), args[0])
    return (x, *args[1:]), kwargs


class TransformerPNEncoder(TransformerEncoderBase):
    """Transformer encoder whose norms come from the config (see ``pn_config``).

    Args:
        cfg: a :class:`~powernorm_fairseq.models.pn_config.TransformerPNConfig`.
        dictionary: source dictionary.
        embed_tokens: ``nn.Embedding`` of the source tokens.
    """

    def __init__(self, cfg, dictionary, embed_tokens, return_fc: bool = False):
        super().__init__(cfg, dictionary, embed_tokens, return_fc=return_fc)
        if self.layer_norm is not None:
            self.layer_norm = attach_padding_mask(build_site_norm(
                cfg, "encoder", "final", embed_tokens.embedding_dim, cfg.encoder.attention_heads
            ))
        # here, not at the top: powernorm_fairseq.models imports this module
        from powernorm_fairseq.models.pn_config import PNEncoderConfig

        # a config without the option (a checkpoint saved before it existed) gets its default
        self.pad_inputs = str(getattr(cfg.encoder, "pad_inputs", PNEncoderConfig.pad_inputs))
        if self.pad_inputs == "embedding":
            for layer in self.layers:
                layer.register_forward_pre_hook(restore_pad_inputs, with_kwargs=True)

    def forward_embedding(self, src_tokens: Tensor, token_embeddings: Tensor | None = None):
        """fairseq's source embedding ``(B, S, C)``; kept for :func:`restore_pad_inputs` when
        ``encoder.pad_inputs = embedding``."""
        x, embed = super().forward_embedding(src_tokens, token_embeddings)
        if self.pad_inputs == "embedding":
            _EMBEDDED_SOURCE.set(x)
        return x, embed

    def build_encoder_layer(self, cfg):
        return _wrap_layer(TransformerPNEncoderLayer(cfg, return_fc=self.return_fc), cfg)

    def forward_scriptable(
        self,
        src_tokens: Tensor,
        src_lengths: Tensor | None = None,
        return_all_hiddens: bool = False,
        token_embeddings: Tensor | None = None,
    ):
        """fairseq's encoder forward, the output norm receiving the source padding mask.

        Args:
            src_tokens: ``(B, S)`` token ids; src_lengths: ``(B,)`` (unused, as in fairseq).
            return_all_hiddens: also return every layer's output.
            token_embeddings: precomputed ``(B, S, C)`` token embeddings, or None.

        Returns:
            fairseq's encoder-output dict (``encoder_out``: ``[(S, B, C)]``,
            ``encoder_padding_mask``: ``[(B, S)]``, ...).
        """
        # the mask fairseq hands its layers: None for a batch without pads
        token = _EMBEDDED_SOURCE.set(None)
        try:
            with padding_mask_for_norms(_mask_or_none(src_tokens.eq(self.padding_idx))):
                return super().forward_scriptable(
                    src_tokens, src_lengths, return_all_hiddens, token_embeddings
                )
        finally:
            _EMBEDDED_SOURCE.reset(token)


class TransformerPNDecoder(TransformerDecoderBase):
    """Transformer decoder whose norms come from the config (see ``pn_config``).

    Args:
        cfg: a :class:`~powernorm_fairseq.models.pn_config.TransformerPNConfig`.
        dictionary: target dictionary.
        embed_tokens: target embedding (``nn.Embedding`` or fairseq's ``AdaptiveInput``).
        no_encoder_attn: decoder-only (language model).
        output_projection: a prebuilt output projection, or None.
    """

    def __init__(
        self, cfg, dictionary, embed_tokens, no_encoder_attn=False, output_projection=None
    ):
        super().__init__(
            cfg,
            dictionary,
            embed_tokens,
            no_encoder_attn=no_encoder_attn,
            output_projection=output_projection,
        )
        if self.layer_norm is not None:
            self.layer_norm = attach_padding_mask(build_site_norm(
                cfg, "decoder", "final", self.embed_dim, cfg.decoder.attention_heads
            ))

    def build_decoder_layer(self, cfg, no_encoder_attn=False):
        return _wrap_layer(TransformerPNDecoderLayer(cfg, no_encoder_attn), cfg)

    def extract_features_scriptable(
        self,
        prev_output_tokens: Tensor,
        encoder_out: dict[str, list[Tensor]] | None,
        incremental_state: dict[str, dict[str, Tensor | None]] | None = None,
        full_context_alignment: bool = False,
        alignment_layer: int | None = None,
        alignment_heads: int | None = None,
    ):
        """fairseq's decoder feature pass, the output norm receiving the target padding mask.

        Args:
            prev_output_tokens: ``(B, T)`` previous target tokens (teacher forcing).
            encoder_out: the encoder's output dict, or None for a language model.
            incremental_state: fairseq's decoding cache; when given only the last position is run.
            full_context_alignment: do not apply the causal mask.
            alignment_layer, alignment_heads: which layer/heads to average attention over.

        Returns:
            ``(x, extra)``: features ``(B, T, C_out)`` and ``{"attn": [...], "inner_states": [...]}``.
        """
        # the mask fairseq hands its layers: of the positions it runs, None without pads
        tokens = prev_output_tokens if incremental_state is None else prev_output_tokens[:, -1:]
        with padding_mask_for_norms(_mask_or_none(tokens.eq(self.padding_idx))):
            return super().extract_features_scriptable(
                prev_output_tokens,
                encoder_out,
                incremental_state,
                full_context_alignment,
                alignment_layer,
                alignment_heads,
            )


def _mask_or_none(padding_mask: Tensor) -> Tensor | None:
    """``padding_mask`` if it marks any pad, else None (a norm takes no mask then)."""
    return padding_mask if bool(padding_mask.any()) else None
