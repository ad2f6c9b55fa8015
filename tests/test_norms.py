"""Contract and math tests of ``powernorm_fairseq.norms`` (pure torch, no fairseq needed)."""

import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from torch.func import functional_call

from powernorm_fairseq.norms import (
    NORM_CHOICES,
    NORM_REGISTRY,
    MaskedNorm,
    PowerNormPaper,
    PowerNormReference,
    build_norm,
)
from powernorm_fairseq.norms.functional import group_rms_scale

REPO = Path(__file__).resolve().parents[1]
# every test here runs on both the fused CPU kernels and the eager path, and those taking
# ``on_device`` on the CPU and on CUDA where available (tests/conftest.py)
pytestmark = pytest.mark.usefixtures("kernel_path")
C = 8

# (id, name, kwargs): every registered family, PN in both variants and with its options
CONFIGS = [
    ("layer", "layer", {}),
    ("batch", "batch", {}),
    ("batch_prescale", "batch", {"prescale": True}),
    ("batch_released_pads", "batch", {"pad_statistics": "released"}),
    ("power_v", "power_v", {}),
    ("power_paper", "power", {}),
    ("power_paper_warmup_groups", "power", {"warmup_updates": 2, "group_num": 2}),
    ("power_reference", "power", {"variant": "reference", "group_num": 2, "warmup_updates": 2,
                                    "warmup_unit": "forwards"}),
]
STATEFUL = [c for c in CONFIGS if c[1] != "layer"]


def _ids(configs):
    return [c[0] for c in configs]


def _make(name, kwargs, dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    norm = build_norm(name, C, **kwargs).to(dtype)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
        norm.bias.uniform_(-0.2, 0.2)
    return norm


def _batch(T=5, B=3, dtype=torch.float32, seed=1, scale=1.0, mean=0.0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(T, B, C, generator=gen, dtype=dtype).to(torch.get_default_device())
    x = x * scale + mean
    pad = torch.zeros(B, T, dtype=torch.bool)
    pad[0, T - 2:] = True
    pad[2, T - 1:] = True
    return x, pad


def _buffers(norm):
    return {k: v.clone() for k, v in norm.named_buffers()}


# ----------------------------------------------------------------------------- registry / errors

def test_registry_names():
    assert NORM_CHOICES == ("layer", "batch", "power_v", "power")
    assert set(NORM_REGISTRY) == set(NORM_CHOICES)


def test_register_and_unregister_a_norm_for_a_while():
    """``unregister_norm`` undoes ``register_norm``: the name builds while registered, and after
    it is an unknown name again (the error lists the choices); an unknown name cannot be removed."""
    from powernorm_fairseq.norms import norm_family, norm_names, register_norm, unregister_norm

    class Scale(MaskedNorm):
        stateful = False

        def _normalize(self, x2d, keep):
            return x2d

    before = norm_names()
    register_norm("scale_for_a_while", Scale)
    assert norm_family(build_norm("scale_for_a_while", C)) == "scale_for_a_while"
    unregister_norm("scale_for_a_while")
    assert norm_names() == before and norm_family(Scale) is None
    with pytest.raises(ValueError, match="choose one of"):
        build_norm("scale_for_a_while", C)
    with pytest.raises(ValueError, match="choose one of"):
        unregister_norm("scale_for_a_while")


def test_unknown_name_lists_choices():
    with pytest.raises(ValueError, match="choose one of") as err:
        build_norm("group", C)
    for name in NORM_CHOICES:
        assert name in str(err.value)


def test_unknown_kwarg_and_variant():
    with pytest.raises(ValueError, match="momentum"):
        build_norm("layer", C, momentum=0.1)
    with pytest.raises(ValueError, match="accepted"):
        build_norm("power", C, variant="reference", safeguard=True)
    with pytest.raises(ValueError, match="paper"):
        build_norm("power", C, variant="released")


def test_group_num_must_divide_channels():
    with pytest.raises(ValueError, match="divisible"):
        build_norm("power", C, variant="reference", group_num=3)
    with pytest.raises(ValueError, match="divisible"):
        build_norm("power", C, group_num=5)


@pytest.mark.parametrize("cfg", CONFIGS, ids=_ids(CONFIGS))
def test_bad_shapes(cfg):
    _, name, kwargs = cfg
    norm = build_norm(name, C, **kwargs)
    x, pad = _batch()
    with pytest.raises(ValueError, match=r"\(3, 5\)"):
        norm(x, padding_mask=pad.t())
    with pytest.raises(ValueError, match="expects x"):
        norm(torch.randn(5, 3, C + 1))
    with pytest.raises(ValueError, match="bool"):
        norm(x, padding_mask=pad.float())


def test_must_work_snippet_without_fairseq():
    """The norms import and build with fairseq absent (and never import it)."""
    code = (
        "import sys\n"
        "sys.modules['fairseq'] = None\n"
        "from powernorm_fairseq.norms import build_norm\n"
        "norm = build_norm('power', 8, variant='reference', group_num=2, warmup_updates=2, "
        "warmup_unit='forwards')\n"
        "import torch\n"
        "norm(torch.randn(4, 2, 8)).sum().backward()\n"
        "assert not [m for m in sys.modules if m.startswith('fairseq.')]\n"
    )
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr


# ----------------------------------------------------------------------------- shapes, affine

@pytest.mark.parametrize("cfg", CONFIGS, ids=_ids(CONFIGS))
def test_shapes_2d_and_affine_off(cfg, on_device):
    _, name, kwargs = cfg
    norm = build_norm(name, C, affine=False, **kwargs)
    assert norm.weight is None and norm.bias is None
    x, pad = _batch()
    assert norm(x, pad).shape == x.shape
    x2 = torch.randn(6, C, requires_grad=True)
    mask2 = torch.tensor([False, False, True, False, True, False])
    y2 = norm(x2, padding_mask=mask2)
    assert y2.shape == x2.shape
    y2.sum().backward()
    assert torch.isfinite(x2.grad).all()


# ----------------------------------------------------------------------------- gradients

GRADCHECK = [c for c in CONFIGS if c[0] in
             ("layer", "batch", "batch_prescale", "batch_released_pads", "power_v", "power_paper_warmup_groups")]


@pytest.mark.parametrize("masked", [False, True], ids=["nopad", "pad"])
@pytest.mark.parametrize("cfg", GRADCHECK, ids=_ids(GRADCHECK))
def test_gradcheck_exact_gradient(cfg, masked, on_device):
    """BN, PN-V (and PN's PN-V warmup) have the exact gradient, pads included."""
    _, name, kwargs = cfg
    norm = _make(name, kwargs, dtype=torch.float64).train()
    x, pad = _batch(T=4, B=3, dtype=torch.float64, mean=0.3)
    x.requires_grad_()
    params = {"weight": norm.weight.detach().clone().requires_grad_(),
              "bias": norm.bias.detach().clone().requires_grad_()}
    mask = pad if masked else None

    def fn(x, weight, bias):
        return functional_call(norm, {"weight": weight, "bias": bias}, (x,),
                               {"padding_mask": mask})

    assert torch.autograd.gradcheck(fn, (x, params["weight"], params["bias"]))


def test_batch_norm_matches_torch_without_padding():
    norm = _make("batch", {}, dtype=torch.float64)
    ref = torch.nn.BatchNorm1d(C, momentum=0.1, dtype=torch.float64)
    ref.load_state_dict({k: v for k, v in norm.state_dict().items()}, strict=False)
    x, _ = _batch(dtype=torch.float64, mean=2.0, scale=3.0)
    for _ in range(3):
        xr = x.clone().requires_grad_()
        xt = x.clone().requires_grad_()
        y = norm(xr)
        yt = ref(xt.reshape(-1, C)).reshape(x.shape)
        torch.testing.assert_close(y, yt)
        gy = torch.randn_like(y)
        y.backward(gy)
        yt.backward(gy)
        torch.testing.assert_close(xr.grad, xt.grad)
    torch.testing.assert_close(norm.running_mean, ref.running_mean)
    torch.testing.assert_close(norm.running_var, ref.running_var)
    torch.testing.assert_close(norm.weight.grad, ref.weight.grad)


@pytest.mark.parametrize("prescale", [False, True], ids=["plain", "prescale"])
def test_batch_norm_released_pad_statistics_are_torch_bn_over_mean_filled_rows(prescale):
    """``pad_statistics="released"`` is the released MaskSyncBatchNorm's treatment of pads: pad
    rows replaced by the (differentiable) mean of the real rows, then torch's BN over all T*B
    rows (mean exact, variance diluted by N_real/(T*B), unbiased running variance over T*B rows),
    so pad outputs are ``bias``; outputs, gradients and running statistics, step by step."""
    norm = _make("batch", {"pad_statistics": "released", "prescale": prescale, "momentum": 0.05},
                 dtype=torch.float64)
    masked = _make("batch", {"prescale": prescale, "momentum": 0.05}, dtype=torch.float64)
    weight = norm.weight.detach().clone().requires_grad_()
    bias = norm.bias.detach().clone().requires_grad_()
    rm, rv = torch.zeros(C, dtype=torch.float64), torch.ones(C, dtype=torch.float64)
    for step in range(3):
        x, pad = _batch(dtype=torch.float64, mean=0.5 + step, scale=2.0, seed=step)
        real = ~pad.t().reshape(-1)
        xr, xt = x.clone().requires_grad_(), x.clone().requires_grad_()
        y = norm(xr, padding_mask=pad)
        z = xt.reshape(-1, C)
        if prescale:
            z = z * torch.rsqrt(z.pow(2).mean(1, keepdim=True) + 1e-5)
        z = torch.where(real[:, None], z, z[real].mean(0))
        yt = torch.nn.functional.batch_norm(z, rm, rv, weight, bias, True, 0.05, 1e-5).reshape(x.shape)
        torch.testing.assert_close(y, yt, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(y.reshape(-1, C)[~real], norm.bias.detach().expand(int((~real).sum()), C))
        gy = torch.randn_like(y)
        y.backward(gy)
        yt.backward(gy)
        torch.testing.assert_close(xr.grad, xt.grad, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(norm.running_mean, rm, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(norm.running_var, rv, rtol=1e-12, atol=1e-12)
        # not the masked statistics: the pads dilute the variance
        assert not torch.allclose(masked(x, padding_mask=pad), y)
    torch.testing.assert_close(norm.weight.grad, weight.grad, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(norm.bias.grad, bias.grad, rtol=1e-10, atol=1e-12)
    with pytest.raises(ValueError, match="pad_statistics must be one of masked, released"):
        _make("batch", {"pad_statistics": "mean"})


def _paper_steps_by_hand(xs, gys, keep, weight, bias, eps, a_f, a_b, warmup, safeguard):
    """Algorithm 2 (with PN-V warmup and the safeguard for w >= 2) step by step, float64."""
    psi2, nu = torch.ones(C, dtype=torch.float64), torch.zeros(C, dtype=torch.float64)
    n = keep.sum()
    out = []
    for t, (x, gy) in enumerate(zip(xs, gys, strict=True)):
        x2, gy2 = x.reshape(-1, C), gy.reshape(-1, C)
        psi2_b = (keep[:, None] * x2 * x2).sum(0) / n
        if t < warmup:
            xv = x2.clone().requires_grad_()
            stat = (keep[:, None] * xv * xv).sum(0) / n
            yv = weight * xv / torch.sqrt(stat + eps) + bias
            (gx,) = torch.autograd.grad(yv, xv, gy2)
            r = 1 / torch.sqrt(psi2_b + eps)
            x_hat = x2 * r
            g = weight * gy2
            x_tilde = g - nu * x_hat
        else:
            r = 1 / torch.sqrt(psi2 + eps)
            x_hat = x2 * r
            g = weight * gy2
            x_tilde = g - keep[:, None] * nu * x_hat  # pads are in no statistic: no correction
            gx = x_tilde * r
        y = weight * x_hat + bias
        step = (1 - a_b) * (keep[:, None] * x_tilde * x_hat).sum(0) / n
        w = (1 - a_b) * (keep[:, None] * x_hat * x_hat).sum(0) / n
        if safeguard:
            step = torch.where(w >= 2, step / w, step)
        nu = nu + step
        psi2 = a_f * psi2 + (1 - a_f) * psi2_b
        out.append({"y": y.reshape(x.shape), "grad_x": gx.reshape(x.shape),
                    "grad_weight": (gy2 * x_hat).sum(0), "grad_bias": gy2.sum(0),
                    "psi2": psi2.clone(), "nu": nu.clone()})
    return out


@pytest.mark.parametrize(("warmup", "growth", "safeguard"),
                         [(0, 0.2, True), (2, 0.2, True), (0, 2.0, True), (0, 2.0, False)],
                         ids=["plain", "warmup", "clamped", "unclamped"])
def test_paper_variant_follows_algorithm_2(warmup, growth, safeguard, on_device):
    """Several steps with padding; growth 2.0 makes (1 - alpha_bkw) * Gamma exceed 1."""
    eps, a_f, a_b = 1e-5, 0.8, 0.7
    norm = _make("power", {"warmup_updates": warmup, "alpha_fwd": a_f, "alpha_bkw": a_b,
                           "safeguard": safeguard}, dtype=torch.float64).train()
    xs, gys = [], []
    for t in range(5):
        x, pad = _batch(dtype=torch.float64, seed=10 + t, scale=1.0 + growth * t, mean=0.2)
        xs.append(x)
        gy = torch.randn_like(x)
        gy[pad.t()] = 0.0
        gys.append(gy)
    keep = (~pad).t().reshape(-1).to(torch.float64)
    expected = _paper_steps_by_hand(xs, gys, keep, norm.weight.detach(), norm.bias.detach(),
                                    eps, a_f, a_b, warmup, safeguard)
    for t, (x, gy, exp) in enumerate(zip(xs, gys, expected, strict=True)):
        norm.set_num_updates(t)
        norm.zero_grad()
        xv = x.clone().requires_grad_()
        y = norm(xv, padding_mask=pad)
        y.backward(gy)
        torch.testing.assert_close(y, exp["y"])
        torch.testing.assert_close(xv.grad, exp["grad_x"])
        torch.testing.assert_close(norm.weight.grad, exp["grad_weight"])
        torch.testing.assert_close(norm.bias.grad, exp["grad_bias"])
        torch.testing.assert_close(norm.running_psi2, exp["psi2"])
        torch.testing.assert_close(norm.nu, exp["nu"])
    assert int(norm.num_updates) == 4


def test_paper_and_reference_nu_equivalence():
    """Without the released deviations, nu = (1 - alpha_bkw) * ema_gz (docs/SPEC.md section 3)."""
    paper = _make("power", {"group_num": 1}, dtype=torch.float64)
    ref = _make("power", {"variant": "reference", "group_num": 1}, dtype=torch.float64)
    ref.load_state_dict(paper.state_dict(), strict=False)
    for t in range(4):
        x, _ = _batch(dtype=torch.float64, seed=t)
        gy = torch.randn_like(x)
        for norm in (paper, ref):
            norm(x.clone().requires_grad_()).backward(gy)
        # forward uses the running stat in both (warmup 0); backward divisors differ (D2),
        # but the recurrences see the same z and g
        torch.testing.assert_close(paper.nu, 0.1 * ref.ema_gz.view(-1))


# ----------------------------------------------------------------------------- padding, eval

@pytest.mark.parametrize("cfg", CONFIGS, ids=_ids(CONFIGS))
def test_padding_invariance(cfg):
    """Pad values change neither outputs at real positions nor statistics (nor, with zero
    upstream gradient at pads, the gradients at real positions)."""
    _, name, kwargs = cfg
    runs = []
    for pad_value in (0.0, 1e3):
        norm = _make(name, kwargs).train()
        results = []
        for t in range(2):
            x, pad = _batch(seed=20 + t)
            x[pad.t()] = pad_value
            x.requires_grad_()
            y = norm(x, padding_mask=pad)
            gy = torch.randn(y.shape, generator=torch.Generator().manual_seed(t))
            gy[pad.t()] = 0.0
            y.backward(gy)
            real = ~pad.t()
            results.append((y[real].detach(), x.grad[real]))
        buffers = {k: v for k, v in _buffers(norm).items() if k != "ema_gz"}
        runs.append((results, buffers))
    (res_a, buf_a), (res_b, buf_b) = runs
    torch.testing.assert_close(buf_a, buf_b)
    for t, ((ya, ga), (yb, gb)) in enumerate(zip(res_a, res_b, strict=True)):
        torch.testing.assert_close(ya, yb)
        if t == 0 or not name == "power" or kwargs.get("variant") != "reference":
            # reference D5: ema_gz (hence later gradients) sees pads by design
            torch.testing.assert_close(ga, gb)


@pytest.mark.parametrize("cfg", STATEFUL, ids=_ids(STATEFUL))
def test_a_mask_changed_in_place_is_read_again(cfg):
    """The last mask's keep-vector is reused while the same mask object comes again
    (``functional.keep_vector``): a mask changed in place between two calls gives the outputs,
    gradients and buffers of a new mask with its values."""
    _, name, kwargs = cfg
    x, pad = _batch(seed=30)
    x.requires_grad_()
    gy = torch.randn(x.shape, generator=torch.Generator().manual_seed(3))
    reused, fresh = _make(name, kwargs).train(), _make(name, kwargs).train()
    results = {}
    for norm, new_mask in ((reused, False), (fresh, True)):
        mask = pad.clone()
        norm(x, padding_mask=mask)
        mask[:, -2:] = ~mask[:, -2:]  # in place: other tokens are pads now
        x.grad = None
        y = norm(x, padding_mask=mask.clone() if new_mask else mask)
        y.backward(gy)
        results[new_mask] = (y.detach(), x.grad.clone(), _buffers(norm))
    torch.testing.assert_close(results[False], results[True], rtol=0, atol=0)


def _pad_stack(name, kwargs, seed=0):
    """Linear -> norm -> Linear in float64, as in a transformer sublayer."""
    torch.manual_seed(seed)
    return torch.nn.ModuleDict({
        "inp": torch.nn.Linear(C, C), "norm": build_norm(name, C, **kwargs),
        "out": torch.nn.Linear(C, C)}).double().train()


@pytest.mark.parametrize("cfg", CONFIGS, ids=_ids(CONFIGS))
def test_appended_pads_change_no_gradient(cfg):
    """Appending pad steps of random content (the loss ignores pads) leaves every parameter
    gradient and buffer unchanged, before and after warmup; issue 13 fault 1. The reference
    variant's backward applies its correction to pads too (deviation D5), so there pads do
    change the first Linear's gradient once ``ema_gz`` is non-zero; BN with the released pad
    statistics counts every pad row in its variance, so there they change it from the start."""
    _, name, kwargs = cfg
    plain, padded = _pad_stack(name, kwargs), _pad_stack(name, kwargs)
    gen = torch.Generator().manual_seed(5)
    reference = kwargs.get("variant") == "reference"
    diluted = kwargs.get("pad_statistics") == "released"
    changed = []
    for step in range(4):  # warmup_updates=2 where set: two PN-V steps, then PN
        x, pad = _batch(dtype=torch.float64, seed=30 + step)
        extra = 3
        x_ext = torch.cat([x, torch.randn(extra, *x.shape[1:], generator=gen,
                                          dtype=torch.float64) * 3.0])
        pad_ext = torch.cat([pad, torch.ones(pad.shape[0], extra, dtype=torch.bool)], dim=1)
        target = torch.randn(x.shape, generator=gen, dtype=torch.float64)
        for stack, inp, mask in ((plain, x, pad), (padded, x_ext, pad_ext)):
            stack["norm"].set_num_updates(step)
            stack.zero_grad()
            h = stack["norm"](stack["inp"](inp), padding_mask=mask)
            out = stack["out"](h)[: x.shape[0]]
            (out * target)[~pad.t()].sum().backward()
        grads = [(n, p.grad, q.grad) for (n, p), q in
                 zip(plain.named_parameters(), padded.parameters(), strict=True)]
        if reference or diluted:
            changed.append(max(((a - b).norm() / a.norm()).item() for _, a, b in grads))
            continue
        for pname, a, b in grads:
            assert (a - b).norm() <= 1e-6 * a.norm() + 1e-12, (step, pname)
        torch.testing.assert_close(_buffers(plain), _buffers(padded), rtol=1e-9, atol=1e-12)
    if reference:
        assert changed[0] <= 1e-6 and max(changed) > 1e-3  # D5, documented
    if diluted:
        assert min(changed) > 1e-3  # the released BN's diluted variance, documented


@pytest.mark.parametrize(("w", "safeguard", "acts"),
                         [(1.5, True, False), (1.99, True, False), (2.0, True, True),
                          (3.0, True, True), (3.0, False, False)])
def test_safeguard_acts_only_where_nu_recurrence_does_not_contract(w, safeguard, acts):
    """``w = (1 - alpha_bkw) Gamma``: the step of ``nu`` is Algorithm 2's while ``|1 - w| < 1``;
    for ``w >= 2`` the safeguard makes ``nu_t = Lambda / Gamma``; issue 13 fault 6."""
    a_b = 0.5
    norm = build_norm("power", 1, alpha_bkw=a_b, safeguard=safeguard, affine=False,
                      eps=2.0 ** -20).double()  # w = 2 exactly: 1/4 - eps + eps is exact
    gamma = w / (1 - a_b)
    with torch.no_grad():  # running psi^2 such that mean(x_hat^2) = gamma for x = +-1
        norm.running_psi2.fill_(1.0 / gamma - norm.eps)
        norm.nu.fill_(0.3)
    x = torch.tensor([[1.0], [-1.0], [1.0], [-1.0]], dtype=torch.float64, requires_grad=True)
    gy = torch.tensor([[0.2], [0.1], [0.4], [0.3]], dtype=torch.float64)
    norm(x).backward(gy)
    x_hat = x.detach() * gamma ** 0.5
    lam = (gy * x_hat).mean()
    algorithm_2 = 0.3 * (1 - w) + (1 - a_b) * lam
    expected = lam / gamma if acts else algorithm_2
    torch.testing.assert_close(norm.nu, expected.reshape(1))


@pytest.mark.parametrize(("w", "counted"), [(1.5, False), (2.5, True)])
def test_reference_counts_unstable_only_where_recurrence_does_not_contract(w, counted):
    """The reference variant's ``num_unstable`` uses the paper variant's condition ``w >= 2``."""
    a_b = 0.5
    norm = build_norm("power", 1, variant="reference", alpha_bkw=a_b, group_num=0,
                      affine=False).double()
    with torch.no_grad():
        norm.running_phi.fill_((1 - a_b) / w - norm.eps)
    x = torch.tensor([[1.0], [-1.0], [1.0], [-1.0]], dtype=torch.float64, requires_grad=True)
    norm(x).backward(torch.ones_like(x))
    assert int(norm.num_unstable) == int(counted)


def test_non_finite_statistics_are_skipped_without_safeguard():
    """The skip of non-finite statistics does not depend on ``safeguard`` (fault 6's words)."""
    for safeguard in (True, False):
        norm = build_norm("power", C, safeguard=safeguard)
        x, _ = _batch()
        x[0, 0, 0] = float("inf")
        norm(x.requires_grad_()).backward(torch.ones(x.shape))
        assert torch.isfinite(norm.running_psi2).all() and torch.isfinite(norm.nu).all()


@pytest.mark.parametrize("cfg", STATEFUL, ids=_ids(STATEFUL))
def test_eval_is_fixed_affine_map(cfg, on_device):
    _, name, kwargs = cfg
    norm = _make(name, kwargs).train()
    for t in range(3):
        x, pad = _batch(seed=t, scale=2.0, mean=0.5)
        norm.set_num_updates(t)
        norm(x, pad)
    norm.eval()
    before = _buffers(norm)
    x, pad = _batch(seed=99)
    with torch.no_grad():
        y = norm(x, pad)
        y_other = norm(x, None)
    torch.testing.assert_close(before, _buffers(norm))
    torch.testing.assert_close(y, y_other)  # eval output does not depend on the mask
    scale, shift = norm.eval_affine()
    assert scale.shape == shift.shape == (C,)
    group_num = 1 if kwargs.get("prescale") else kwargs.get("group_num", 0)
    assert norm.has_prescale == bool(group_num)
    x_in = group_rms_scale(x, group_num, 1e-5) if group_num else x
    torch.testing.assert_close(y, x_in * scale + shift)
    assert norm.training is False


def test_layer_norm_matches_torch_and_has_no_eval_affine():
    norm = _make("layer", {})
    ref = torch.nn.LayerNorm(C)
    ref.load_state_dict(norm.state_dict())
    x, pad = _batch()
    torch.testing.assert_close(norm(x, pad), ref(x))
    assert norm.eval_affine() is None and norm.has_prescale is False


def test_train_and_eval_differ_and_running_stats_move():
    norm = _make("power_v", {}).train()
    x, pad = _batch(scale=3.0)
    y_train = norm(x, pad)
    assert not torch.allclose(norm.running_psi2, torch.ones(C))
    norm.eval()
    assert not torch.allclose(norm(x, pad), y_train)


@pytest.mark.parametrize("cfg", CONFIGS, ids=_ids(CONFIGS))
def test_no_host_sync_in_training_step(cfg, monkeypatch, on_device):
    """Forward and backward never read tensor values on the host (.item(), bool(), int())."""
    _, name, kwargs = cfg
    norm = _make(name, kwargs).train()
    x, pad = _batch()
    x.requires_grad_()

    def forbidden(*args, **kwargs):
        raise AssertionError("host sync in the training step")

    for method in ("item", "__bool__", "__int__", "__float__", "__index__", "tolist"):
        monkeypatch.setattr(torch.Tensor, method, forbidden)
    for step in range(3):
        norm.set_num_updates(step)
        norm(x, padding_mask=pad).backward(torch.ones(x.shape))
    monkeypatch.undo()
    assert torch.isfinite(x.grad).all()


# ----------------------------------------------------------------------------- state dict

@pytest.mark.parametrize("cfg", STATEFUL, ids=_ids(STATEFUL))
def test_state_dict_round_trip(cfg, on_device):
    _, name, kwargs = cfg
    norm = _make(name, kwargs).train()
    for t in range(3):
        x, pad = _batch(seed=t)
        norm.set_num_updates(t)
        norm(x.requires_grad_(), pad).sum().backward()
    state = norm.state_dict()
    assert state._metadata[""]["version"] == type(norm)._version
    fresh = build_norm(name, C, **kwargs)
    fresh.load_state_dict(state)
    torch.testing.assert_close(_buffers(fresh), _buffers(norm))
    x, pad = _batch(seed=50)
    norm.eval()
    fresh.eval()
    torch.testing.assert_close(fresh(x, pad), norm(x, pad))
    # a checkpoint rewritten without metadata (e.g. averaged) loads too
    plain = {k: v.clone() for k, v in state.items()}
    build_norm(name, C, **kwargs).load_state_dict(plain)


def test_paper_num_updates_survives_reload():
    norm = PowerNormPaper(C, warmup_updates=5)
    norm.set_num_updates(7)
    fresh = PowerNormPaper(C, warmup_updates=5)
    fresh.load_state_dict(norm.state_dict())
    assert fresh._num_updates_host == 7 and int(fresh.num_updates) == 7


# ----------------------------------------------------------------------------- precision

@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("cfg", CONFIGS, ids=_ids(CONFIGS))
def test_half_precision_input(cfg, dtype, on_device):
    _, name, kwargs = cfg
    norm = _make(name, kwargs).train()
    x, pad = _batch(scale=200.0)  # x^2 overflows fp16: statistics must be float32
    xh = x.to(dtype).requires_grad_()
    y = norm(xh, pad)
    assert y.dtype == dtype and torch.isfinite(y).all()
    y.float().sum().backward()
    assert xh.grad.dtype == dtype and torch.isfinite(xh.grad).all()
    for buf in norm.buffers():
        assert buf.dtype in (torch.float32, torch.long) and torch.isfinite(buf.float()).all()
    ref = _make(name, kwargs).train()
    torch.testing.assert_close(y.float(), ref(xh.detach().float(), pad), atol=0.05, rtol=0.02)


@pytest.mark.parametrize("cfg", CONFIGS, ids=_ids(CONFIGS))
def test_half_module(cfg, on_device):
    """fairseq --fp16 casts parameters and buffers to fp16: statistics still in float32."""
    _, name, kwargs = cfg
    norm = _make(name, kwargs).half().train()
    for t in range(2):
        x, pad = _batch(seed=t, scale=200.0)
        xh = x.half().requires_grad_()
        y = norm(xh, pad)
        assert y.dtype == torch.float16 and torch.isfinite(y).all()
        y.float().sum().backward()
        assert torch.isfinite(xh.grad).all() and norm.weight.grad.dtype == torch.float16
    for buf in norm.buffers():
        assert buf.dtype in (torch.float32, torch.long) and torch.isfinite(buf).all()


@pytest.mark.parametrize("cfg", CONFIGS, ids=_ids(CONFIGS))
def test_autocast(cfg, on_device):
    _, name, kwargs = cfg
    norm = _make(name, kwargs).train()
    proj = torch.nn.Linear(C, C)
    x, pad = _batch()
    with torch.autocast(torch.device(on_device).type, dtype=torch.bfloat16):
        h = proj(x)
        y = norm(h, pad)
        assert y.dtype == h.dtype == torch.bfloat16
        y_fp32 = norm(x, pad)
        assert y_fp32.dtype == torch.float32
    y.float().sum().backward()
    assert torch.isfinite(proj.weight.grad).all()


# ----------------------------------------------------------------------------- degenerate batches

@pytest.mark.parametrize("cfg", CONFIGS, ids=_ids(CONFIGS))
def test_all_padding_and_empty_batch(cfg, on_device):
    _, name, kwargs = cfg
    norm = _make(name, kwargs).train()
    x, pad = _batch()
    norm(x, pad).sum().backward()  # non-trivial state first
    before = {k: v for k, v in _buffers(norm).items() if k not in ("iters", "num_updates")}
    for x, mask in ((torch.randn(5, 3, C), torch.ones(3, 5, dtype=torch.bool)),
                    (torch.randn(0, 3, C), torch.zeros(3, 0, dtype=torch.bool)),
                    (torch.randn(4, 0, C), torch.zeros(0, 4, dtype=torch.bool)),
                    (torch.randn(0, C), None)):
        x.requires_grad_()
        y = norm(x, padding_mask=mask)
        assert y.shape == x.shape and torch.isfinite(y).all()
        y.sum().backward()
        assert torch.isfinite(x.grad).all()
        after = {k: v for k, v in _buffers(norm).items() if k in before}
        torch.testing.assert_close(after, before)


# ----------------------------------------------------------------------------- stability (issue #8)

def _drifting_run(norm, steps, seed=0):
    """Activations whose scale drifts 100x up and down within a few steps; yields
    (y, grad_x) per step."""
    gen = torch.Generator().manual_seed(seed)
    pad = torch.zeros(2, 4, dtype=torch.bool)
    pad[1, 3] = True
    for t in range(steps):
        scale = 10.0 ** (2.0 * torch.sin(torch.tensor(t / 2.0)).item())
        x = (torch.randn(4, 2, C, generator=gen) * scale).requires_grad_()
        y = norm(x, padding_mask=pad)
        y.backward(torch.randn(y.shape, generator=gen))
        yield y, x.grad


@pytest.mark.slow
def test_paper_variant_stays_finite_under_scale_drift():
    """(1 - alpha_bkw) * Gamma reaches ~60 here: the safeguard (nu = Lambda / Gamma wherever
    it reaches 2) keeps nu bounded."""
    max_nu = {}
    for safeguard, steps in ((True, 2000), (False, 400)):
        norm = _make("power", {"safeguard": safeguard}).train()
        max_nu[safeguard] = 0.0
        for y, grad in _drifting_run(norm, steps):
            if safeguard:
                assert torch.isfinite(y).all() and torch.isfinite(grad).all()
            max_nu[safeguard] = max(max_nu[safeguard], norm.nu.abs().max().item())
        if safeguard:
            for name, buf in norm.named_buffers():
                assert torch.isfinite(buf.float()).all(), name
            assert torch.isfinite(norm.weight.grad).all()
    assert max_nu[True] < 2.0
    assert not max_nu[False] < 10 * max_nu[True]  # without the safeguard nu is amplified (or NaN)


def test_reference_variant_counts_instability_and_warns_once():
    norm = _make("power", {"variant": "reference", "group_num": 0}).train()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for _ in _drifting_run(norm, 400):
            pass
    assert int(norm.num_unstable) > 0
    norm._warned = False
    with pytest.warns(RuntimeWarning, match="unstable"):
        norm.state_dict()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        norm.state_dict()  # only once per module


def test_reference_counts_only_forward_calls_in_training():
    norm = PowerNormReference(C, warmup_updates=3)
    x, pad = _batch()
    norm.set_num_updates(100)  # no effect: the released counter counts training forwards
    norm(x, pad)
    norm(x, pad)
    norm.eval()
    norm(x, pad)
    assert int(norm.iters) == 2


def test_power_is_an_alias_of_the_variant_classes():
    """``power`` selects a registered class by ``variant``; each class has its own name."""
    from powernorm_fairseq.norms import POWER_VARIANTS, norm_family

    assert type(build_norm("power", C)) is NORM_REGISTRY["power"] is PowerNormPaper
    for variant, cls in POWER_VARIANTS.items():
        by_alias = build_norm("power", C, variant=variant)
        by_name = build_norm(f"power_{variant}", C)
        assert type(by_alias) is type(by_name) is cls
        assert norm_family(by_alias) == "power"
    assert [norm_family(NORM_REGISTRY[name]) for name in NORM_CHOICES] == list(NORM_CHOICES)
    assert norm_family(torch.nn.LayerNorm(C)) is None


@pytest.mark.parametrize("cfg", CONFIGS, ids=_ids(CONFIGS))
def test_state_interface(cfg):
    """fold and the tracker read a norm's state through ``prescale_groups``,
    ``running_statistics`` and ``backward_nu``: they must describe the eval map and follow
    training."""
    _, name, kwargs = cfg
    norm = _make(name, kwargs)
    groups = 1 if kwargs.get("prescale") else kwargs.get("group_num", 0)
    assert norm.prescale_groups() == groups and norm.has_prescale == bool(groups)
    stats = norm.running_statistics()
    keys = {"layer": set(), "batch": {"mean", "var"}, "power_v": {"psi2"}, "power": {"psi2"}}
    assert set(stats) == keys[name]
    assert (norm.backward_nu() is None) == (name != "power")
    if name == "layer":
        return
    before = {k: v.clone() for k, v in stats.items()}
    nu_before = None if norm.backward_nu() is None else norm.backward_nu().clone()
    x, pad = _batch()
    norm(x.requires_grad_(), pad).sum().backward()
    after = norm.running_statistics()
    assert all(not torch.equal(before[k], after[k]) for k in stats)  # views of the live buffers
    if nu_before is not None:
        assert not torch.equal(nu_before, norm.backward_nu())
    norm.eval()
    weight, bias = norm.weight.detach(), norm.bias.detach()
    stat = after["var"] if name == "batch" else after["psi2"]
    scale, shift = norm.eval_affine()
    torch.testing.assert_close(scale, weight * torch.rsqrt(stat + norm.eps))
    mean = after.get("mean", torch.zeros(C))
    torch.testing.assert_close(shift, bias - mean * scale)



def test_layer_norm_takes_no_sync_options():
    """LN has no batch statistics: a sync option would be stored and ignored, so it is refused."""
    for option in ({"sync_stats": True}, {"process_group": None}):
        with pytest.raises(ValueError, match="unknown option"):
            build_norm("layer", C, **option)
    assert "sync_stats" not in repr(build_norm("layer", C))
