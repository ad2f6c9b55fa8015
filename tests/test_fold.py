"""fold_norms on a pure-torch model that mimics fairseq's pre-norm encoder-decoder transformer."""

import ast
import copy
import math
from pathlib import Path

import pytest
import torch
from torch import nn

from powernorm_fairseq.inference import FoldedAffine, FoldedNorm, fold_norms
from powernorm_fairseq.norms import build_norm, norm_names

C, HEADS, FFN, VOCAB = 16, 4, 32, 11


class ContractNorm(nn.Module):
    """Stand-in with the norm contract of docs/DESIGN.md: eval = optional per-token group RMS
    pre-scaling, then a fixed per-channel affine map (eval_affine)."""

    def __init__(self, c, group_num=0, eps=1e-5):
        super().__init__()
        self.group_num, self.eps = group_num, eps
        self.has_prescale = group_num >= 1
        self.weight = nn.Parameter(torch.rand(c) + 0.5)
        self.bias = nn.Parameter(torch.randn(c))
        self.register_buffer("running_psi2", torch.rand(c) + 0.5)

    def prescale(self, x):
        if not self.has_prescale:
            return x
        g = x.reshape(*x.shape[:-1], self.group_num, -1)
        return (g / torch.sqrt(g.pow(2).mean(-1, keepdim=True) + self.eps)).reshape(x.shape)

    def eval_affine(self):
        scale = self.weight / torch.sqrt(self.running_psi2 + self.eps)
        return scale, self.bias

    def forward(self, x, padding_mask=None):
        x = self.prescale(x)
        if self.training:
            psi2 = x.pow(2).reshape(-1, x.shape[-1]).mean(0)
            return self.weight * x / torch.sqrt(psi2 + self.eps) + self.bias
        scale, shift = self.eval_affine()
        return x * scale + shift


class MHA(nn.Module):
    def __init__(self):
        super().__init__()
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (nn.Linear(C, C) for _ in range(4))

    def forward(self, query, key, value, key_padding_mask=None, attn_mask=None):
        t, b, _ = query.shape
        q = self.q_proj(query).view(t, b * HEADS, -1).transpose(0, 1) / math.sqrt(C // HEADS)
        k = self.k_proj(key).view(key.shape[0], b * HEADS, -1).transpose(0, 1)
        v = self.v_proj(value).view(value.shape[0], b * HEADS, -1).transpose(0, 1)
        scores = q @ k.transpose(1, 2)
        if attn_mask is not None:
            scores = scores + attn_mask
        if key_padding_mask is not None:
            scores = (
                scores.view(b, HEADS, t, -1)
                .masked_fill(key_padding_mask[:, None, None, :], float("-inf"))
                .view(b * HEADS, t, -1)
            )
        out = scores.softmax(-1) @ v
        return self.out_proj(out.transpose(0, 1).reshape(t, b, C))


class Layer(nn.Module):
    """Pre-norm layer with fairseq's attribute names; decoder layers add encoder attention."""

    def __init__(self, make_norm, decoder):
        super().__init__()
        self.normalize_before = True
        self.self_attn_layer_norm, self.self_attn = make_norm(), MHA()
        self.encoder_attn_layer_norm = make_norm() if decoder else None
        self.encoder_attn = MHA() if decoder else None
        self.final_layer_norm, self.fc1, self.fc2 = (
            make_norm(),
            nn.Linear(C, FFN),
            nn.Linear(FFN, C),
        )

    def forward(self, x, pad, enc=None, enc_pad=None, causal=None):
        h = self.self_attn_layer_norm(x, padding_mask=pad)
        x = x + self.self_attn(h, h, h, key_padding_mask=pad, attn_mask=causal)
        if self.encoder_attn is not None:
            h = self.encoder_attn_layer_norm(x, padding_mask=pad)
            x = x + self.encoder_attn(h, enc, enc, key_padding_mask=enc_pad)
        h = self.final_layer_norm(x, padding_mask=pad)
        return x + self.fc2(torch.relu(self.fc1(h)))


class Stack(nn.Module):
    def __init__(self, make_norm, decoder, embed):
        super().__init__()
        self.embed_tokens = embed
        self.layers = nn.ModuleList(Layer(make_norm, decoder) for _ in range(2))
        self.layer_norm = make_norm()
        if decoder:
            self.project_out_dim = None
            self.adaptive_softmax = None
            self.output_projection = nn.Linear(C, VOCAB, bias=False)


class EncDec(nn.Module):
    def __init__(self, make_norm, tied=True):
        super().__init__()
        embed = nn.Embedding(VOCAB, C)
        self.encoder = Stack(make_norm, False, embed)
        self.decoder = Stack(make_norm, True, embed)
        if tied:
            self.decoder.output_projection.weight = embed.weight

    def forward(self, src, tgt, src_pad):
        x = self.encoder.embed_tokens(src).transpose(0, 1)
        for layer in self.encoder.layers:
            x = layer(x, src_pad)
        enc = self.encoder.layer_norm(x, padding_mask=src_pad)
        y = self.decoder.embed_tokens(tgt).transpose(0, 1)
        causal = torch.full((tgt.shape[1], tgt.shape[1]), float("-inf"), device=tgt.device).triu(1)
        for layer in self.decoder.layers:
            y = layer(y, None, enc, src_pad, causal)
        return self.decoder.output_projection(self.decoder.layer_norm(y))


def _inputs(device="cpu"):
    src = torch.randint(0, VOCAB, (3, 7))
    src_pad = torch.zeros(3, 7, dtype=torch.bool)
    src_pad[1, 5:] = True
    return src.to(device), torch.randint(0, VOCAB, (3, 5)).to(device), src_pad.to(device)


def _trained(model):
    """Perturb all parameters so that no norm is at its identity init, then eval mode."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model.eval()


class _LN(nn.LayerNorm):
    def forward(self, x, padding_mask=None):
        return super().forward(x)


NORM_MAKERS = {
    "contract": lambda: ContractNorm(C),
    "contract_prescale": lambda: ContractNorm(C, group_num=HEADS),
    "layer": lambda: _LN(C),
}


@pytest.mark.parametrize("norm", ["contract", "contract_prescale"])
@pytest.mark.parametrize("tied", [True, False])
def test_fold_matches_unfolded(norm, tied, device):
    torch.manual_seed(0)
    model = _trained(EncDec(NORM_MAKERS[norm], tied=tied)).to(device)
    folded = copy.deepcopy(model)
    src, tgt, src_pad = _inputs(device)
    with torch.no_grad():
        expected = model(src, tgt, src_pad)
        report = fold_norms(folded)
        got = folded(src, tgt, src_pad)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert len(report) == 2 * 2 + 2 * 3 + 2
    assert report["decoder.layer_norm"] == ("fused" if tied else "folded")
    assert sum(v == "folded" for v in report.values()) == len(report) - tied
    assert not any(hasattr(m, "eval_affine") for m in folded.modules())
    # A tied output projection keeps the embedding weight untouched.
    if tied:
        assert folded.decoder.output_projection.weight is folded.encoder.embed_tokens.weight
        torch.testing.assert_close(
            folded.encoder.embed_tokens.weight, model.encoder.embed_tokens.weight
        )
    prescale = HEADS if norm == "contract_prescale" else 0
    assert folded.encoder.layers[0].final_layer_norm.group_num == prescale


# Every registered family, with and without the pre-scaling where the family has one.
REGISTRY_CASES = {
    "batch": ("batch", {}),
    "batch_prescale": ("batch", {"prescale": True}),
    "power_v": ("power_v", {}),
    "power_paper": ("power", {"variant": "paper"}),
    "power_paper_groups": ("power", {"variant": "paper", "group_num": HEADS}),
    "power_reference": ("power", {"variant": "reference", "group_num": HEADS}),
    "layer": ("layer", {}),
    "rms": ("rms", {}),
    "group_rms": ("group_rms", {"group_num": HEADS}),
    "dyt": ("dyt", {}),
}


def _eval_map(norm: nn.Module):
    """The affine map a norm declares for evaluation, or None (a norm without one)."""
    eval_affine = getattr(norm, "eval_affine", None)
    return eval_affine() if callable(eval_affine) else None


def test_registry_cases_cover_every_norm():
    assert {name for name, _ in REGISTRY_CASES.values()} == set(norm_names())


@pytest.mark.parametrize("case", sorted(REGISTRY_CASES))
def test_fold_registered_norms(case, device):
    name, kwargs = REGISTRY_CASES[case]
    torch.manual_seed(0)
    model = EncDec(lambda: build_norm(name, C, **kwargs)).to(device)
    src, tgt, src_pad = _inputs(device)
    with torch.no_grad():
        for _ in range(3):  # train-mode forwards move the running statistics
            model(src, tgt, src_pad)
    model = _trained(model)
    folded = copy.deepcopy(model)
    with torch.no_grad():
        expected = model(src, tgt, src_pad)
        report = fold_norms(folded)
        got = folded(src, tgt, src_pad)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    if _eval_map(model.encoder.layer_norm) is None:
        assert report == {}  # a per-token norm (LN, RMS, DyT) has no eval map: left as it is
    else:
        assert list(report.values()).count("fused") == 1  # the tied output projection
        assert not any(callable(getattr(m, "eval_affine", None)) for m in folded.modules())


def test_layer_norm_untouched():
    torch.manual_seed(0)
    model = _trained(EncDec(NORM_MAKERS["layer"]))
    assert fold_norms(model) == {}
    assert isinstance(model.encoder.layer_norm, nn.LayerNorm)


def test_mixed_encoder_pn_decoder_ln(device):
    """The released setup: PN in the encoder, LN in the decoder."""
    torch.manual_seed(0)
    model = EncDec(NORM_MAKERS["layer"])
    model.encoder = Stack(
        lambda: ContractNorm(C, group_num=HEADS), False, model.encoder.embed_tokens
    )
    model = _trained(model).to(device)
    folded = copy.deepcopy(model)
    src, tgt, src_pad = _inputs(device)
    with torch.no_grad():
        expected = model(src, tgt, src_pad)
        report = fold_norms(folded)
        got = folded(src, tgt, src_pad)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert set(report.values()) == {"folded"} and len(report) == 2 * 2 + 1


def test_unknown_structure_gets_fused_affine():
    torch.manual_seed(0)

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.norm, self.proj = ContractNorm(C, group_num=2), nn.Linear(C, C)

        def forward(self, x):
            return self.proj(self.norm(x)) + x

    model = _trained(Block())
    folded = copy.deepcopy(model)
    x = torch.randn(5, 2, C)
    assert fold_norms(folded) == {"norm": "fused"}
    assert isinstance(folded.norm, FoldedAffine)
    with torch.no_grad():
        torch.testing.assert_close(folded(x), model(x), atol=1e-5, rtol=1e-5)


def test_consumer_without_bias_gets_one(device):
    torch.manual_seed(0)
    model = EncDec(lambda: ContractNorm(C), tied=False)
    model.decoder.layers[0].fc1 = nn.Linear(C, FFN, bias=False)
    model = _trained(model).to(device)
    folded = copy.deepcopy(model)
    src, tgt, src_pad = _inputs(device)
    with torch.no_grad():
        expected = model(src, tgt, src_pad)
        fold_norms(folded)
        got = folded(src, tgt, src_pad)
    assert folded.decoder.layers[0].fc1.bias is not None
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_train_mode_raises():
    model = EncDec(lambda: ContractNorm(C))
    with pytest.raises(ValueError, match="model.eval"):
        fold_norms(model)
    model.eval()
    model.encoder.layers[0].final_layer_norm.train()
    with pytest.raises(ValueError, match="final_layer_norm"):
        fold_norms(model)


def test_folded_model_cannot_train():
    model = EncDec(lambda: ContractNorm(C)).eval()
    fold_norms(model)
    model.train()
    with pytest.raises(RuntimeError, match="cannot be trained"):
        model(*_inputs())
    assert isinstance(model.encoder.layer_norm, FoldedNorm)


def test_fold_is_idempotent():
    model = _trained(EncDec(lambda: ContractNorm(C)))
    assert fold_norms(model)
    assert fold_norms(model) == {}


def test_fold_module_is_pure_torch():
    """DESIGN.md: the folding code never imports fairseq."""
    import powernorm_fairseq.inference.fold as fold

    tree = ast.parse(Path(fold.__file__).read_text())
    imported = {
        alias.name.split(".")[0]
        for node in ast.walk(tree)
        if isinstance(node, ast.Import | ast.ImportFrom)
        for alias in (
            node.names if isinstance(node, ast.Import) else [ast.alias(node.module or "")]
        )
    }
    assert "fairseq" not in imported


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32, torch.float64])
def test_folded_prescale(dtype, device):
    """Per-token group RMS scaling, computed in at least float32, returned in the input dtype."""
    x = torch.randn(5, 3, C, dtype=torch.float64).to(device) * 3
    x[0, 0] = 0.0  # an all-zero token stays finite thanks to eps
    groups = x.view(5, 3, HEADS, C // HEADS)
    expected = (groups / torch.sqrt(groups.pow(2).mean(-1, keepdim=True) + 1e-5)).view(x.shape)
    got = FoldedNorm(HEADS).to(device).eval()(x.to(dtype))
    assert got.dtype == dtype
    tol = 1e-3 if dtype == torch.float16 else 1e-6
    torch.testing.assert_close(got.double(), expected, atol=tol, rtol=tol)
