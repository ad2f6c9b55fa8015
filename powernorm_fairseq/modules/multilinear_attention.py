"""Multi-linear attention (Ma et al. 2019, "A Tensorized Transformer for Language Modeling").

The self-attention of the Tensorized Transformer, the model of the PowerNorm paper's language-model
rows (Table 2), written from the paper's equations (arXiv 1906.09777, section 3):

* **Single-block attention** (Tucker form with a diagonal core). With factor matrices
  ``Q, K, V`` of shape ``(N, R)`` and a trainable core ``G`` of shape ``(R, R, R)`` that is zero off
  its diagonal (``G[r, r, r] = g[r]``)::

      Atten_TD(G; Q, K, V) = G x_1 Q x_2 K x_3 V,
      i.e. T[t, b, c] = sum_{i,j,m} G[i, j, m] Q[t, i] K[b, j] V[c, m]
                      = sum_r g[r] Q[t, r] K[b, r] V[c, r]           (an N x N x N tensor).

* **Multi-linear attention** (Block-Term decomposition): h blocks that share the factor matrices
  ``Q = X W^q, K = X W^k, V = X W^v`` (``W^*`` of shape ``(C, R)``) and have their own cores
  ``G_1 .. G_h``, averaged, then split and concatenated and projected::

      MultiLinear(G; Q, K, V) = SplitConcat((T_1 + ... + T_h) / h) W^O,
      SplitConcat(T)[t, b * N + c] = T[t, b, c]                       (N x N^2),

  with ``W^O`` of shape ``(N^2, C)``: the output at position t is
  ``sum_{b, c} T[t, b, c] W^O[b * N + c, :]``. There is no softmax and no scaling (the paper's
  equations have none; the authors' LM script neither).

Because the blocks share ``Q, K, V`` and their cores are diagonal, ``(T_1 + ... + T_h) / h`` is one
block whose diagonal is the mean of the h diagonals. The module keeps the h cores as parameters
(the paper's parametrization; each receives the same gradient) and computes one block with the
mean core, which costs one block instead of h. ``tests/test_multilinear_attention.py`` checks this
against a literal transcription that builds every full core tensor.

Choices where the paper is silent (``BTD-Transformer/transformer_upload.py`` of the authors'
repository szhangtju/The-compression-of-Transformer, read for reference only, is "the script"):

* **Causal mask and padding.** Key/value position b is *visible* to query t when the attention
  mask allows it and b is not a pad; a term ``T[t, b, c]`` counts only when both b and c are
  visible to t (the factor rows of invisible positions are zeroed for that query). The script
  builds a mask but never applies it, so there every position reads the tokens it predicts;
  this module applies it, so its perplexities are not comparable with the script's.
* **Positions.** ``W^O`` is indexed by absolute key/value positions, so the module covers at most
  ``max_positions`` = N positions (the script: ``tgt_len + mem_len``, 32 for PTB). A shorter
  sequence of length S uses the leading ``S x S`` block of ``W^O`` (its positions 0..S-1), so pads
  must come after the tokens (fairseq's language-modelling batches are right-padded).
* **Rank** R = the width of Q, K, V (the script: ``n_head * d_head`` = 40 for PTB, with one head).
* **No biases** on ``W^q, W^k, W^v, W^O`` (as the script). fairseq's Xavier-uniform initialization
  of the projections (gain 1/sqrt(2) for ``W^q, W^k, W^v``, as fairseq's ``MultiheadAttention``),
  and the script's ``N(0, 0.01)`` for the cores.
* No attention dropout (the script's ``dropatt`` is 0 and unused); the output dropout is the
  layer's residual dropout. The script's Transformer-XL relative-position terms (``r_w_bias``,
  ``r_r_bias``, ``r_net``) are not in the paper's equations and are left out: the model keeps
  fairseq's absolute position embeddings.

Incremental decoding: fairseq's language-model generation (``SequenceGenerator`` through
``fairseq-interactive`` / ``hub.sample``) runs the decoder one position at a time with an
``incremental_state``, so the module caches ``K``, ``V`` (and the padding mask) per layer as
fairseq's ``MultiheadAttention`` does, and reorders them for beam search. ``fairseq-eval-lm`` and
training do not use it.
"""

from __future__ import annotations

import logging
import math

import torch
from fairseq.incremental_decoding_utils import with_incremental_state
from torch import Tensor, nn

logger = logging.getLogger(__name__)


@with_incremental_state
class MultilinearAttention(nn.Module):
    """Multi-linear self-attention with ``num_cores`` diagonal cores sharing Q, K, V.

    Args:
        embed_dim: model width C.
        rank: R, the width of Q, K, V and the length of each core's diagonal.
        num_cores: h, the number of blocks (cores) averaged. Default: 1 (the paper's "1core").
        max_positions: N, the most key/value positions (the rows of ``W^O`` are ``N^2``).

    Shape:
        - query, key, value: ``(T, B, C)``, ``(S, B, C)``, ``(S, B, C)`` (self-attention: the same
          tensor; key and value must be the same tensor here).
        - key_padding_mask: ``(B, S)`` bool, True = pad, or None.
        - attn_mask: ``(T, S)``, nonzero (or True) = query t may not see key s, or None.
        - output: ``(T, B, C)`` and None (there are no attention weights to return).

    Example::

        >>> attn = MultilinearAttention(embed_dim=16, rank=4, num_cores=2, max_positions=8)
        >>> x = torch.randn(5, 3, 16)
        >>> future = torch.triu(torch.ones(5, 5, dtype=torch.bool), 1)
        >>> attn(x, x, x, attn_mask=future)[0].shape
        torch.Size([5, 3, 16])
    """

    def __init__(self, embed_dim: int, rank: int, num_cores: int = 1, max_positions: int = 32,
                 unmasked: bool = False):
        super().__init__()
        # the authors' behaviour (--multilinear-unmasked): the causal mask is built, never applied
        self.unmasked = bool(unmasked)
        sizes = {"rank": rank, "num_cores": num_cores, "max_positions": max_positions}
        for name, value in sizes.items():
            if int(value) < 1:
                raise ValueError(f"MultilinearAttention: {name} must be >= 1, got {value}")
        self.embed_dim = embed_dim
        self.rank = rank
        self.num_cores = num_cores
        self.max_positions = max_positions
        # fairseq's decoder layer reads these two attributes of its self-attention.
        self.num_heads = num_cores
        self.head_dim = rank
        self.q_proj = nn.Linear(embed_dim, rank, bias=False)
        self.k_proj = nn.Linear(embed_dim, rank, bias=False)
        self.v_proj = nn.Linear(embed_dim, rank, bias=False)
        self.core = nn.Parameter(torch.empty(num_cores, rank))
        self.out_proj = nn.Linear(max_positions * max_positions, embed_dim, bias=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for proj in (self.q_proj, self.k_proj, self.v_proj):
            nn.init.xavier_uniform_(proj.weight, gain=1 / math.sqrt(2))
        nn.init.xavier_uniform_(self.out_proj.weight)
        nn.init.normal_(self.core, mean=0.0, std=0.01)

    def extra_repr(self) -> str:
        return (f"rank={self.rank}, num_cores={self.num_cores}, max_positions={self.max_positions}"
                + (", unmasked=True" if self.unmasked else ""))

    def forward(
        self,
        query: Tensor,
        key: Tensor | None,
        value: Tensor | None,
        key_padding_mask: Tensor | None = None,
        incremental_state: dict[str, dict[str, Tensor | None]] | None = None,
        need_weights: bool = False,
        static_kv: bool = False,
        attn_mask: Tensor | None = None,
        before_softmax: bool = False,
        need_head_weights: bool = False,
    ) -> tuple[Tensor, None]:
        """``SplitConcat(mean_j T_j) W^O`` with the visibility rule of the module docstring.

        The arguments are those of fairseq's ``MultiheadAttention`` (what its decoder layer
        passes); ``static_kv``, ``before_softmax`` and ``need_head_weights`` (encoder attention,
        attention weights) do not apply to multi-linear self-attention and must stay off.
        In incremental decoding ``query`` is the newest position and ``attn_mask`` is None.
        """
        if static_kv or before_softmax or need_head_weights:
            raise ValueError(
                "MultilinearAttention is self-attention only: static_kv, before_softmax and "
                "need_head_weights are not supported"
            )
        if key is not None and key is not query or value is not None and value is not query:
            raise ValueError("MultilinearAttention is self-attention: key and value must be query")
        k = self.k_proj(query).transpose(0, 1)  # (B, T, R)
        v = self.v_proj(query).transpose(0, 1)
        if incremental_state is not None:
            k, v, key_padding_mask = self._extend_cache(incremental_state, k, v, key_padding_mask)
        num_keys = k.size(1)
        if num_keys > self.max_positions:
            raise ValueError(
                f"multi-linear attention covers at most {self.max_positions} positions (its "
                f"output projection W^O has {self.max_positions}^2 rows: --max-target-positions, "
                f"by default --tokens-per-sample, at training), got {num_keys}; use sequences of "
                f"at most {self.max_positions} tokens (--tokens-per-sample, --context-window)"
            )
        if self.unmasked:  # every position reads every other, the ones it predicts included
            attn_mask = None
        q = self.q_proj(query).transpose(0, 1) * self.core.mean(dim=0)  # (B, T, R): Q diag(g)
        visible = self._visible(q.size(1), num_keys, attn_mask, key_padding_mask, q)
        # (B, T, S, R) x (B, 1, R, S) -> T[n, t, b, c] = sum_r g_r Q[t, r] K[b, r] V[c, r]
        tensor = (q.unsqueeze(2) * k.unsqueeze(1)) @ v.transpose(1, 2).unsqueeze(1)
        if visible is not None:
            tensor = tensor * (visible.unsqueeze(-1) * visible.unsqueeze(-2))
        weight = self.out_proj.weight.view(self.embed_dim, self.max_positions, self.max_positions)
        weight = weight[:, :num_keys, :num_keys].reshape(self.embed_dim, num_keys * num_keys)
        out = tensor.flatten(2) @ weight.t()  # (B, T, S^2) x (S^2, C): SplitConcat(.) W^O
        return out.transpose(0, 1), None

    @staticmethod
    def _visible(
        num_queries: int,
        num_keys: int,
        attn_mask: Tensor | None,
        key_padding_mask: Tensor | None,
        like: Tensor,
    ) -> Tensor | None:
        """``(B or 1, T, S)`` with 1 where key s is visible to query t, or None (all visible)."""
        visible = None
        if attn_mask is not None:
            if attn_mask.shape != (num_queries, num_keys):
                raise ValueError(
                    f"attn_mask must be (T, S) = ({num_queries}, {num_keys}), got "
                    f"{tuple(attn_mask.shape)}"
                )
            visible = (attn_mask == 0).to(like.dtype).unsqueeze(0)
        if key_padding_mask is not None:
            keys = (~key_padding_mask.to(torch.bool)).to(like.dtype).unsqueeze(1)  # (B, 1, S)
            visible = keys if visible is None else visible * keys
        return visible

    def _extend_cache(
        self,
        incremental_state: dict[str, dict[str, Tensor | None]],
        k: Tensor,
        v: Tensor,
        key_padding_mask: Tensor | None,
    ) -> tuple[Tensor, Tensor, Tensor | None]:
        """Append this step's K, V ``(B, 1, R)`` (and pads) to the cache; return the full ones."""
        saved = self._get_input_buffer(incremental_state)
        prev_k, prev_v = saved.get("prev_key"), saved.get("prev_value")
        prev_mask = saved.get("prev_key_padding_mask")
        if prev_k is not None and prev_v is not None:
            batch, steps = prev_k.size(0), prev_k.size(1)
            if key_padding_mask is not None or prev_mask is not None:
                if prev_mask is None:
                    prev_mask = k.new_zeros(batch, steps, dtype=torch.bool)
                if key_padding_mask is None:
                    key_padding_mask = k.new_zeros(batch, k.size(1), dtype=torch.bool)
                key_padding_mask = torch.cat([prev_mask, key_padding_mask.to(torch.bool)], dim=1)
            k = torch.cat([prev_k, k], dim=1)
            v = torch.cat([prev_v, v], dim=1)
        saved = {"prev_key": k, "prev_value": v, "prev_key_padding_mask": key_padding_mask}
        self._set_input_buffer(incremental_state, saved)
        return k, v, key_padding_mask

    def _get_input_buffer(
        self, incremental_state: dict[str, dict[str, Tensor | None]] | None
    ) -> dict[str, Tensor | None]:
        """The cached ``prev_key``/``prev_value`` ``(B, S, R)`` and ``prev_key_padding_mask``."""
        result = self.get_incremental_state(incremental_state, "attn_state")
        return {} if result is None else result

    def _set_input_buffer(
        self,
        incremental_state: dict[str, dict[str, Tensor | None]],
        buffer: dict[str, Tensor | None],
    ):
        return self.set_incremental_state(incremental_state, "attn_state", buffer)

    def reorder_incremental_state(
        self, incremental_state: dict[str, dict[str, Tensor | None]], new_order: Tensor
    ):
        """Select the cached hypotheses ``new_order`` (beam search), as fairseq's attention."""
        saved = self._get_input_buffer(incremental_state)
        if saved:
            for name, cached in saved.items():
                if cached is not None:
                    saved[name] = cached.index_select(0, new_order)
            incremental_state = self._set_input_buffer(incremental_state, saved)
        return incremental_state


def build_multilinear_attention(cfg, embed_dim: int) -> MultilinearAttention:
    """The decoder self-attention of the Tensorized Transformer from a model config.

    Reads ``cfg.multilinear_rank`` (-1 = ``embed_dim // decoder.attention_heads``, the width of one
    standard attention head), ``cfg.multilinear_cores`` and ``cfg.max_target_positions`` (N).

    Raises:
        ValueError: for options that multi-linear attention would otherwise ignore
            (``--attention-dropout``, ``--quant-noise-pq``) or a missing ``max_target_positions``.
    """
    rank = int(cfg.multilinear_rank)
    if rank == -1:
        rank = embed_dim // cfg.decoder.attention_heads
    if float(cfg.attention_dropout) > 0:
        raise ValueError(
            "--self-attention multilinear has no attention weights to drop: set "
            "--attention-dropout 0 (the output dropout is --dropout)"
        )
    if float(cfg.quant_noise.pq) > 0:
        raise ValueError("--self-attention multilinear does not support --quant-noise-pq")
    if cfg.max_target_positions is None:
        raise ValueError("--self-attention multilinear needs --max-target-positions (N)")
    unmasked = bool(getattr(cfg, "multilinear_unmasked", False))
    if unmasked and not _WARNED_UNMASKED:
        _WARNED_UNMASKED.append(True)
        logger.warning(
            "--multilinear-unmasked: the multi-linear attention does not apply its causal mask, as "
            "the Tensorized Transformer authors' script: every position sees the tokens it predicts, "
            "so the perplexity measures a leak (powernorm_fairseq.analysis.leak measures it)")
    return MultilinearAttention(
        embed_dim, rank, int(cfg.multilinear_cores), int(cfg.max_target_positions), unmasked
    )


_WARNED_UNMASKED: list = []  # once a process
