"""Numerical robustness of the norms (issue #13, faults 4 and 5), on both kernel paths.

- Fault 4: masked BN's variance in float32 is as accurate as torch's ``F.batch_norm`` (within
  10x) when the data's mean is 1e2 to 1e4 standard deviations away from zero (the first steps,
  and after a shift of the data: the running mean is then far from the batch mean).
- Fault 5: inf or NaN at pad positions reaches no real-token output, no real-token input
  gradient, no parameter gradient and no buffer.

Every test runs with the fused CPU kernels and with the eager torch path (the CUDA path), on each
available device (``device`` and ``kernel_path`` fixtures, tests/conftest.py).
"""

import pytest
import torch
import torch.nn.functional as F

from powernorm_fairseq.norms import build_norm

pytestmark = pytest.mark.usefixtures("kernel_path")
C = 16

# (id, name, kwargs): every registered family; PN's paper variant before and after warmup
CONFIGS = [
    ("layer", "layer", {}),
    ("batch", "batch", {}),
    ("batch_prescale", "batch", {"prescale": True}),
    ("power_v", "power_v", {}),
    ("power_paper_warmup", "power", {"warmup_updates": 100, "group_num": 2}),
    ("power_paper", "power", {}),
    ("power_paper_groups", "power", {"group_num": 2}),
]


def _ids(configs):
    return [c[0] for c in configs]


def _make(name, kwargs, device, seed=0):
    torch.manual_seed(seed)
    norm = build_norm(name, C, **kwargs).to(device)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
        norm.bias.uniform_(-0.2, 0.2)
    return norm.train()


def _pad_mask(T, B, device):
    pad = torch.zeros(B, T, dtype=torch.bool)
    pad[0, T - 3:] = True
    pad[2, T - 1:] = True
    pad[3, 1:] = True  # a sentence of one real token
    return pad.to(device)


# ----------------------------------------------------------------------------- fault 4

def _masked_bn_truth(x, pad, weight, bias, eps):
    """Masked BN in float64 on the float32 input: ``(y (T, B, C), mean, biased var)``."""
    xd = x.double()
    real = (~pad).t()
    rows = xd[real]
    mean = rows.mean(0)
    var = rows.var(0, unbiased=False)
    y = (xd - mean) / torch.sqrt(var + eps) * weight.double() + bias.double()
    return y, mean, var


@pytest.mark.parametrize("offset", [1e2, 1e3, 1e4], ids=["mean1e2", "mean1e3", "mean1e4"])
def test_batch_norm_variance_is_stable_in_float32(offset, device):
    """First training step (running mean 0) on data with mean/std = ``offset``: the output and
    the running statistics are within 10x of torch float32 BN's error against float64."""
    T, B = 24, 8
    gen = torch.Generator().manual_seed(3)
    x = (torch.randn(T, B, C, generator=gen) + offset * (1 + torch.rand(C, generator=gen)))
    x = x.to(device)
    pad = _pad_mask(T, B, device)
    norm = _make("batch", {}, device)
    y = norm(x, padding_mask=pad).detach()
    y_true, mean_true, var_true = _masked_bn_truth(x, pad, norm.weight, norm.bias, norm.eps)
    real = (~pad).t()

    # torch's float32 BN on the same real tokens (its own error is the yardstick)
    y_torch = F.batch_norm(x[real], None, None, norm.weight.detach(), norm.bias.detach(),
                           training=True, eps=norm.eps)
    torch_err = (y_torch.double() - y_true[real]).abs().max().item()
    our_err = (y[real].double() - y_true[real]).abs().max().item()
    assert our_err <= 10 * torch_err, (
        f"masked BN output error {our_err:.3g} > 10 x torch float32 BN's {torch_err:.3g}")

    # running statistics: EMA from (0, 1) with momentum 0.1 of the batch mean / unbiased var
    n = real.sum().item()
    mean_exp = 0.1 * mean_true
    var_exp = 0.9 + 0.1 * var_true * n / (n - 1)
    mean_err = (norm.running_mean.double() - mean_exp).abs().max().item()
    var_rel = ((norm.running_var.double() - var_exp) / var_exp).abs().max().item()
    # float32 resolution of the mean itself is ~6e-8 * offset; the variance must not collapse
    assert mean_err <= 1e-6 * offset
    assert var_rel <= 1e-4, f"running_var relative error {var_rel:.3g}"


# ----------------------------------------------------------------------------- fault 5

def _run_steps(name, kwargs, device, pad_value, steps=3):
    """``steps`` training steps with pads filled with ``pad_value`` and zero upstream gradient at
    pads; returns per step (real outputs, real input grads, weight grad, bias grad, buffers)."""
    norm = _make(name, kwargs, device)
    T, B = 6, 4
    pad = _pad_mask(T, B, device)
    real = (~pad).t()
    out = []
    for t in range(steps):
        norm.set_num_updates(t)
        norm.zero_grad()
        gen = torch.Generator().manual_seed(10 + t)
        x = (torch.randn(T, B, C, generator=gen) * 2 + 0.5).to(device)
        gy = torch.randn(T, B, C, generator=gen).to(device)
        gy[pad.t()] = 0.0
        x[pad.t()] = pad_value
        x.requires_grad_()
        y = norm(x, padding_mask=pad)
        y.backward(gy)
        out.append({
            "y": y.detach()[real], "grad_x": x.grad[real],
            "grad_weight": norm.weight.grad.clone(), "grad_bias": norm.bias.grad.clone(),
            **{k: v.clone() for k, v in norm.named_buffers()},
        })
    return out


@pytest.mark.parametrize("bad", [float("inf"), float("-inf"), float("nan")],
                         ids=["inf", "-inf", "nan"])
@pytest.mark.parametrize("cfg", CONFIGS, ids=_ids(CONFIGS))
def test_non_finite_pads_do_not_leak(cfg, bad, device):
    """Pads of inf/NaN give the real-token outputs, real-token input gradients, parameter
    gradients and buffers of pads of zeros (PN paper variant: during and after warmup)."""
    _, name, kwargs = cfg
    clean = _run_steps(name, kwargs, device, 0.0)
    dirty = _run_steps(name, kwargs, device, bad)
    # LN is torch's F.layer_norm (as in the released code): per token, so no real output or
    # input gradient sees a pad, but its weight/bias gradients sum over every position
    skip = {"grad_weight", "grad_bias"} if name == "layer" else set()
    for t, (a, b) in enumerate(zip(clean, dirty, strict=True)):
        for key in sorted(set(a) - skip):
            assert torch.isfinite(b[key].float()).all(), f"step {t}: {key} is not finite"
            torch.testing.assert_close(b[key], a[key], msg=f"step {t}: {key}")


def test_reference_variant_keeps_released_pad_behaviour(device):
    """Documented exception (README section 8): the reference variant's ``ema_gz`` is a mean over
    ALL positions (deviation D5 of the released code), so a non-finite pad reaches it. Its
    forward statistic ``running_phi`` (real tokens only) and first-step outputs stay clean."""
    kwargs = {"variant": "reference", "group_num": 0}
    clean = _run_steps("power", kwargs, device, 0.0, steps=1)[0]
    dirty = _run_steps("power", kwargs, device, float("inf"), steps=1)[0]
    torch.testing.assert_close(dirty["y"], clean["y"])
    torch.testing.assert_close(dirty["running_phi"], clean["running_phi"])
    assert not torch.isfinite(dirty["ema_gz"]).all()


# ----------------------------------------------------------------------------- CPU vs CUDA

AGREEMENT = CONFIGS + [("power_reference", "power", {"variant": "reference", "group_num": 2,
                                                      "warmup_updates": 1})]
PRECISION_TOL = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 5e-2}


@pytest.mark.skipif(not torch.cuda.is_available(),
                    reason="device 'cuda': no CUDA device (torch.cuda.is_available() is False)")
@pytest.mark.parametrize("dtype", list(PRECISION_TOL), ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("cfg", AGREEMENT, ids=_ids(AGREEMENT))
def test_cuda_matches_cpu(cfg, dtype):
    """The same three training steps (with pads, the module cast to ``dtype`` as fairseq
    ``--fp16``/``--bf16`` cast it) on CUDA and on the CPU: outputs, input and parameter
    gradients and buffers agree. The module is built on the CPU and moved (as fairseq does), so
    a tensor created without ``device=`` in the norms would fail here."""
    _, name, kwargs = cfg
    runs = {}
    for device in ("cpu", "cuda"):
        norm = _make(name, kwargs, "cpu").to(device=device, dtype=dtype)
        T, B = 6, 4
        pad = _pad_mask(T, B, device)
        steps = []
        for t in range(3):
            norm.set_num_updates(t)
            norm.zero_grad()
            gen = torch.Generator().manual_seed(30 + t)
            x = (torch.randn(T, B, C, generator=gen) * 3 + 1).to(device=device, dtype=dtype)
            gy = torch.randn(T, B, C, generator=gen).to(device=device, dtype=dtype)
            x.requires_grad_()
            y = norm(x, padding_mask=pad)
            y.backward(gy)
            steps.append({"y": y, "grad_x": x.grad, "grad_weight": norm.weight.grad,
                          "grad_bias": norm.bias.grad, **dict(norm.named_buffers())})
        runs[device] = [{k: v.detach().cpu().clone() for k, v in s.items()} for s in steps]
    tol = PRECISION_TOL[dtype]
    for t, (a, b) in enumerate(zip(runs["cpu"], runs["cuda"], strict=True)):
        for key in a:
            assert b[key].dtype == a[key].dtype, key
            torch.testing.assert_close(b[key].double(), a[key].double(), atol=tol, rtol=tol,
                                       msg=f"step {t}: {key}, cuda vs cpu")
