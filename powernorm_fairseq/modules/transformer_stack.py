"""fairseq transformer encoder and decoder built from the PN layers, with a masked output norm.

The stacks differ from fairseq's in three places only: the layer factory hooks build
:class:`~powernorm_fairseq.modules.transformer_layer.TransformerPNEncoderLayer` /
``TransformerPNDecoderLayer``, the output norm (``layer_norm``, present in pre-norm models) is built
by the site factory, and the forward passes hand the padding mask to that output norm. The forward
passes are fairseq's (``forward_scriptable`` / ``extract_features_scriptable``) otherwise.
"""

from __future__ import annotations

import torch
from fairseq.distributed import fsdp_wrap
from fairseq.models.transformer import TransformerDecoderBase, TransformerEncoderBase
from fairseq.modules.checkpoint_activations import checkpoint_wrapper
from torch import Tensor, nn

from .norm_factory import build_site_norm
from .transformer_layer import TransformerPNDecoderLayer, TransformerPNEncoderLayer


def _wrap_layer(layer: nn.Module, cfg) -> nn.Module:
    # fairseq's activation checkpointing and FSDP wrapping, as in its build_*_layer.
    checkpoint = cfg.checkpoint_activations
    if checkpoint:
        layer = checkpoint_wrapper(layer, offload_to_cpu=cfg.offload_activations)
    return fsdp_wrap(layer, min_num_params=cfg.min_params_to_wrap if not checkpoint else 0)


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
            self.layer_norm = build_site_norm(
                cfg, "encoder", "final", embed_tokens.embedding_dim, cfg.encoder.attention_heads
            )

    def build_encoder_layer(self, cfg):
        return _wrap_layer(TransformerPNEncoderLayer(cfg, return_fc=self.return_fc), cfg)

    def forward_scriptable(
        self,
        src_tokens: Tensor,
        src_lengths: Tensor | None = None,
        return_all_hiddens: bool = False,
        token_embeddings: Tensor | None = None,
    ):
        """fairseq's encoder forward with the padding mask passed to the output norm.

        Args:
            src_tokens: ``(B, S)`` token ids; src_lengths: ``(B,)`` (unused, as in fairseq).
            return_all_hiddens: also return every layer's output.
            token_embeddings: precomputed ``(B, S, C)`` token embeddings, or None.

        Returns:
            fairseq's encoder-output dict (``encoder_out``: ``[(S, B, C)]``,
            ``encoder_padding_mask``: ``[(B, S)]``, ...).
        """
        encoder_padding_mask = src_tokens.eq(self.padding_idx)
        has_pads = bool(encoder_padding_mask.any())
        layer_mask = encoder_padding_mask if has_pads else None

        x, encoder_embedding = self.forward_embedding(src_tokens, token_embeddings)
        if has_pads:
            x = x * (1 - encoder_padding_mask.unsqueeze(-1).type_as(x))
        x = x.transpose(0, 1)  # B x T x C -> T x B x C

        encoder_states = [x] if return_all_hiddens else []
        fc_results = []
        for layer in self.layers:
            out = layer(x, encoder_padding_mask=layer_mask)
            x, fc_result = out if isinstance(out, tuple) and len(out) == 2 else (out, None)
            if return_all_hiddens:
                encoder_states.append(x)
                fc_results.append(fc_result)

        if self.layer_norm is not None:
            x = self.layer_norm(x, layer_mask)

        src_lengths = (
            src_tokens.ne(self.padding_idx).sum(dim=1, dtype=torch.int32).reshape(-1, 1).contiguous()
        )
        return {
            "encoder_out": [x],  # T x B x C
            "encoder_padding_mask": [encoder_padding_mask],  # B x T
            "encoder_embedding": [encoder_embedding],  # B x T x C
            "encoder_states": encoder_states,  # List[T x B x C]
            "fc_results": fc_results,  # List[T x B x C]
            "src_tokens": [],
            "src_lengths": [src_lengths],
        }


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
            self.layer_norm = build_site_norm(
                cfg, "decoder", "final", self.embed_dim, cfg.decoder.attention_heads
            )

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
        """fairseq's decoder feature pass with the target padding mask passed to the output norm.

        Args:
            prev_output_tokens: ``(B, T)`` previous target tokens (teacher forcing).
            encoder_out: the encoder's output dict, or None for a language model.
            incremental_state: fairseq's decoding cache; when given only the last position is run.
            full_context_alignment: do not apply the causal mask.
            alignment_layer, alignment_heads: which layer/heads to average attention over.

        Returns:
            ``(x, extra)``: features ``(B, T, C_out)`` and ``{"attn": [...], "inner_states": [...]}``.
        """
        if alignment_layer is None:
            alignment_layer = self.num_layers - 1

        enc: Tensor | None = None
        padding_mask: Tensor | None = None
        if encoder_out is not None and len(encoder_out["encoder_out"]) > 0:
            enc = encoder_out["encoder_out"][0]
        if encoder_out is not None and len(encoder_out["encoder_padding_mask"]) > 0:
            padding_mask = encoder_out["encoder_padding_mask"][0]

        positions = None
        if self.embed_positions is not None:
            positions = self.embed_positions(prev_output_tokens, incremental_state=incremental_state)
        if incremental_state is not None:
            prev_output_tokens = prev_output_tokens[:, -1:]
            if positions is not None:
                positions = positions[:, -1:]

        prev_output_tokens = prev_output_tokens.contiguous()
        x = self.embed_scale * self.embed_tokens(prev_output_tokens)
        if self.quant_noise is not None:
            x = self.quant_noise(x)
        if self.project_in_dim is not None:
            x = self.project_in_dim(x)
        if positions is not None:
            x += positions
        if self.layernorm_embedding is not None:
            x = self.layernorm_embedding(x)
        x = self.dropout_module(x)
        x = x.transpose(0, 1)  # B x T x C -> T x B x C

        self_attn_padding_mask: Tensor | None = None
        if prev_output_tokens.eq(self.padding_idx).any():
            self_attn_padding_mask = prev_output_tokens.eq(self.padding_idx)

        attn: Tensor | None = None
        inner_states: list[Tensor | None] = [x]
        for idx, layer in enumerate(self.layers):
            if incremental_state is None and not full_context_alignment:
                self_attn_mask = self.buffered_future_mask(x)
            else:
                self_attn_mask = None
            x, layer_attn, _ = layer(
                x,
                enc,
                padding_mask,
                incremental_state,
                self_attn_mask=self_attn_mask,
                self_attn_padding_mask=self_attn_padding_mask,
                need_attn=bool(idx == alignment_layer),
                need_head_weights=bool(idx == alignment_layer),
            )
            inner_states.append(x)
            if layer_attn is not None and idx == alignment_layer:
                attn = layer_attn.float().to(x)

        if attn is not None:
            if alignment_heads is not None:
                attn = attn[:alignment_heads]
            attn = attn.mean(dim=0)  # average over heads

        if self.layer_norm is not None:
            x = self.layer_norm(x, self_attn_padding_mask)
        x = x.transpose(0, 1)  # T x B x C -> B x T x C
        if self.project_out_dim is not None:
            x = self.project_out_dim(x)
        return x, {"attn": [attn], "inner_states": inner_states}
