"""The norms that take PowerNorm apart (issue 36): RMSNorm, GroupScaling alone, GroupScaling before
PN-V and Algorithm 2, Dynamic Tanh. Their common contract is tests/test_norm_contract.py; here,
each against what it must equal."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from powernorm_fairseq.norms import build_norm, build_norm_from_options
from powernorm_fairseq.norms.functional import group_rms_scale

RECORDED = json.loads((Path(__file__).parent / "data" / "reference_powernorm.json").read_text())


def _x(T=7, B=3, C=16, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(T, B, C, generator=g) * 2 + 0.5).to(dtype)


@pytest.mark.parametrize("eps", [1e-5, 1e-6])
def test_rms_equals_torch_rmsnorm_in_float32(eps, kernel_path):
    ours = build_norm("rms", 16, eps=eps)
    theirs = torch.nn.RMSNorm(16, eps=eps)
    with torch.no_grad():
        w = torch.rand(16) + 0.5
        ours.weight.copy_(w)
        theirs.weight.copy_(w)
    assert ours.bias is None  # weight only by default, as torch's
    x1, x2 = _x().requires_grad_(), _x().requires_grad_()
    y1, y2 = ours(x1), theirs(x2)
    torch.testing.assert_close(y1, y2, rtol=1e-6, atol=1e-6)
    g = torch.randn_like(y1)
    y1.backward(g)
    y2.backward(g)
    torch.testing.assert_close(x1.grad, x2.grad, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(ours.weight.grad, theirs.weight.grad, rtol=1e-5, atol=1e-5)
    assert build_norm("rms", 16, bias=True).bias is not None


@pytest.mark.parametrize("case", RECORDED["cases"], ids=[c["name"] for c in RECORDED["cases"]])
def test_group_rms_is_the_released_group_scaling_stage(case):
    """The released MaskPowerNorm in eval is ``weight * z / sqrt(running_phi + eps) + bias`` with
    ``z`` its GroupScaling of ``x``: ``z`` recovered from the recorded eval output and the
    recorded final ``running_phi`` equals group_rms's output with a unit affine."""
    x = torch.tensor(case["eval"]["x_T_B_C"], dtype=torch.float64)
    y = torch.tensor(case["eval"]["y"], dtype=torch.float64)
    phi = torch.tensor(case["steps"][-1]["running_phi_after"], dtype=torch.float64).reshape(-1)
    weight = torch.tensor(case["weight"], dtype=torch.float64)
    bias = torch.tensor(case["bias"], dtype=torch.float64)
    z = (y - bias) / weight * torch.sqrt(phi + case["eps"])
    norm = build_norm("group_rms", case["C"], group_num=case["group_num"]).double()
    # the recorded numbers are float32's (the released module ran in float32)
    torch.testing.assert_close(norm(x), z, rtol=2e-6, atol=2e-6)
    other = build_norm("group_rms", case["C"], group_num=case["group_num"] * 2).double()
    assert (other(x) - z).abs().max() > 1e-3  # the groups matter at this tolerance


def test_dyt_is_weight_tanh_alpha_x_plus_bias():
    norm = build_norm("dyt", 16, alpha_init=0.7)
    assert float(norm.alpha) == pytest.approx(0.7)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
        norm.bias.uniform_(-0.5, 0.5)
    x = _x().requires_grad_()
    y = norm(x)
    torch.testing.assert_close(y, norm.weight * torch.tanh(0.7 * x) + norm.bias)
    y.sum().backward()
    assert norm.alpha.grad is not None and float(norm.alpha.grad) != 0.0
    with pytest.raises(ValueError, match="alpha_init must be > 0"):
        build_norm("dyt", 16, alpha_init=0.0)


@pytest.mark.parametrize("name,kwargs", [("power_v", {}), ("power", {"variant": "paper"})])
def test_group_scaling_is_an_option_of_the_batch_statistic_norms(name, kwargs):
    """PN-V and Algorithm 2 with ``group_num`` = the same norm applied to GroupScaling's output
    (outputs, input gradients and buffers over steps)."""
    a = build_norm(name, 16, group_num=4, **kwargs).double()
    b = build_norm(name, 16, **kwargs).double()
    assert a.prescale_groups() == 4 and b.prescale_groups() == 0
    for step in range(3):
        x1, x2 = _x(seed=step, dtype=torch.float64).requires_grad_(), _x(seed=step, dtype=torch.float64).requires_grad_()
        y1, y2 = a(x1), b(group_rms_scale(x2, 4, 1e-5))
        torch.testing.assert_close(y1, y2, rtol=1e-12, atol=1e-12)
        g = torch.randn_like(y1)
        y1.backward(g)
        y2.backward(g)
        torch.testing.assert_close(x1.grad, x2.grad, rtol=1e-10, atol=1e-10)
    for key, value in b.state_dict().items():
        torch.testing.assert_close(a.state_dict()[key], value, msg=key)


@pytest.mark.parametrize("name,variant,group_num,expected", [
    ("power_v", None, -1, 0), ("power_v", None, -2, 4), ("power", "paper", -1, 0), ("power", "paper", -2, 4),
    ("power", "reference", -1, 4), ("group_rms", None, -1, 4), ("group_rms", None, -2, 4),
    ("group_rms", None, 2, 2),
])
def test_fairseq_group_option_gives_each_norm_its_groups(name, variant, group_num, expected):
    """``--pn-group-num``: -1 = the norm's default (the released PN and GroupScaling: the heads;
    PN-V and Algorithm 2: none), -2 = the attention heads, N = N."""
    options = SimpleNamespace(pn_group_num=group_num, pn_variant=variant, dyt_alpha_init=0.3)
    norm = build_norm_from_options(name, 16, options, num_heads=4)
    assert norm.prescale_groups() == expected
    assert float(build_norm_from_options("dyt", 16, options).alpha) == pytest.approx(0.3)


@pytest.mark.parametrize("unit,switch", [("updates", 6), ("forwards", 3)])
@pytest.mark.parametrize("variant", ["paper", "reference"])
def test_both_variants_count_their_warmup_in_the_same_unit(variant, unit, switch):
    """``warmup_updates=3`` with two training forwards per optimizer update (gradient
    accumulation) and ``set_num_updates`` after each update: both variants leave the warmup
    (their forward stops being PN-V's) after 3 updates, forward 6, in ``"updates"`` (the default);
    after 3 forwards with ``warmup_unit="forwards"`` (the released count). Issue 38: the reference
    variant counted forwards, so its warmup ended at update 2 here."""
    from powernorm_fairseq.norms import set_num_updates

    model = torch.nn.Sequential(build_norm("power", 16, variant=variant, warmup_updates=3, group_num=0,
                                           warmup_unit=unit)).double()
    pnv = build_norm("power_v", 16).double()
    first_pn = None
    for forward in range(10):
        x = _x(seed=forward, dtype=torch.float64)
        if first_pn is None and not torch.allclose(model(x), pnv(x), rtol=1e-12, atol=1e-12):
            first_pn = forward
        if forward % 2 == 1:
            set_num_updates(model, forward // 2 + 1)
    assert first_pn == switch


@pytest.mark.parametrize("variant", ["paper", "reference"])
def test_a_warmup_never_told_an_update_warns_once(variant, monkeypatch):
    """Outside fairseq a norm counting its warmup in updates that is never told one warns once
    (after ``UNTOLD_WARN_AFTER`` training forwards) that its warmup cannot end; told once, never."""
    from powernorm_fairseq.norms import base, set_num_updates

    monkeypatch.setattr(base, "UNTOLD_WARN_AFTER", 5)
    norm = build_norm("power", 16, variant=variant, warmup_updates=50)
    with pytest.warns(RuntimeWarning, match="set_num_updates was never called in 5 training forwards") as seen:
        for _ in range(12):
            norm(_x())
    assert len([w for w in seen if "never called" in str(w.message)]) == 1
    told = build_norm("power", 16, variant=variant, warmup_updates=50)
    set_num_updates(told, 0)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for _ in range(12):
            told(_x())
