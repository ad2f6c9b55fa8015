"""fairseq transformer layers whose norms are built by a hook and receive the padding mask.

fairseq's layers create ``LayerNorm`` inline and call it as ``norm(x)``. Batch-statistics norms
(BatchNorm, PN-V, PowerNorm) must exclude pads from their statistics, so each norm here carries a
hook that hands it the layer's padding mask (:mod:`~powernorm_fairseq.modules.padding_mask`), and
``forward`` is fairseq's own, run with that mask set. The subclasses keep fairseq's attribute
names (``self_attn_layer_norm``, ``encoder_attn_layer_norm``, ``final_layer_norm``) so that
checkpoints stay legible and a LayerNorm checkpoint of fairseq's own ``transformer`` loads
unchanged.

fairseq's optional NormFormer extras (``scale_attn``, ``scale_heads``, ``scale_fc``,
``scale_resids``) and ``cross_self_attention`` are rejected at construction instead of being
carried along untested: their extra LayerNorms would get no padding mask.
"""

from __future__ import annotations

from fairseq.modules.transformer_layer import (
    TransformerDecoderLayerBase,
    TransformerEncoderLayerBase,
)
from torch import Tensor, nn

from .multilinear_attention import build_multilinear_attention
from .norm_factory import build_site_norm
from .padding_mask import attach_padding_mask, padding_mask_for_norms

_UNSUPPORTED_DECODER_OPTIONS = (
    "cross_self_attention",
    "scale_attn",
    "scale_heads",
    "scale_fc",
    "scale_resids",
)


class TransformerPNEncoderLayer(TransformerEncoderLayerBase):
    """Encoder layer with configurable norms (see :mod:`powernorm_fairseq.models.pn_config`).

    Args:
        cfg: a :class:`~powernorm_fairseq.models.pn_config.TransformerPNConfig`.
        return_fc: also return the FFN output before dropout (fairseq's option).

    Shape:
        - x: ``(T, B, C)``; encoder_padding_mask: ``(B, T)`` bool, True = pad, or None.
        - output: ``(T, B, C)``.
    """

    def __init__(self, cfg, return_fc: bool = False):
        super().__init__(cfg, return_fc=return_fc)
        # fairseq has no hook for the norms; the LayerNorms it built are replaced under the same
        # names (module order, hence state-dict order, is unchanged).
        self.self_attn_layer_norm = self.build_norm(cfg, "self_attn")
        self.final_layer_norm = self.build_norm(cfg, "ffn")

    def build_norm(self, cfg, site: str) -> nn.Module:
        """The norm of ``site`` (``self_attn`` or ``ffn``) of this layer, fed the padding mask."""
        norm = build_site_norm(cfg, "encoder", site, self.embed_dim, cfg.encoder.attention_heads)
        return attach_padding_mask(norm)

    def forward(
        self,
        x: Tensor,
        encoder_padding_mask: Tensor | None,
        attn_mask: Tensor | None = None,
    ):
        """fairseq's self-attention and FFN blocks, both norms receiving ``encoder_padding_mask``.

        Args:
            x: ``(T, B, C)``.
            encoder_padding_mask: ``(B, T)``, True = pad, or None when the batch has no pad.
            attn_mask: ``(T, T)`` positions not to attend to (nonzero = masked), or None.
        """
        with padding_mask_for_norms(encoder_padding_mask):
            return super().forward(x, encoder_padding_mask, attn_mask)


class TransformerPNDecoderLayer(TransformerDecoderLayerBase):
    """Decoder layer with configurable norms (see :mod:`powernorm_fairseq.models.pn_config`).

    All three norms of the layer receive the decoder's self-attention padding mask (the target
    side's pads). In incremental decoding there is one new position per step and no mask; norms
    are in eval mode there and use their running statistics, so the mask would not matter.

    Args:
        cfg: a :class:`~powernorm_fairseq.models.pn_config.TransformerPNConfig`.
        no_encoder_attn: decoder-only (language model) layer without encoder attention.
        add_bias_kv, add_zero_attn: fairseq's self-attention options.

    Shape:
        - x: ``(T, B, C)``; encoder_out: ``(S, B, C_enc)``; encoder_padding_mask: ``(B, S)``;
          self_attn_padding_mask: ``(B, T)``, True = pad, or None.
        - output: ``(T, B, C)``, the attention weights (or None) and None.
    """

    def __init__(self, cfg, no_encoder_attn=False, add_bias_kv=False, add_zero_attn=False):
        for option in _UNSUPPORTED_DECODER_OPTIONS:
            if getattr(cfg, option, False):
                raise ValueError(
                    f"transformer_pn/transformer_lm_pn do not support --{option.replace('_', '-')}; "
                    "remove it from the command line or config"
                )
        super().__init__(
            cfg, no_encoder_attn=no_encoder_attn, add_bias_kv=add_bias_kv, add_zero_attn=add_zero_attn
        )
        self.self_attn_layer_norm = self.build_norm(cfg, "self_attn")
        if self.encoder_attn is not None:
            self.encoder_attn_layer_norm = self.build_norm(cfg, "cross_attn")
        self.final_layer_norm = self.build_norm(cfg, "ffn")

    def build_norm(self, cfg, site: str) -> nn.Module:
        """The norm of ``site`` (``self_attn``, ``cross_attn`` or ``ffn``) of this layer, fed the
        padding mask."""
        norm = build_site_norm(cfg, "decoder", site, self.embed_dim, cfg.decoder.attention_heads)
        return attach_padding_mask(norm)

    def build_self_attention(self, embed_dim, cfg, add_bias_kv=False, add_zero_attn=False):
        """fairseq's multi-head attention, or multi-linear attention for
        ``--self-attention multilinear`` (language model only, see ``SelfAttentionOptions``)."""
        if str(getattr(cfg, "self_attention", "standard")) == "multilinear":
            return build_multilinear_attention(cfg, embed_dim)
        return super().build_self_attention(embed_dim, cfg, add_bias_kv, add_zero_attn)

    def prepare_for_onnx_export_(self):
        raise NotImplementedError("ONNX export of transformer_pn decoder layers is not supported")

    def forward(
        self,
        x: Tensor,
        encoder_out: Tensor | None = None,
        encoder_padding_mask: Tensor | None = None,
        incremental_state: dict[str, dict[str, Tensor | None]] | None = None,
        prev_self_attn_state: list[Tensor] | None = None,
        prev_attn_state: list[Tensor] | None = None,
        self_attn_mask: Tensor | None = None,
        self_attn_padding_mask: Tensor | None = None,
        need_attn: bool = False,
        need_head_weights: bool = False,
    ):
        """fairseq's self-attention, encoder attention and FFN blocks (its arguments and outputs),
        every norm receiving ``self_attn_padding_mask``.

        Returns:
            ``(x, attn, None)``: the output ``(T, B, C)`` and the encoder-attention weights when
            requested (averaged over heads unless ``need_head_weights``).
        """
        with padding_mask_for_norms(self_attn_padding_mask):
            return super().forward(
                x,
                encoder_out,
                encoder_padding_mask,
                incremental_state,
                prev_self_attn_state,
                prev_attn_state,
                self_attn_mask,
                self_attn_padding_mask,
                need_attn,
                need_head_weights,
            )
