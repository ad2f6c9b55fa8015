"""The padding-mask context of ``modules/padding_mask.py``: how fairseq's own forward passes,
which call the norms as ``norm(x)``, hand each norm the batch's padding mask."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch

pytest.importorskip("fairseq")

from powernorm_fairseq.modules.padding_mask import (  # noqa: E402
    attach_padding_mask,
    padding_mask_for_norms,
)
from powernorm_fairseq.norms import build_norm  # noqa: E402


def _recording_norm():
    norm = attach_padding_mask(build_norm("batch", 4))
    seen = []
    norm.register_forward_pre_hook(
        lambda m, args, kwargs: seen.append(kwargs.get("padding_mask", args[1:] or None)),
        with_kwargs=True)
    return norm, seen


def test_calls_get_the_innermost_context_mask_and_explicit_masks_win():
    norm, seen = _recording_norm()
    x = torch.randn(3, 2, 4)
    outer, inner = torch.tensor([[0, 0, 1], [0, 0, 0]]).bool(), torch.zeros(2, 3, dtype=torch.bool)
    norm(x)  # outside any context: the call is left as it is
    with padding_mask_for_norms(outer):
        norm(x)
        with padding_mask_for_norms(inner):
            norm(x)
        norm(x)
        norm(x, padding_mask=inner)  # a mask given by the caller is kept
        with padding_mask_for_norms(None):  # a batch without pads
            norm(x)
    assert seen[0] is None and seen[1] is outer and seen[2] is inner and seen[3] is outer
    assert seen[4] is inner and seen[5] is None


def test_the_masked_call_equals_the_explicit_call():
    x = torch.randn(5, 3, 4)
    mask = torch.zeros(3, 5, dtype=torch.bool)
    mask[1, 3:] = True
    a, b = build_norm("batch", 4), attach_padding_mask(build_norm("batch", 4))
    with padding_mask_for_norms(mask):
        got = b(x)
    assert torch.equal(got, a(x, mask))
    assert torch.equal(b.running_mean, a.running_mean) and torch.equal(b.running_var, a.running_var)


def test_a_norm_with_the_hook_deep_copies_and_pickles():
    norm = attach_padding_mask(build_norm("power", 4))
    for clone in (copy.deepcopy(norm), pickle.loads(pickle.dumps(norm))):
        x, mask = torch.randn(3, 2, 4), torch.tensor([[0, 0, 1], [0, 0, 0]]).bool()
        clone.eval()
        with padding_mask_for_norms(mask):
            assert torch.equal(clone(x), clone(x, mask))
        assert len(clone._forward_pre_hooks) == 1


@pytest.mark.parametrize("arch", ["transformer_pn_tiny", "transformer_lm_pn_tiny"])
def test_torchscript_of_a_whole_model_is_refused_with_a_clear_error(arch, tiny_mt_data,
                                                                    tiny_lm_data):
    """The stacks and layers run fairseq's forwards inside a Python context; TorchScript stays
    declined, with the norms' one sentence rather than a compiler trace."""
    from test_fairseq_models import build

    if arch.startswith("transformer_lm"):
        _, model, _ = build(tiny_lm_data, arch, "--decoder-norm", "power", lm=True)
    else:
        _, model, _ = build(tiny_mt_data, arch, "--encoder-norm", "power", "--decoder-norm", "power")
    with pytest.raises(RuntimeError, match="do not support TorchScript"):
        torch.jit.script(model.eval())


def test_encoder_pad_inputs_embedding_gives_the_first_layer_fairseq_08s_padded_positions(
        tiny_mt_data):
    """``--encoder-pad-inputs embedding``: the first encoder layer sees the pad token's embedding
    at padded positions (fairseq 0.8, the released program), where fairseq >= 0.10 has zeros; the
    loss is the same, the reference PN's ``ema_gz`` (a mean over all positions) is not."""
    from test_fairseq_models import batches, build

    results = {}
    for mode in ("zero", "embedding"):
        task, model, _ = build(tiny_mt_data, "transformer_pn_tiny", "--encoder-norm", "power",
                               "--pn-variant", "reference", "--dropout", "0",
                               "--encoder-pad-inputs", mode)
        with torch.no_grad():  # trained through a shared output projection, the pad row moves
            model.encoder.embed_tokens.weight[task.source_dictionary.pad()] = 0.5
        sample = next(b for b in batches(task, "train") if b["net_input"]["src_tokens"].eq(
            task.source_dictionary.pad()).any())
        seen = []
        model.encoder.layers[0].register_forward_pre_hook(
            lambda m, args, kwargs, seen=seen: seen.append(args[0].detach().clone()), with_kwargs=True)
        model.train()
        for _ in range(2):  # the second backward starts from a non-zero ema_gz
            out, _ = model(**sample["net_input"])
            out.float().pow(2).mean().backward()
        results[mode] = (seen[0], out.detach(),
                         model.encoder.layers[0].self_attn_layer_norm.ema_gz.clone())
    pads = sample["net_input"]["src_tokens"].eq(task.source_dictionary.pad()).t()  # (S, B)
    (x0, out0, ema0), (x1, out1, ema1) = results["zero"], results["embedding"]
    assert torch.equal(x0[pads], torch.zeros_like(x0[pads]))
    scale = model.encoder.embed_scale
    assert torch.allclose(x1[pads], torch.full_like(x1[pads], 0.5 * scale))
    assert torch.equal(x0[~pads], x1[~pads])
    assert torch.allclose(out0, out1, atol=1e-6)  # pads never reach a real position
    assert not torch.allclose(ema0, ema1)
