"""The contract every registered norm keeps, run over the registry (issue 35).

Each (name, variant) of :func:`powernorm_fairseq.norms.norm_configs` is tested here, so a norm
registered with ``register_norm`` is tested without touching the tests; so is a norm this module
registers itself from outside the package (:class:`OutsideScale`), as a user's own file would,
for the length of this module only (:func:`outside_norm_registered`): the other test modules run
over the plugin's own registry.

The contract: padding invariance (appending pads changes no real-token output, no input gradient
and no buffer; a norm that declares ``pads_enter_backward`` by design, the released PN's D5, is
held to its outputs and forward statistics), a state-dict round trip, train/eval (eval changes
no state and repeats itself), float32 buffers under ``.half()``/bf16, ``torch.compile`` equal to
eager, activation checkpointing changing nothing, the eval map ``eval_affine`` where the norm
declares one (what ``fold_norms`` folds), and a ``fairseq-train --user-dir`` run of a few updates.
"""

from __future__ import annotations

import inspect

import pytest
import torch
from torch.utils.checkpoint import checkpoint

from powernorm_fairseq.norms import (
    MaskedNorm,
    build_norm,
    norm_configs,
    register_norm,
    unregister_norm,
)
from powernorm_fairseq.norms.functional import group_rms_scale

OUTSIDE = "outside_scale"


class OutsideScale(MaskedNorm):
    """A norm defined outside the package: ``y = weight * x + bias`` (no statistics)."""

    stateful = False

    def __init__(self, num_features, eps=1e-5, affine=True, device=None, dtype=None):
        super().__init__(num_features, eps, affine, device=device, dtype=dtype)
        self.reset_parameters()

    def _normalize(self, x2d, keep):
        weight, bias = self._affine_or_identity(x2d.dtype)
        return x2d * weight + bias


@pytest.fixture(scope="module", autouse=True)
def outside_norm_registered():
    """Register :class:`OutsideScale` while this module's tests run, and remove it after, so that
    no other module's tests see a norm their fairseq runs cannot build."""
    register_norm(OUTSIDE, OutsideScale)
    yield
    unregister_norm(OUTSIDE)


C = 8
CONFIGS = norm_configs() + [(OUTSIDE, None)]
IDS = [name if variant is None else f"{name}-{variant}" for name, variant in CONFIGS]


def _make(cfg, seed: int = 0, **kwargs) -> torch.nn.Module:
    name, variant = cfg
    torch.manual_seed(seed)
    norm = build_norm(name, C, **({"variant": variant} if variant else {}), **kwargs)
    with torch.no_grad():  # parameters away from their init, so that the affine is exercised
        for p in norm.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return norm


def _batch(T: int = 6, B: int = 3, seed: int = 1, extra_pads: int = 0):
    """``x (T + extra_pads, B, C)`` and its ``(B, T + extra_pads)`` mask; the appended
    positions are pads holding large values."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, B, C, generator=g, dtype=torch.float64) * 1.5 + 0.3
    pad = torch.zeros(B, T, dtype=torch.bool)
    pad[0, T - 2:] = True
    x[T - 2:, 0] = 50.0
    if extra_pads:
        x = torch.cat([x, 100.0 * torch.ones(extra_pads, B, C, dtype=x.dtype)])
        pad = torch.cat([pad, torch.ones(B, extra_pads, dtype=torch.bool)], dim=1)
    return x, pad


def _buffers(norm) -> dict:
    return {k: v.clone() for k, v in norm.state_dict().items() if not k.endswith(("weight", "bias"))}


def _step(norm, x, pad, seed: int = 5):
    """One training step with a loss on the real tokens: the output, the input gradient."""
    x = x.clone().requires_grad_(True)
    y = norm(x, padding_mask=pad)
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(y.shape[0], y.shape[1], C, generator=g, dtype=y.dtype)
    keep = (~pad).T[..., None].to(y.dtype)
    (y * w * keep).sum().backward()
    return y.detach(), x.grad


@pytest.fixture(params=CONFIGS, ids=IDS)
def cfg(request):
    return request.param


def test_the_outside_norm_is_registered_and_the_paper_norms_come_first():
    names = [name for name, _ in CONFIGS]
    assert names[:5] == ["layer", "batch", "power_v", "power", "power"]
    assert (OUTSIDE, None) in norm_configs()


def test_appending_pads_changes_no_real_token(cfg):
    a, b = _make(cfg).double(), _make(cfg).double()
    T = 6
    for step in range(3):  # past the first step: running statistics and nu are in use
        x, pad = _batch(T, seed=step)
        xl, padl = _batch(T, seed=step, extra_pads=3)
        ya, ga = _step(a, x, pad)
        yb, gb = _step(b, xl, padl)
        real = (~pad).T
        torch.testing.assert_close(yb[:T][real], ya[real], rtol=1e-10, atol=1e-10)
        if getattr(a, "pads_enter_backward", False):
            continue  # by design (declared): the backward's statistics count the pads
        torch.testing.assert_close(gb[:T][real], ga[real], rtol=1e-10, atol=1e-10)
        for key, value in _buffers(a).items():
            torch.testing.assert_close(_buffers(b)[key], value, rtol=1e-10, atol=1e-10, msg=key)


@pytest.mark.parametrize("T,B", [(6, 6), (6, 3)])
def test_batch_first_equals_time_first(cfg, T, B):
    """``batch_first=True`` on ``(B, T, C)`` gives the outputs, input gradients and buffers of the
    default on ``(T, B, C)``, the padding mask ``(B, T)`` in both, also when ``B == T`` (where
    the shapes cannot tell the layouts apart: issue 38)."""
    a, b = _make(cfg).double(), _make(cfg, batch_first=True).double()
    for step in range(3):
        x, pad = _batch(T, B, seed=60 + step)
        ya, ga = _step(a, x, pad)
        yb, gb = _step(lambda x_, padding_mask: b(x_.transpose(0, 1), padding_mask=padding_mask).transpose(0, 1),
                       x, pad)
        torch.testing.assert_close(yb, ya, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(gb, ga, rtol=1e-12, atol=1e-12)
    for key, value in _buffers(a).items():
        torch.testing.assert_close(_buffers(b)[key], value, rtol=1e-12, atol=1e-12, msg=key)
    if T != B:  # a mask of the other layout is refused, naming the layout read
        with pytest.raises(ValueError, match=r"read as \(B, T, C\) \(batch_first=True\)"):
            b(x, padding_mask=pad)


def test_state_dict_round_trip(cfg):
    a = _make(cfg)
    for step in range(2):
        _step(a, *map(lambda t: t.float() if t.is_floating_point() else t, _batch(seed=step)))
    b = _make(cfg, seed=9)
    b.load_state_dict(a.state_dict())
    x, pad = _batch(seed=7)
    x = x.float()
    ya, ga = _step(a, x, pad)
    yb, gb = _step(b, x, pad)
    torch.testing.assert_close(yb, ya, rtol=0, atol=0)
    torch.testing.assert_close(gb, ga, rtol=0, atol=0)
    a.eval(), b.eval()
    torch.testing.assert_close(b(x, pad), a(x, pad), rtol=0, atol=0)


def test_eval_changes_no_state_and_repeats(cfg):
    norm = _make(cfg)
    x, pad = _batch()
    x = x.float()
    _step(norm, x, pad)
    norm.eval()
    before = _buffers(norm)
    with torch.no_grad():
        y1 = norm(x, pad)
        norm(x * 3, pad)
        y2 = norm(x, pad)
    torch.testing.assert_close(y2, y1, rtol=0, atol=0)
    for key, value in before.items():
        torch.testing.assert_close(_buffers(norm)[key], value, rtol=0, atol=0, msg=key)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_floating_buffers_stay_float32_under_half_precision(cfg, dtype):
    norm = _make(cfg).to(dtype)
    for name, buf in norm.named_buffers():
        if buf.is_floating_point():
            assert buf.dtype == torch.float32, name
    for p in norm.parameters():
        assert p.dtype == dtype
    if dtype is torch.bfloat16:  # CPU arithmetic in bf16 (fp16 matmuls are not all on CPU)
        x, pad = _batch()
        y = norm(x.to(dtype), pad)
        assert y.dtype == dtype and torch.isfinite(y.float()).all()


def test_compile_equals_eager(cfg):
    torch._dynamo.reset()
    plain, module = _make(cfg), _make(cfg)
    compiled = torch.compile(module, backend="aot_eager")
    for step in range(3):
        x, pad = _batch(seed=20 + step)
        x = x.float()
        ref = _step(plain, x, pad)
        got = _step(compiled, x, pad)
        for a, b in zip(ref, got, strict=True):
            torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
    for key, value in _buffers(plain).items():
        torch.testing.assert_close(_buffers(module)[key], value, rtol=1e-5, atol=1e-5, msg=key)


@pytest.mark.parametrize("reentrant", [False, True])
def test_activation_checkpointing_changes_nothing(cfg, reentrant):
    plain, module = _make(cfg).double(), _make(cfg).double()
    for step in range(3):
        x, pad = _batch(seed=30 + step)
        ref = _step(plain, x, pad)

        def call(x, padding_mask):
            return checkpoint(module, x, padding_mask, use_reentrant=reentrant)

        got = _step(call, x, pad)
        for a, b in zip(ref, got, strict=True):
            torch.testing.assert_close(b, a, rtol=0, atol=0)
    for key, value in _buffers(plain).items():
        torch.testing.assert_close(_buffers(module)[key], value, rtol=0, atol=0, msg=key)


def test_eval_map_is_what_fold_folds(cfg):
    """Where a norm declares an eval map (``eval_affine`` not None), eval mode is that per-channel
    affine map after its declared GroupScaling (``prescale_groups``): what ``fold_norms`` folds
    into the next linear layer."""
    norm = _make(cfg).double()
    for step in range(2):
        _step(norm, *_batch(seed=40 + step))
    norm.eval()
    affine = norm.eval_affine()
    if affine is None:
        pytest.skip(f"{type(norm).__name__} declares no eval map (not foldable)")
    x, pad = _batch(seed=50)
    groups = norm.prescale_groups()
    z = group_rms_scale(x, groups, 1e-5) if groups else x
    scale, shift = affine
    with torch.no_grad():
        torch.testing.assert_close(norm(x, pad), z * scale.double() + shift.double(), rtol=1e-6, atol=1e-6)


@pytest.mark.slow
def test_every_registered_norm_trains_under_fairseq_user_dir(cfg, fairseq_cli, tiny_mt_data, tmp_path):
    """``fairseq-train --user-dir`` with the norm at every encoder and decoder site: a user-dir of
    one file that imports the plugin and registers :class:`OutsideScale` (as this module does),
    so the registered norms, the outside one included, are all reachable from the command line."""
    name, variant = cfg
    user = tmp_path / "my_norms"
    user.mkdir()
    (user / "__init__.py").write_text(
        "import powernorm_fairseq.models  # noqa: F401  (the plugin's models)\n"
        "from powernorm_fairseq.norms import MaskedNorm, register_norm\n\n\n"
        + f"@register_norm({OUTSIDE!r})\n"
        + inspect.getsource(OutsideScale))  # the class this module registers, as a user's file would
    proc = fairseq_cli(
        "train", tiny_mt_data, "--user-dir", user, "--task", "translation", "-s", "src", "-t", "tgt",
        "--arch", "transformer_pn_tiny", "--share-all-embeddings", "--optimizer", "adam", "--lr", "0.002",
        "--max-tokens", "512", "--max-update", "3", "--seed", "1", "--log-format", "simple",
        "--log-interval", "1", "--no-save", "--encoder-norm", name, "--decoder-norm", name,
        *(["--pn-variant", variant] if variant else []),
    )
    log = proc.stdout + proc.stderr
    assert "num_updates=3" in log or "num_updates 3" in log, log[-2000:]
    assert "nan" not in log.split("num_updates=3")[0].lower().split("| train_inner |")[-1]


def test_a_plain_training_forward_keeps_no_snapshot(cfg):
    """Issue 35 item 7 / issue 39: the recomputation snapshot (a copy of every buffer) is taken
    only where a forward may be recomputed (activation checkpointing), not at every training
    forward."""
    norm = _make(cfg)
    if not norm.stateful:
        pytest.skip("a stateless norm keeps no snapshots")
    x, pad = _batch()
    _step(norm, x.float(), pad)
    assert len(norm._snapshots) == 0
    checkpoint(norm, x.float().requires_grad_(), pad, use_reentrant=False)
    assert len(norm._snapshots) == 1
