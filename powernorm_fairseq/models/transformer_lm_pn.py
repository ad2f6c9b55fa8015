"""``transformer_lm_pn``: fairseq's decoder-only Transformer LM with a norm choice per site.

Usage::

    fairseq-train DATA_BIN --task language_modeling --user-dir powernorm_fairseq \
        --arch transformer_lm_pn_ptb --decoder-norm power --pn-warmup-updates 4000 ...

The paper's language-model rows (PTB, WikiText-103) used the *tensorized* Transformer of Ma et al.
2019 (multi-linear attention via Block-Term decomposition). ``--self-attention multilinear``
selects that attention (:mod:`powernorm_fairseq.modules.multilinear_attention`), and the
architecture ``transformer_lm_pn_tensorized_ptb`` is the paper's PTB model; by default the model
is fairseq's standard pre-norm Transformer LM.
"""

# fairseq reads the dataclass field types at runtime and recognizes only ``typing.Optional``:
# no ``from __future__ import annotations`` and no ``X | None`` here.
# ruff: noqa: UP045
from dataclasses import dataclass, field

from fairseq import options
from fairseq.models import register_model, register_model_architecture
from fairseq.models.transformer_lm import (
    DEFAULT_MAX_TARGET_POSITIONS,
    TransformerLanguageModel,
    TransformerLanguageModelConfig,
    base_lm_architecture,
    transformer_lm_baevski_wiki103,
)
from fairseq.modules import AdaptiveInput
from fairseq.utils import safe_getattr

from powernorm_fairseq import compat
from powernorm_fairseq.modules import TransformerPNDecoder
from powernorm_fairseq.modules.norm_factory import norm_fields

from .pn_config import (
    PowerNormOptions,
    SelfAttentionOptions,
    TransformerLMPNModelConfig,
    add_range_checks,
    check_norm_options,
    with_norm_sites,
)
from .tracking import NormTrackingMixin
from .transformer_pn import fill_norm_defaults

_LM_NORM_FIELDS = norm_fields(("decoder",), language_model=True)


@dataclass
@with_norm_sites("decoder", prefix="decoder_", language_model=True)
class TransformerLMPNConfig(
    TransformerLanguageModelConfig, PowerNormOptions, SelfAttentionOptions
):
    """fairseq's :class:`TransformerLanguageModelConfig` with the decoder's norm options
    (``--decoder-norm`` and its sites, declared with the translation model's:
    :func:`~powernorm_fairseq.models.pn_config.norm_site_fields`) and the choice of
    self-attention."""

    decoder_normalize_before: bool = field(
        default=True,
        metadata={"help": "pre-norm: normalize the input of each block (the paper's placement)"},
    )


@register_model("transformer_lm_pn", dataclass=TransformerLMPNConfig)
class TransformerLanguageModelPN(NormTrackingMixin, TransformerLanguageModel):
    """Pre-norm Transformer language model with configurable normalization layers.

    The paper used a tensorized Transformer (Ma et al. 2019) for its language-model results:
    ``--self-attention multilinear`` (see the module docstring).

    Args:
        decoder: a :class:`~powernorm_fairseq.modules.TransformerPNDecoder` built with
            ``no_encoder_attn=True``.
    """

    default_tracked_layer = "decoder.layers.0.self_attn_layer_norm"

    def __init__(self, decoder):
        super().__init__(decoder)
        self._init_norm_tracking(decoder.cfg)

    @classmethod
    def add_args(cls, parser):
        """fairseq's LM options and the norm options, numeric ones range-checked."""
        super().add_args(parser)
        add_range_checks(parser)

    @classmethod
    def build_model(cls, args, task):
        """fairseq's ``TransformerLanguageModel.build_model`` with the PN decoder."""
        compat.plugin_model_built()  # its batching keeps every sentence (compat item 3)
        check_norm_options(args, _LM_NORM_FIELDS)  # hydra skips argparse and the arch functions
        if args.decoder_layers_to_keep:
            args.decoder_layers = len(args.decoder_layers_to_keep.split(","))
        if safe_getattr(args, "max_target_positions", None) is None:
            args.max_target_positions = safe_getattr(
                args, "tokens_per_sample", DEFAULT_MAX_TARGET_POSITIONS
            )
        if args.character_embeddings:
            raise ValueError("transformer_lm_pn does not support --character-embeddings")

        if args.adaptive_input:
            embed_tokens = AdaptiveInput(
                len(task.source_dictionary),
                task.source_dictionary.pad(),
                args.decoder_input_dim,
                args.adaptive_input_factor,
                args.decoder_embed_dim,
                options.eval_str_list(args.adaptive_input_cutoff, type=int),
                args.quant_noise_pq,
                args.quant_noise_pq_block_size,
            )
        else:
            embed_tokens = cls.build_embedding(args, task.source_dictionary, args.decoder_input_dim)

        if args.tie_adaptive_weights and not (
            args.adaptive_input
            and args.adaptive_input_factor == args.adaptive_softmax_factor
            and args.adaptive_softmax_cutoff == args.adaptive_input_cutoff
            and args.decoder_input_dim == args.decoder_output_dim
        ):
            raise ValueError(
                "--tie-adaptive-weights needs --adaptive-input with the same factor and cutoff "
                "as the adaptive softmax and --decoder-input-dim == --decoder-output-dim"
            )

        cfg = TransformerLMPNModelConfig.from_namespace(args)
        decoder = TransformerPNDecoder(cfg, task.target_dictionary, embed_tokens, no_encoder_attn=True)
        return cls(decoder)


def _apply_lm_architecture(args, fairseq_arch) -> None:
    """Run fairseq's LM architecture function ``fairseq_arch`` without its legacy final-norm rule.

    fairseq's ``base_lm_architecture`` reads a legacy boolean ``decoder_final_norm`` and sets
    ``no_decoder_final_norm = not decoder_final_norm``. Here ``decoder_final_norm`` is the *kind*
    of the output norm (``--decoder-final-norm power``), so that rule would switch on an output
    norm the architecture does not have (``transformer_lm_pn_wiki103``). Whether the site exists
    stays ``--no-decoder-final-norm``'s (and the architecture's) decision; giving a kind for a
    site that does not exist is an error.
    """
    from powernorm_fairseq.compat import OptionError

    fill_norm_defaults(args, _LM_NORM_FIELDS)
    kind, args.decoder_final_norm = args.decoder_final_norm, None
    fairseq_arch(args)
    args.decoder_final_norm = kind
    check_norm_options(args, _LM_NORM_FIELDS)  # at parsing: needs the sizes the arch sets
    if kind is not None and args.no_decoder_final_norm:
        raise OptionError(
            f"--decoder-final-norm {kind} (hydra: model.decoder_final_norm): this model has no "
            "decoder output norm (--no-decoder-final-norm, set by transformer_lm_pn_wiki103 as by "
            "fairseq's transformer_lm_wiki103); drop the option, or use an architecture with one")


@register_model_architecture("transformer_lm_pn", "transformer_lm_pn_base")
def transformer_lm_pn_base(args):
    """fairseq's base LM (pre-norm), LayerNorm at every site unless told otherwise."""
    _apply_lm_architecture(args, base_lm_architecture)


@register_model_architecture("transformer_lm_pn", "transformer_lm_pn_ptb")
def transformer_lm_pn_ptb(args):
    """Small LM for Penn Treebank's 0.9M training tokens.

    4 layers, d=256, FFN 1024, 4 heads, dropout 0.3, tied input/output embeddings, pre-norm.
    """
    args.decoder_embed_dim = safe_getattr(args, "decoder_embed_dim", 256)
    args.decoder_ffn_embed_dim = safe_getattr(args, "decoder_ffn_embed_dim", 1024)
    args.decoder_attention_heads = safe_getattr(args, "decoder_attention_heads", 4)
    args.decoder_layers = safe_getattr(args, "decoder_layers", 4)
    args.dropout = safe_getattr(args, "dropout", 0.3)
    args.share_decoder_input_output_embed = safe_getattr(
        args, "share_decoder_input_output_embed", True
    )
    transformer_lm_pn_base(args)


@register_model_architecture("transformer_lm_pn", "transformer_lm_pn_wiki103")
def transformer_lm_pn_wiki103(args):
    """fairseq's ``transformer_lm_wiki103`` (Baevski & Auli 2019: 16 layers, d=1024, adaptive
    input and softmax with cutoffs 20000,60000, tied adaptive weights, no final norm).

    Train it with ``--criterion adaptive_loss`` (its adaptive softmax has no plain output
    projection) and ``--ddp-backend legacy_ddp`` (adaptive softmax leaves parameters without
    gradient on some steps, which the default c10d DDP rejects), as ``configs/wikitext103_*.yaml``.
    """
    _apply_lm_architecture(args, transformer_lm_baevski_wiki103)


@register_model_architecture("transformer_lm_pn", "transformer_lm_pn_tiny")
def transformer_lm_pn_tiny(args):
    """Tiny LM for tests and the quickstart: 2 layers, d=64, FFN 128, 4 heads, pre-norm."""
    args.decoder_embed_dim = safe_getattr(args, "decoder_embed_dim", 64)
    args.decoder_ffn_embed_dim = safe_getattr(args, "decoder_ffn_embed_dim", 128)
    args.decoder_attention_heads = safe_getattr(args, "decoder_attention_heads", 4)
    args.decoder_layers = safe_getattr(args, "decoder_layers", 2)
    transformer_lm_pn_base(args)


@register_model_architecture("transformer_lm_pn", "transformer_lm_pn_tensorized_ptb")
def transformer_lm_pn_tensorized_ptb(args):
    """The Tensorized Transformer LM ("1core") at the PTB setting of the authors' ``run_ptb.sh``.

    3 layers, d=256, FFN 2100, multi-linear self-attention with 1 core of rank 40 (the script's
    ``n_head 1 x d_head 40``), N = 32 positions (``tgt_len 32, mem_len 0``), dropout 0.1, no
    attention dropout, tied input/output embeddings (the script's default), pre-norm (the
    project's placement; the script's default is post-norm). Train with
    ``--tokens-per-sample 32`` (longer sequences are rejected: ``W^O`` covers 32 positions).
    """
    args.decoder_embed_dim = safe_getattr(args, "decoder_embed_dim", 256)
    args.decoder_ffn_embed_dim = safe_getattr(args, "decoder_ffn_embed_dim", 2100)
    args.decoder_layers = safe_getattr(args, "decoder_layers", 3)
    args.decoder_attention_heads = safe_getattr(args, "decoder_attention_heads", 1)
    args.dropout = safe_getattr(args, "dropout", 0.1)
    args.attention_dropout = safe_getattr(args, "attention_dropout", 0.0)
    args.activation_fn = safe_getattr(args, "activation_fn", "relu")
    args.self_attention = safe_getattr(args, "self_attention", "multilinear")
    args.multilinear_cores = safe_getattr(args, "multilinear_cores", 1)
    args.multilinear_rank = safe_getattr(args, "multilinear_rank", 40)
    args.max_target_positions = safe_getattr(args, "max_target_positions", 32)
    args.share_decoder_input_output_embed = safe_getattr(
        args, "share_decoder_input_output_embed", True
    )
    transformer_lm_pn_base(args)
