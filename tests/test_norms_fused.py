"""The fused CPU kernels (``powernorm_fairseq.norms.fused``) against the eager torch path.

The eager path is the specification: for every registered norm, several training steps (with and
without padding, inside and past PN's warmup) must give the same outputs, gradients and buffers
on both paths: to float64 rounding in float64, and in float32 at least as close to the float64
result as the eager path is. The kernels must also be optional: without a C compiler the norms
warn once and run eagerly.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from powernorm_fairseq.norms import build_norm, fused

REPO = Path(__file__).resolve().parents[1]
C = 16

CONFIGS = [
    ("batch", "batch", {}),
    ("batch_prescale", "batch", {"prescale": True}),
    ("power_v", "power_v", {}),
    ("power_paper", "power", {"warmup_updates": 2}),
    ("power_paper_groups", "power", {"group_num": 4}),
    ("power_reference", "power", {"variant": "reference", "group_num": 4, "warmup_updates": 2,
                                    "warmup_unit": "forwards"}),
    ("power_reference_nogroups", "power", {"variant": "reference", "group_num": 0}),
    # the per-token and element-wise norms that run on kernels too
    ("rms", "rms", {"bias": True}),
    ("group_rms", "group_rms", {"group_num": 4}),
    ("dyt", "dyt", {"alpha_init": 0.7}),
]

pytestmark = pytest.mark.skipif(not fused.available(),
                                reason="fused CPU kernels unavailable (no C compiler)")


def _steps(name, kwargs, use_fused, dtype, masked, steps=4, C=C):
    """Outputs, input/weight/bias gradients and buffers of ``steps`` training steps."""
    old = fused.set_enabled(use_fused)
    try:
        norm = build_norm(name, C, **kwargs).to(dtype)
        gen = torch.Generator().manual_seed(1)
        with torch.no_grad():  # drawn in float64, so both dtypes start from the same values
            norm.weight.copy_(0.5 + torch.rand(C, generator=gen, dtype=torch.float64))
            norm.bias.copy_(0.4 * torch.rand(C, generator=gen, dtype=torch.float64) - 0.2)
        out = []
        for step in range(steps):
            norm.set_num_updates(step)
            x = (torch.randn(9, 5, C, generator=gen, dtype=torch.float64) * 2 + 0.5)
            x = x.to(dtype).requires_grad_()
            pad = None
            if masked:
                pad = torch.zeros(5, 9, dtype=torch.bool)
                pad[0, 6:] = True
                pad[3, 2:] = True
            w = torch.randn(C, generator=gen, dtype=torch.float64).to(dtype)
            y = norm(x, padding_mask=pad)
            (y * w).sum().backward()  # grad_y is an expanded (non-contiguous) tensor
            out += [y.detach(), x.grad, norm.weight.grad.clone(), norm.bias.grad.clone()]
            out += [b.detach().double().clone() for b in norm.buffers()]
            norm.zero_grad()
        return [t.double() for t in out]
    finally:
        fused.set_enabled(old)


@pytest.mark.parametrize("masked", [False, True], ids=["nopad", "pad"])
@pytest.mark.parametrize("cfg", CONFIGS, ids=[c[0] for c in CONFIGS])
def test_fused_equals_eager_in_float64(cfg, masked):
    _, name, kwargs = cfg
    eager = _steps(name, kwargs, False, torch.float64, masked)
    fast = _steps(name, kwargs, True, torch.float64, masked)
    for a, b in zip(fast, eager, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("width", [12, 16, 32, 64, 128])
@pytest.mark.parametrize("cfg", [c for c in CONFIGS if c[0] in ("power_reference", "group_rms")],
                         ids=["power_reference", "group_rms"])
def test_fused_equals_eager_at_every_group_width(cfg, width):
    """The per-group kernels run their rows with the group width a constant for 16, 32, 64 and
    128 channels (``PN_BY_WIDTH``), any other width as a variable: each equals the eager path."""
    _, name, kwargs = cfg
    eager = _steps(name, kwargs, False, torch.float64, True, steps=3, C=4 * width)
    fast = _steps(name, kwargs, True, torch.float64, True, steps=3, C=4 * width)
    for a, b in zip(fast, eager, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("cfg", CONFIGS, ids=[c[0] for c in CONFIGS])
def test_fused_float32_is_as_accurate_as_eager(cfg):
    _, name, kwargs = cfg
    exact = _steps(name, kwargs, False, torch.float64, True)
    for use_fused in (True, False):
        got = _steps(name, kwargs, use_fused, torch.float32, True)
        worst = max(((a - b).abs().max() / b.abs().max().clamp(min=1e-12)).item()
                    for a, b in zip(got, exact, strict=True))
        if use_fused:
            fused_err = worst
        else:
            eager_err = worst
    assert fused_err < 1e-5
    assert fused_err <= 2 * eager_err + 1e-6


def test_the_dyt_kernels_tanh_is_within_two_ulp_of_the_exact_one():
    """The float32 DyT forward computes its own vectorized tanh (torch's is far slower on CPU)."""
    x = torch.cat([torch.linspace(-12, 12, 200_001), torch.tensor([1e-30, -3e-8, 0.625, -0.625, 30.0])])
    one, zero = torch.ones(1), torch.zeros(1)
    y, t = fused.dyt_forward(x.view(-1, 1), one, one, zero)
    exact = torch.tanh(x.double()).float()
    ulp = (torch.nextafter(exact.abs(), torch.tensor(float("inf"))) - exact.abs()).double()
    assert ((t.view(-1).double() - torch.tanh(x.double())).abs() / ulp).max() <= 2.0
    assert torch.equal(y, t)  # weight 1, bias 0
    special = torch.tensor([0.0, -0.0, float("inf"), float("-inf"), float("nan")])
    _, t = fused.dyt_forward(special.view(-1, 1), one, one, zero)
    assert t[0].item() == 0.0 and torch.signbit(t[1]) and t[2].item() == 1.0 and t[3].item() == -1.0
    assert torch.isnan(t[4])


def test_kernels_match_direct_sums():
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(37, C, generator=gen, dtype=torch.float64)
    gy = torch.randn(37, C, generator=gen, dtype=torch.float64)
    keep = (torch.rand(37, generator=gen) > 0.3).double()
    shift = torch.randn(C, generator=gen, dtype=torch.float64)
    k = keep.unsqueeze(1)
    s1, s2, s2all = fused.colstats(x, keep, shift, s1=True, s2all=True)
    torch.testing.assert_close(s1, (k * (x - shift)).sum(0))
    torch.testing.assert_close(s2, (k * (x - shift) ** 2).sum(0))
    torch.testing.assert_close(s2all, ((x - shift) ** 2).sum(0))
    scale, bias = torch.rand(C, dtype=torch.float64), torch.randn(C, dtype=torch.float64)
    y, q = fused.affine_colstats(x, keep, scale, bias)
    torch.testing.assert_close(y, x * scale + bias)
    torch.testing.assert_close(q, (k * x * x).sum(0))
    sgy, sgyx, msgyx = fused.bwd_sums(gy, x, keep, masked=True)
    torch.testing.assert_close(sgy, gy.sum(0))
    torch.testing.assert_close(sgyx, (gy * x).sum(0))
    torch.testing.assert_close(msgyx, (k * gy * x).sum(0))
    assert torch.equal(fused.bwd_sums(gy, x, None, masked=True)[2], fused.bwd_sums(gy, x, None)[1])
    a, b, c = (torch.randn(C, generator=gen, dtype=torch.float64) for _ in range(3))
    gx, g1, g2, g3 = fused.bwd_apply(gy, x, a, b, c, corr_keep=keep, sum_keep=keep, sums=True)
    torch.testing.assert_close(gx, gy * a - k * (x * b + c))
    torch.testing.assert_close(g3, (k * gy * x).sum(0))
    y, rstd = fused.group_rms_forward(x, 4, 1e-5)
    xg = x.view(37, 4, C // 4)
    ref = torch.rsqrt(xg.pow(2).mean(-1) + 1e-5)
    torch.testing.assert_close(rstd, ref)
    torch.testing.assert_close(y, (xg * ref.unsqueeze(-1)).view(37, C))


def test_results_do_not_depend_on_thread_count_beyond_rounding():
    x = torch.randn(4096, 64, dtype=torch.float64)
    keep = (torch.rand(4096) > 0.3).double()
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = fused.colstats(x, keep)[1]
        torch.set_num_threads(2)
        two = fused.colstats(x, keep)[1]
    finally:
        torch.set_num_threads(threads)
    torch.testing.assert_close(one, two, rtol=1e-12, atol=0)


def test_without_compiler_falls_back_to_eager_with_one_warning(tmp_path):
    code = (
        "import warnings, torch\n"
        "from powernorm_fairseq.norms import build_norm, fused\n"
        "with warnings.catch_warnings(record=True) as w:\n"
        "    warnings.simplefilter('always')\n"
        "    n = build_norm('power_v', 8)\n"
        "    for _ in range(3):\n"
        "        n(torch.randn(4, 2, 8, requires_grad=True)).sum().backward()\n"
        "msgs = [str(x.message) for x in w if 'fused CPU kernels unavailable' in str(x.message)]\n"
        "assert len(msgs) == 1, msgs\n"
        "assert not fused.available()\n"
        "print('fallback ok')\n"
    )
    env = dict(os.environ, PN_KERNEL_CACHE=str(tmp_path / "cache"), CC="/bin/false",
               PYTHONPATH=str(REPO), PN_FUSED_KERNELS="1")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "fallback ok" in proc.stdout
    assert not list((tmp_path / "cache").glob("*.so"))  # a failed build leaves nothing behind


def test_switched_off_by_environment(tmp_path):
    code = ("from powernorm_fairseq.norms import fused\n"
            "import torch\n"
            "assert not fused.available() and not fused.usable(torch.ones(2, 2))\n")
    env = dict(os.environ, PN_FUSED_KERNELS="0", PYTHONPATH=str(REPO))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
