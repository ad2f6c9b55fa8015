"""Multi-linear attention (Tensorized Transformer) against a literal transcription of the paper.

The naive version builds every block's full ``R x R x R`` core tensor, applies the Tucker product
``G x_1 Q x_2 K x_3 V`` with einsum, averages the blocks, splits the ``N x N x N`` tensor along its
first mode and concatenates each slice into a row of ``N^2`` entries, and multiplies by ``W^O``.
Masking is applied literally too: for query t, the rows of K and V at positions t may not see are
set to zero before the product.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("fairseq")

from powernorm_fairseq.modules.multilinear_attention import MultilinearAttention  # noqa: E402

# Shapes of the float64 checks: T = S = 5 positions of a module sized for N = 7 (so W^O is sliced),
# batch B = 3, width C = 6, rank R = 4, h = 3 cores.
T, B, C, R, H, N = 5, 3, 6, 4, 3, 7


def naive(attn: MultilinearAttention, x, visible) -> torch.Tensor:
    """``(T, B, C)`` output from the paper's equations; ``visible``: ``(B, T, S)`` 0/1."""
    n_max = attn.max_positions
    wq, wk, wv = attn.q_proj.weight.t(), attn.k_proj.weight.t(), attn.v_proj.weight.t()
    w_o = attn.out_proj.weight.t()  # (N^2, C)
    steps, batch, _ = x.shape
    out = x.new_zeros(steps, batch, attn.embed_dim)
    eye = torch.zeros(attn.rank, attn.rank, attn.rank, dtype=x.dtype)
    idx = torch.arange(attn.rank)
    eye[idx, idx, idx] = 1.0
    for n in range(batch):
        xn = torch.zeros(n_max, x.size(2), dtype=x.dtype)
        xn[:steps] = x[:, n]  # positions steps..N-1 do not exist: zero rows of Q, K, V
        q, k, v = xn @ wq, xn @ wk, xn @ wv  # (N, R): shared factor matrices
        for t in range(steps):
            mask = torch.zeros(n_max, dtype=x.dtype)
            mask[:steps] = visible[n, t]
            k_t, v_t = k * mask[:, None], v * mask[:, None]
            blocks = []
            for j in range(attn.num_cores):
                core = eye * attn.core[j]  # full R x R x R core, diagonal g_j
                blocks.append(torch.einsum("ijm,ai,bj,cm->abc", core, q, k_t, v_t))
            tensor = sum(blocks) / attn.num_cores  # (N, N, N)
            split_concat = torch.cat([tensor[a].reshape(1, -1) for a in range(n_max)], dim=0)
            out[t, n] = (split_concat @ w_o)[t]  # row t of SplitConcat(.) W^O
    return out


def make(seed: int = 0) -> MultilinearAttention:
    torch.manual_seed(seed)
    attn = MultilinearAttention(C, R, num_cores=H, max_positions=N).double()
    with torch.no_grad():  # distinct cores of order 1, so every term matters at 1e-10
        attn.core.normal_()
    return attn


def test_matches_the_naive_transcription_causal_with_padding_outputs_and_gradients():
    attn = make()
    x = torch.randn(T, B, C, dtype=torch.float64, requires_grad=True)
    future = torch.triu(torch.ones(T, T, dtype=torch.bool), 1)
    pads = torch.zeros(B, T, dtype=torch.bool)
    pads[1, 3:] = True  # sentence 1 is right-padded
    pads[2, 1] = True  # a pad inside sentence 2: excluded wherever it is
    visible = (~future).double().unsqueeze(0) * (~pads).double().unsqueeze(1)

    out, _ = attn(x, x, x, key_padding_mask=pads, attn_mask=future.double() * -1e8)
    ref = naive(attn, x, visible)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-10)

    probe = torch.randn_like(out)
    params = [x, *attn.parameters()]
    got = torch.autograd.grad((out * probe).sum(), params)
    want = torch.autograd.grad((ref * probe).sum(), params)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=0, atol=1e-10)
    assert attn.core.grad is None and got[4].abs().sum() > 0  # the cores get a gradient


def test_matches_the_naive_transcription_unmasked():
    attn = make(1)
    x = torch.randn(T, B, C, dtype=torch.float64)
    out, _ = attn(x, x, x)
    torch.testing.assert_close(out, naive(attn, x, torch.ones(B, T, T)), rtol=0, atol=1e-10)


def test_no_position_sees_a_later_one():
    attn = make(2)
    x = torch.randn(T, B, C, dtype=torch.float64)
    future = torch.triu(torch.ones(T, T, dtype=torch.bool), 1)
    base, _ = attn(x, x, x, attn_mask=future)
    for t in range(T - 1):
        y = x.clone()
        y[t + 1 :] += torch.randn_like(y[t + 1 :])
        out, _ = attn(y, y, y, attn_mask=future)
        torch.testing.assert_close(out[: t + 1], base[: t + 1], rtol=0, atol=1e-12)
        assert not torch.allclose(out[t + 1 :], base[t + 1 :])


def test_right_padding_leaves_the_tokens_unchanged():
    """A right-padded sentence in a batch gives, at its tokens, what it gives alone."""
    attn = make(3)
    x = torch.randn(T, B, C, dtype=torch.float64)
    pads = torch.zeros(B, T, dtype=torch.bool)
    pads[0, 2:] = True
    pads[1, 4:] = True
    x_garbage = x.masked_fill(pads.t().unsqueeze(-1), 1e3)  # pad embeddings must not matter
    for causal in (True, False):
        mask = torch.triu(torch.ones(T, T, dtype=torch.bool), 1) if causal else None
        out, _ = attn(x_garbage, x_garbage, x_garbage, key_padding_mask=pads, attn_mask=mask)
        for n in range(B):
            length = int((~pads[n]).sum())
            xn = x[:length, n : n + 1]
            alone, _ = attn(xn, xn, xn, attn_mask=None if mask is None else mask[:length, :length])
            torch.testing.assert_close(out[:length, n : n + 1], alone, rtol=0, atol=1e-10)


def test_incremental_decoding_equals_the_causal_forward():
    attn = make(4)
    x = torch.randn(T, B, C, dtype=torch.float64)
    future = torch.triu(torch.ones(T, T, dtype=torch.bool), 1)
    full, _ = attn(x, x, x, attn_mask=future)
    state: dict = {}
    steps = []
    for t in range(T):
        xt = x[t : t + 1]
        steps.append(attn(xt, xt, xt, incremental_state=state)[0])
    torch.testing.assert_close(torch.cat(steps), full, rtol=0, atol=1e-10)

    order = torch.tensor([2, 0, 0])  # beam reordering selects cached rows
    attn.reorder_incremental_state(state, order)
    cached = attn._get_input_buffer(state)["prev_key"]
    torch.testing.assert_close(cached, attn.k_proj(x).transpose(0, 1)[order])


def test_longer_than_its_positions_fails_clearly():
    attn = make()
    x = torch.randn(N + 1, 1, C, dtype=torch.float64)
    with pytest.raises(ValueError, match=f"at most {N} positions.*got {N + 1}"):
        attn(x, x, x)


def test_cross_attention_is_rejected():
    attn = make()
    x, y = torch.randn(2, 1, C, dtype=torch.float64), torch.randn(2, 1, C, dtype=torch.float64)
    with pytest.raises(ValueError, match="self-attention"):
        attn(x, y, y)
