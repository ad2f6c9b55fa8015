"""fairseq layer and stack subclasses whose norms are built per site and receive the padding mask."""

from .multilinear_attention import MultilinearAttention
from .norm_factory import SITES, build_site_norm, site_norm_name
from .transformer_layer import TransformerPNDecoderLayer, TransformerPNEncoderLayer
from .transformer_stack import TransformerPNDecoder, TransformerPNEncoder

__all__ = [
    "MultilinearAttention",
    "SITES",
    "TransformerPNDecoder",
    "TransformerPNDecoderLayer",
    "TransformerPNEncoder",
    "TransformerPNEncoderLayer",
    "build_site_norm",
    "site_norm_name",
]
