"""``transformer_pn``: fairseq's Transformer with LayerNorm, BatchNorm, PN-V or PowerNorm per site.

Usage::

    fairseq-train DATA_BIN --user-dir powernorm_fairseq --arch transformer_pn_iwslt_de_en \
        --encoder-norm power --decoder-norm layer --pn-warmup-updates 8000 ...

The model is fairseq's :class:`~fairseq.models.transformer.TransformerModel` (same embeddings,
attention, parameter names and checkpoint layout) with every norm chosen by the options of
:mod:`powernorm_fairseq.models.pn_config` and called with the padding mask. With LayerNorm at every
site it computes what fairseq's pre-norm ``transformer`` computes, and loads its checkpoints.
"""

from __future__ import annotations

from dataclasses import fields

from fairseq.dataclass.utils import gen_parser_from_dataclass
from fairseq.models import register_model, register_model_architecture
from fairseq.models.transformer import TransformerModel
from fairseq.models.transformer.transformer_legacy import base_architecture
from fairseq.utils import safe_getattr

from powernorm_fairseq import compat
from powernorm_fairseq.modules import TransformerPNDecoder, TransformerPNEncoder
from powernorm_fairseq.modules.norm_factory import norm_fields

from .pn_config import (
    PNDecoderConfig,
    PNEncoderConfig,
    PowerNormOptions,
    TransformerPNConfig,
    add_range_checks,
    check_norm_options,
)
from .tracking import NormTrackingMixin

_SIDE_CONFIGS = {"encoder": PNEncoderConfig, "decoder": PNDecoderConfig}
_NORM_FIELDS = norm_fields()


@register_model("transformer_pn")
class TransformerPNModel(NormTrackingMixin, TransformerModel):
    """Pre-norm Transformer (Vaswani et al. 2017) with configurable normalization layers.

    Reproduces the machine-translation models of "PowerNorm: Rethinking Batch Normalization in
    Transformers" (Shen et al., ICML 2020). Options: fairseq's transformer options plus
    ``--encoder-norm``, ``--decoder-norm``, the per-site ``--{encoder,decoder}-*-norm`` overrides
    and the ``--pn-*`` / ``--bn-*`` options (see :mod:`powernorm_fairseq.models.pn_config`).

    Args:
        cfg: a :class:`~powernorm_fairseq.models.pn_config.TransformerPNConfig`.
        encoder: a :class:`~powernorm_fairseq.modules.TransformerPNEncoder`.
        decoder: a :class:`~powernorm_fairseq.modules.TransformerPNDecoder`.
    """

    def __init__(self, cfg, encoder, decoder):
        super().__init__(cfg, encoder, decoder)
        self._init_norm_tracking(cfg)

    @classmethod
    def add_args(cls, parser):
        """Add fairseq's transformer options and the norm options to ``parser``."""
        # No defaults on the parser, so the architecture functions can fill them (fairseq's way).
        gen_parser_from_dataclass(parser, TransformerPNConfig(), delete_default=True, with_prefix="")
        add_range_checks(parser)

    @classmethod
    def build_model(cls, args, task):
        """Build the model from a flat namespace / DictConfig (command line, hydra, checkpoint)."""
        compat.plugin_model_built()  # its batching keeps every sentence (compat item 3)
        transformer_pn_base_architecture(args)  # checks the norm options (hydra skips argparse)
        cfg = TransformerPNConfig.from_namespace(args)
        # TransformerModel.build_model would rebuild the config as a plain TransformerConfig;
        # its parent's build_model takes the config as given.
        return super(TransformerModel, cls).build_model(cfg, task)

    @classmethod
    def build_encoder(cls, cfg, src_dict, embed_tokens):
        return TransformerPNEncoder(cfg, src_dict, embed_tokens)

    @classmethod
    def build_decoder(cls, cfg, tgt_dict, embed_tokens):
        return TransformerPNDecoder(
            cfg, tgt_dict, embed_tokens, no_encoder_attn=cfg.no_cross_attention
        )


def fill_norm_defaults(args, norm_fields=None) -> None:
    """Set every norm option missing from ``args`` to its dataclass default (in place).

    Args:
        args: flat namespace or DictConfig of the model options.
        norm_fields: ``{side: (sub-config field, ...)}`` of the per-side norm options to fill
            (default: all of the encoder's and the decoder's).
    """
    defaults = {f.name: f.default for f in fields(PowerNormOptions)}
    for side, names in (norm_fields or _NORM_FIELDS).items():
        sub_defaults = {f.name: f.default for f in fields(_SIDE_CONFIGS[side])}
        defaults.update({f"{side}_{name}": sub_defaults[name] for name in names})
    for name, default in defaults.items():
        setattr(args, name, safe_getattr(args, name, default))


@register_model_architecture("transformer_pn", "transformer_pn")
def transformer_pn_base_architecture(args):
    """fairseq's base transformer, pre-norm, LayerNorm at every site unless told otherwise."""
    args.encoder_normalize_before = safe_getattr(args, "encoder_normalize_before", True)
    args.decoder_normalize_before = safe_getattr(args, "decoder_normalize_before", True)
    fill_norm_defaults(args)
    base_architecture(args)
    check_norm_options(args, _NORM_FIELDS)  # at parsing: needs the sizes the architecture sets


@register_model_architecture("transformer_pn", "transformer_pn_iwslt_de_en")
def transformer_pn_iwslt_de_en(args):
    """IWSLT14 De-En model of the paper (the released ``transformer_iwslt_de_en_v2``).

    6+6 layers, d=512, FFN 1024, 4 heads, shared embeddings (joined dictionary), dropout 0.3,
    attention and activation dropout 0.1, pre-norm.
    """
    args.encoder_embed_dim = safe_getattr(args, "encoder_embed_dim", 512)
    args.encoder_ffn_embed_dim = safe_getattr(args, "encoder_ffn_embed_dim", 1024)
    args.encoder_attention_heads = safe_getattr(args, "encoder_attention_heads", 4)
    args.encoder_layers = safe_getattr(args, "encoder_layers", 6)
    args.decoder_embed_dim = safe_getattr(args, "decoder_embed_dim", 512)
    args.decoder_ffn_embed_dim = safe_getattr(args, "decoder_ffn_embed_dim", 1024)
    args.decoder_attention_heads = safe_getattr(args, "decoder_attention_heads", 4)
    args.decoder_layers = safe_getattr(args, "decoder_layers", 6)
    args.share_all_embeddings = safe_getattr(args, "share_all_embeddings", True)
    args.dropout = safe_getattr(args, "dropout", 0.3)
    args.attention_dropout = safe_getattr(args, "attention_dropout", 0.1)
    args.activation_dropout = safe_getattr(args, "activation_dropout", 0.1)
    transformer_pn_base_architecture(args)


@register_model_architecture("transformer_pn", "transformer_pn_wmt_en_de_big")
def transformer_pn_wmt_en_de_big(args):
    """WMT14 En-De model of the paper (the released ``transformer_wmt_en_de_big_t2t``).

    6+6 layers, d=1024, FFN 4096, 16 heads, dropout 0.3, attention and activation dropout 0.1,
    pre-norm. The paper shares all embeddings (pass ``--share-all-embeddings`` with a joined
    dictionary; the preset does).
    """
    args.encoder_embed_dim = safe_getattr(args, "encoder_embed_dim", 1024)
    args.encoder_ffn_embed_dim = safe_getattr(args, "encoder_ffn_embed_dim", 4096)
    args.encoder_attention_heads = safe_getattr(args, "encoder_attention_heads", 16)
    args.decoder_embed_dim = safe_getattr(args, "decoder_embed_dim", 1024)
    args.decoder_ffn_embed_dim = safe_getattr(args, "decoder_ffn_embed_dim", 4096)
    args.decoder_attention_heads = safe_getattr(args, "decoder_attention_heads", 16)
    args.dropout = safe_getattr(args, "dropout", 0.3)
    args.attention_dropout = safe_getattr(args, "attention_dropout", 0.1)
    args.activation_dropout = safe_getattr(args, "activation_dropout", 0.1)
    transformer_pn_base_architecture(args)


@register_model_architecture("transformer_pn", "transformer_pn_multi30k")
def transformer_pn_multi30k(args):
    """Small model for Multi30k on a few CPU cores (not a paper setting): the model the campaign's
    records trained; the one place of its sizes (configs/base/multi30k.yaml names this architecture,
    and fairseq applies it when it builds the model from the preset).

    2+2 layers, d=128, FFN 512, 4 heads, shared embeddings (joined dictionary), dropout 0.3
    (attention and activation dropout 0.1), pre-norm.
    """
    args.encoder_embed_dim = safe_getattr(args, "encoder_embed_dim", 128)
    args.encoder_ffn_embed_dim = safe_getattr(args, "encoder_ffn_embed_dim", 512)
    args.encoder_attention_heads = safe_getattr(args, "encoder_attention_heads", 4)
    args.encoder_layers = safe_getattr(args, "encoder_layers", 2)
    args.decoder_embed_dim = safe_getattr(args, "decoder_embed_dim", 128)
    args.decoder_ffn_embed_dim = safe_getattr(args, "decoder_ffn_embed_dim", 512)
    args.decoder_attention_heads = safe_getattr(args, "decoder_attention_heads", 4)
    args.decoder_layers = safe_getattr(args, "decoder_layers", 2)
    args.share_all_embeddings = safe_getattr(args, "share_all_embeddings", True)
    args.dropout = safe_getattr(args, "dropout", 0.3)
    args.attention_dropout = safe_getattr(args, "attention_dropout", 0.1)
    args.activation_dropout = safe_getattr(args, "activation_dropout", 0.1)
    transformer_pn_base_architecture(args)


@register_model_architecture("transformer_pn", "transformer_pn_tiny")
def transformer_pn_tiny(args):
    """Tiny model for tests and the quickstart: 2+2 layers, d=64, FFN 128, 4 heads, pre-norm."""
    args.encoder_embed_dim = safe_getattr(args, "encoder_embed_dim", 64)
    args.encoder_ffn_embed_dim = safe_getattr(args, "encoder_ffn_embed_dim", 128)
    args.encoder_attention_heads = safe_getattr(args, "encoder_attention_heads", 4)
    args.encoder_layers = safe_getattr(args, "encoder_layers", 2)
    args.decoder_embed_dim = safe_getattr(args, "decoder_embed_dim", 64)
    args.decoder_ffn_embed_dim = safe_getattr(args, "decoder_ffn_embed_dim", 128)
    args.decoder_attention_heads = safe_getattr(args, "decoder_attention_heads", 4)
    args.decoder_layers = safe_getattr(args, "decoder_layers", 2)
    transformer_pn_base_architecture(args)
