"""Statistics tracking (powernorm_fairseq.analysis.tracking): columns equal a direct computation,
tracking off (or closed) changes nothing, steps/resume/errors behave."""

from __future__ import annotations

import copy
import csv
import math

import pytest
import torch
from torch import nn

from powernorm_fairseq.analysis.tracking import COLUMNS, attach_tracker
from powernorm_fairseq.norms import build_norm, norm_names

LAYER = "encoder.layers.0.self_attn_layer_norm"
T, B, C = 5, 3, 8


class _Layer(nn.Module):
    def __init__(self, norm: nn.Module) -> None:
        super().__init__()
        self.self_attn_layer_norm = norm
        self.fc = nn.Linear(C, C)


class _Encoder(nn.Module):
    def __init__(self, norm: nn.Module) -> None:
        super().__init__()
        self.layers = nn.ModuleList([_Layer(norm)])


class TinyModel(nn.Module):
    """Just enough structure to carry the fairseq name ``encoder.layers.0.self_attn_layer_norm``."""

    def __init__(self, norm: nn.Module) -> None:
        super().__init__()
        self.encoder = _Encoder(norm)

    @property
    def norm(self) -> nn.Module:
        return self.encoder.layers[0].self_attn_layer_norm

    def forward(self, x, mask):
        y = self.norm(x, padding_mask=mask)
        out = self.encoder.layers[0].fc(y)
        keep = (~mask).t().unsqueeze(-1).to(out.dtype)  # pads get no gradient, as in fairseq
        return y, (out.pow(2) * keep).sum()


def _batch(seed: int):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, B, C, generator=g) * 2 + 0.5
    mask = torch.zeros(B, T, dtype=torch.bool)
    mask[1, 3:] = True
    mask[2, 4:] = True
    x = x.masked_fill(mask.t().unsqueeze(-1), 0.0)
    return x, mask


# every registered norm, plus the pre-scaled and reference variants (their statistics are taken
# over the group-RMS-scaled input)
CASES = [(name, {}) for name in norm_names()] + [
    ("batch", {"prescale": True}),
    ("batch", {"pad_statistics": "released"}),  # sigma_B^2 diluted over all T*B rows, as it normalizes
    ("power", {"variant": "paper", "group_num": 2, "warmup_updates": 1}),
    ("power", {"variant": "reference", "group_num": 2}),
    ("power", {"variant": "reference", "group_num": 0, "warmup_updates": 2, "warmup_unit": "forwards"}),
]
CASE_IDS = [n + "".join(f"-{k}={v}" for k, v in kw.items()) for n, kw in CASES]


def _model(name: str, seed: int = 0, **kw) -> TinyModel:
    torch.manual_seed(seed)
    model = TinyModel(build_norm(name, C, **kw))
    with torch.no_grad():  # non-trivial affine so that gamma matters in g = gamma * dL/dy
        model.norm.weight.uniform_(0.5, 1.5)
        if model.norm.bias is not None:  # RMSNorm has none
            model.norm.bias.uniform_(-0.2, 0.2)
    return model


def _read(path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _running(norm: nn.Module, names) -> torch.Tensor | None:
    for n in names:
        v = getattr(norm, n, None)
        if isinstance(v, torch.Tensor):
            return v.detach().reshape(-1).double().clone()
    return None


def _expected(norm, x, mask, grad_y, y, before, shadow, kind):
    """Direct computation of every column from the docstring's formulas (float64); updates the
    shadow running statistics (BN's rule, momentum 0.1) of the statistics ``norm`` lacks."""
    keep = ~mask.t()
    xs = x.double()
    if getattr(norm, "has_prescale", False):
        grp = xs.reshape(T, B, getattr(norm, "group_num", 1), -1)
        xs = (grp / (grp.pow(2).mean(-1, keepdim=True) + norm.eps).sqrt()).reshape(T, B, C)
    xr, gr, yr = xs[keep], grad_y.double()[keep], y.detach().double()[keep]
    n, d = xr.shape
    g = gr * norm.weight.detach().double()
    mu, var, psi2 = xr.mean(0), xr.var(0, unbiased=False), xr.pow(2).mean(0)
    if getattr(norm, "pad_statistics", None) == "released":
        var = (xr - mu).pow(2).sum(0) / (T * B)
    ref = {k: before[k] if before[k] is not None else shadow[k].clone() for k in shadow}
    for k, batch in (("mu", mu), ("var", xr.var(0, unbiased=True)), ("psi2", psi2)):
        shadow[k] = 0.9 * shadow[k] + 0.1 * batch
    s, p = (var + norm.eps).sqrt(), (psi2 + norm.eps).sqrt()
    xh, xp = (xr - mu) / s, xr / p
    exp = {
        "tokens": n, "d": d,
        "mu_dist": (mu - ref["mu"]).norm() / d,
        "var_dist": (var - ref["var"]).norm() / d,
        "psi2_dist": (psi2 - ref["psi2"]).norm() / d,
        "g_mu": (g.mean(0) / s).norm() / d,
        "g_var": (xh * (g * xh).mean(0) / s).norm(dim=1).mean() / d,
        "g_psi2": (xp * (g * xp).mean(0) / p).norm(dim=1).mean() / d,
    }  # fmt: skip
    if kind == "power":
        z = (yr - norm.bias.detach().double()) / norm.weight.detach().double()
        big_gamma = z.pow(2).mean(0)
        exp.update(gamma_mean=big_gamma.mean(), gamma_max=big_gamma.max(),
                   **{"lambda": (g * z).mean(0).norm() / d})
    return {k: float(v) for k, v in exp.items()}


@pytest.mark.parametrize(("name", "kw"), CASES, ids=CASE_IDS)
def test_columns_match_direct_computation(tmp_path, name, kw):
    model = _model(name, **kw)
    path = tmp_path / "stats.csv"
    tracker = attach_tracker(model, path)
    expected = []
    shadow = {"mu": torch.zeros(C).double(), "var": torch.ones(C).double(),
              "psi2": torch.ones(C).double()}
    for step in range(3):
        model.norm.set_num_updates(step)
        x, mask = _batch(step)
        before = {
            "mu": _running(model.norm, ("running_mean",)),
            "var": _running(model.norm, ("running_var",)),
            "psi2": _running(model.norm, ("running_psi2", "running_phi")),
        }
        nu_before = None
        if name == "power":
            nu_before = _running(model.norm, ("nu",))
            if nu_before is None:
                nu_before = (1 - model.norm.alpha_bkw) * _running(model.norm, ("ema_gz",))
        y, loss = model(x, mask)
        y.retain_grad()
        loss.backward()
        exp = _expected(model.norm, x, mask, y.grad, y, before, shadow, name)
        if nu_before is not None:
            exp["nu"] = float(nu_before.norm() / C)
        expected.append(exp)
        model.zero_grad()
    tracker.close()

    rows = _read(path)
    assert list(rows[0].keys()) == list(COLUMNS)
    assert [int(r["step"]) for r in rows] == [0, 1, 2]
    for row, exp in zip(rows, expected, strict=True):
        assert row["layer"] == LAYER and row["norm"] == name and int(row["micro"]) == 0
        for col, value in exp.items():
            assert float(row[col]) == pytest.approx(value, rel=2e-5, abs=1e-9), col
        if name != "power":
            assert row["gamma_max"] == row["nu"] == ""


def test_shadow_ema_for_layer_norm(tmp_path):
    """LN has no running stats: the second step compares with the shadow EMA after one update."""
    model = _model("layer")
    path = tmp_path / "s.csv"
    tracker = attach_tracker(model, path, shadow_momentum=0.5)
    xs = [_batch(s) for s in range(2)]
    for x, mask in xs:
        model(x, mask)[1].backward()
    tracker.close()
    x0 = xs[0][0][~xs[0][1].t()].double()
    x1 = xs[1][0][~xs[1][1].t()].double()
    mu_run = 0.5 * torch.zeros(C) + 0.5 * x0.mean(0)
    var_run = 0.5 * torch.ones(C) + 0.5 * x0.var(0, unbiased=True)
    row = _read(path)[1]
    assert float(row["mu_dist"]) == pytest.approx(float((x1.mean(0) - mu_run).norm() / C), rel=2e-5)
    assert float(row["var_dist"]) == pytest.approx(
        float((x1.var(0, unbiased=False) - var_run).norm() / C), rel=2e-5)


@pytest.mark.parametrize(("name", "kw"), CASES, ids=CASE_IDS)
def test_tracking_changes_nothing(tmp_path, name, kw):
    """Off: nothing registered. On, then closed: same outputs, grads and buffers; hooks removed."""
    base = _model(name, **kw)
    assert attach_tracker(base, None) is None and attach_tracker(base, "") is None
    assert not base.norm._forward_hooks and not base.norm._forward_pre_hooks
    assert "set_num_updates" not in vars(base.norm)
    tracked = copy.deepcopy(base)
    tracker = attach_tracker(tracked, tmp_path / "s.csv")
    for step in range(3):
        x, mask = _batch(step)
        outs = []
        for model in (base, tracked):
            model.norm.set_num_updates(step)
            y, loss = model(x, mask)
            loss.backward()
            outs.append((y.detach(), [p.grad.clone() for p in model.parameters()]))
            model.zero_grad()
        assert torch.equal(outs[0][0], outs[1][0])
        for g0, g1 in zip(outs[0][1], outs[1][1], strict=True):
            assert torch.equal(g0, g1)
    for (k, b0), b1 in zip(base.state_dict().items(), tracked.state_dict().values(), strict=True):
        assert torch.equal(b0, b1), k
    tracker.close()
    assert not tracked.norm._forward_hooks and not tracked.norm._forward_pre_hooks
    assert "set_num_updates" not in vars(tracked.norm)
    assert len(_read(tmp_path / "s.csv")) == 3


def test_steps_micro_eval_and_resume(tmp_path):
    model = _model("batch")
    path = tmp_path / "s.csv"
    tracker = attach_tracker(model, path, layer_names="encoder.layers[0].self_attn_layer_norm",
                             flush_every=1)
    x, mask = _batch(0)
    for update in (4, 4, 5):  # gradient accumulation: two forward calls in update 4
        for m in model.modules():  # what fairseq's BaseFairseqModel.set_num_updates does
            if hasattr(m, "set_num_updates") and m is not model:
                m.set_num_updates(update)
        model(x, mask)[1].backward()
    model.eval()
    model(x, mask)  # eval calls are not recorded
    model.train()
    model(x, torch.ones(B, T, dtype=torch.bool))  # only pads: no statistic, no row
    with torch.no_grad():
        model(x, mask)  # no gradient: backward columns stay empty
    tracker.close()
    rows = _read(path)
    assert [(r["step"], r["micro"]) for r in rows] == [("4", "0"), ("4", "1"), ("5", "0"), ("5", "1")]
    assert rows[-1]["g_var"] == "" and rows[-1]["var_dist"] != ""

    # fallback counter (no set_num_updates): continues after the last logged step
    resumed = attach_tracker(_model("batch"), path)
    model2 = resumed.layers[0].module
    TinyModel(model2)(x, mask)[1].backward()
    resumed.close()
    assert _read(path)[-1]["step"] == "6"


def test_errors(tmp_path):
    model = _model("layer")
    with pytest.raises(ValueError, match="no module named 'encoder.layers.1.x'.*self_attn_layer_norm"):
        attach_tracker(model, tmp_path / "s.csv", ["encoder.layers.1.x"])
    bad = tmp_path / "bad.csv"
    bad.write_text("a,b\n1,2\n")
    with pytest.raises(ValueError, match="different header"):
        attach_tracker(model, bad)
    with pytest.raises(ValueError, match="shadow_momentum"):
        attach_tracker(model, tmp_path / "t.csv", shadow_momentum=0.0)


def test_nan_formatting(tmp_path):
    """A NaN statistic is written as 'nan', not dropped (a diverging run must stay visible)."""
    model = _model("layer")
    path = tmp_path / "s.csv"
    tracker = attach_tracker(model, path)
    x, mask = _batch(0)
    x[0, 0, 0] = math.nan
    model(x, mask)[1].backward()
    tracker.close()
    assert _read(path)[0]["mu_dist"] == "nan"


def test_only_rank_zero_records(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_rank", lambda group=None: 1)
    model = _model("batch")
    assert attach_tracker(model, tmp_path / "s.csv") is None
    assert not model.norm._forward_pre_hooks and not (tmp_path / "s.csv").exists()


def _train_steps(model, tracker, updates):
    x, mask = _batch(0)
    for update in updates:
        for m in model.modules():  # what fairseq's BaseFairseqModel.set_num_updates does
            if hasattr(m, "set_num_updates") and m is not model:
                m.set_num_updates(update)
        model(x, mask)[1].backward()
    tracker.close()


def test_existing_file_is_continued_only_by_a_resume_of_its_run(tmp_path):
    path = tmp_path / "s.csv"
    pn = _model("power")
    _train_steps(pn, attach_tracker(pn, path, start_step=0), range(4))
    written = path.read_bytes()
    # a brand-new run (update 0), of another norm or of the same norm: refused, file untouched
    for name in ("batch", "power"):
        with pytest.raises(ValueError, match=r"s\.csv holds .*not continued.*--track-norm-stats"):
            attach_tracker(_model(name), path, start_step=0)
    with pytest.raises(ValueError, match="another norm or layer"):
        attach_tracker(_model("batch"), path, start_step=3)
    assert path.read_bytes() == written
    # a resume from update 2 (rows 2 and 3 were logged after that checkpoint): they are replaced
    resumed = _model("power")
    _train_steps(resumed, attach_tracker(resumed, path, start_step=2), (2, 3, 4))
    assert [int(r["step"]) for r in _read(path)] == [0, 1, 2, 3, 4]
    # a file that starts later (update 5) than the checkpoint being resumed (3): not continued
    later = _model("power")
    _train_steps(later, attach_tracker(later, tmp_path / "late.csv", start_step=5), (5, 6))
    with pytest.raises(ValueError, match="steps 5..6 of an earlier run; this run starts at update 3"):
        attach_tracker(_model("power"), tmp_path / "late.csv", start_step=3)
