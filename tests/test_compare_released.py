"""The parts of ``scripts/compare_released.py`` that need no released code: the float64 runtime
shims (each a no-op for float32)."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def cr():
    # as when the script runs: its directory first on the import path (its parts sit beside it)
    sys.path.insert(0, str(REPO / "scripts"))
    try:
        spec = importlib.util.spec_from_file_location("compare_released",
                                                      REPO / "scripts" / "compare_released.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules["compare_released"] = module
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.path.remove(str(REPO / "scripts"))


# ------------------------------------------------------------------------------ float64 shims

def _params(dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    params = [torch.nn.Parameter(torch.randn(n, generator=g, dtype=dtype)) for n in (7, 30, 3)]
    for p in params:
        p.grad = torch.randn(p.shape, generator=g, dtype=dtype)
    return params


def test_grad_norm_shim_float64_and_float32_unchanged(cr):
    pytest.importorskip("fairseq")
    from fairseq import utils

    shim = cr.clip_grad_norm_any_dtype(utils.clip_grad_norm_)
    p64 = _params(torch.float64)
    with pytest.raises(RuntimeError):  # why the shim exists: fairseq 0.12 norms in float32
        utils.clip_grad_norm_(_params(torch.float64), 0.0)
    exact = torch.cat([p.grad for p in p64]).pow(2).sum().sqrt()
    total = shim(p64, 0.0)
    assert total.dtype == torch.float64
    assert abs(total.item() - exact.item()) <= 1e-14 * exact.item()
    clipped = shim(p64, 1.0)  # clipping: every gradient scaled to a total norm of ~1
    assert torch.equal(clipped, total)
    assert abs(torch.cat([p.grad for p in p64]).norm().item() - 1.0) < 1e-6

    a, b = _params(torch.float32), _params(torch.float32)
    for max_norm in (0.0, 1.0):
        ta, tb = utils.clip_grad_norm_(a, max_norm), shim(b, max_norm)
        assert ta.dtype == tb.dtype == torch.float32 and torch.equal(ta, tb)
        assert all(torch.equal(x.grad, y.grad) for x, y in zip(a, b, strict=True))


def test_softmax_shim_keeps_float64_and_float32_unchanged(cr):
    pytest.importorskip("fairseq")
    from fairseq import utils

    x = torch.randn(3, 5, 11, dtype=torch.float64)
    assert utils.log_softmax(x, dim=-1).dtype == torch.float32  # why the shim exists
    for original, torch_fn in ((utils.softmax, F.softmax), (utils.log_softmax, F.log_softmax)):
        shim = cr.softmax_keeping_float64(original, torch_fn)
        y = shim(x, dim=-1)
        assert y.dtype == torch.float64 and torch.equal(y, torch_fn(x, dim=-1))
        x32 = x.float()
        assert torch.equal(shim(x32, dim=-1), original(x32, dim=-1))
        assert torch.equal(shim(x32, -1, onnx_trace=True), original(x32, -1, onnx_trace=True))


class _Float32Step(torch.optim.Optimizer):
    """fairseq 0.8's pattern: compute on ``.float()`` copies, then copy back."""

    def __init__(self, params):
        super().__init__(params, {"lr": 1.0})

    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                data = p.data.float()
                data.add_(p.grad.data.float(), alpha=-1e-9)
                p.data.copy_(data)


def test_step_in_param_dtype_float64_and_float32_unchanged(cr):
    before = torch.Tensor.float
    opt_cls = type("Shimmed", (_Float32Step,), {})
    opt_cls.step = cr.step_in_param_dtype(_Float32Step.step)

    p = torch.nn.Parameter(torch.ones(4, dtype=torch.float64))
    q = torch.nn.Parameter(torch.ones(4, dtype=torch.float64))
    p.grad = q.grad = torch.full((4,), 1.0 + 2**-40, dtype=torch.float64)
    _Float32Step([q]).step()
    assert torch.equal(q.detach(), torch.ones(4, dtype=torch.float64))  # float32: step lost
    opt_cls([p]).step()
    assert torch.equal(p.detach(), 1.0 - 1e-9 * p.grad)  # float64: the step is there
    assert torch.Tensor.float is before or "float" not in torch.Tensor.__dict__
    assert torch.ones(2, dtype=torch.float64).float().dtype == torch.float32  # restored

    a = torch.nn.Parameter(torch.randn(5))
    b = torch.nn.Parameter(a.detach().clone())
    a.grad = b.grad = torch.randn(5) * 1e6
    _Float32Step([a]).step()
    opt_cls([b]).step()
    assert torch.equal(a, b)


# ------------------------------------------------------------------------------- --max-tokens

def test_parse_max_tokens(cr):
    norms = ["power", "batch", "layer"]
    assert cr.parse_max_tokens("4096", norms) == dict.fromkeys(norms, 4096)
    assert cr.parse_max_tokens("power=512, batch=256,layer=256", norms) == {
        "power": 512, "batch": 256, "layer": 256}
    for bad in ("power=512,batch=256", "power=512,batch=256,layer=256,rms=1", "lots",
                "power=0,batch=1,layer=1"):
        with pytest.raises(SystemExit, match="--max-tokens"):
            cr.parse_max_tokens(bad, norms)


# ---------------------------------------------------------------- the released worker's imports

@pytest.mark.parametrize("kind", ["released", "released_post", "ours", "ours_post"])
def test_every_released_worker_imports_fairseq_from_the_released_checkout(cr, kind, tmp_path, monkeypatch):
    """Both released workers (training and the post-warmup phase) get the released checkout first on
    PYTHONPATH (no sys.path edit); our workers never do."""
    seen = {}

    def fake_run(cmd, env, cwd):
        seen.update(env=env, cmd=cmd)
        return type("Done", (), {"returncode": 0})()

    monkeypatch.setattr(cr.subprocess, "run", fake_run)
    monkeypatch.delenv("PYTHONPATH", raising=False)
    cr._run_worker(kind, {"work": str(tmp_path), "released": "/released/checkout"}, threads=1)
    assert (seen["env"].get("PYTHONPATH") == "/released/checkout") == kind.startswith("released")


def test_released_shims_refuse_a_worker_that_would_import_our_fairseq(cr, tmp_path):
    with pytest.raises(SystemExit, match="would import fairseq from"):
        cr.apply_released_shims(tmp_path)  # this process's fairseq is 0.12, not under tmp_path


# ------------------------------------------------------------------------- record provenance

def test_the_record_marks_a_commit_whose_tracked_files_were_modified(tmp_path):
    """A run on uncommitted code must not be recorded as the bare HEAD commit (both records'
    commits come from :func:`powernorm_fairseq.pipeline.common.checkout_commit`)."""
    from powernorm_fairseq.pipeline.common import checkout_commit

    def git(*args):
        subprocess.run(["git", "-C", str(tmp_path), *args], check=True, capture_output=True)

    git("init", "-q")
    (tmp_path / "a.py").write_text("x = 1\n")
    (tmp_path / "results").mkdir()
    (tmp_path / "results" / "r.json").write_text("{}\n")
    git("add", "a.py", "results/r.json")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "a")
    head = checkout_commit(tmp_path)
    assert len(head) == 40 and "+" not in head
    (tmp_path / "untracked.txt").write_text("scratch\n")  # untracked files are not code that ran
    assert checkout_commit(tmp_path) == head
    (tmp_path / "results" / "r.json").write_text("{1}\n")  # excluded paths do not count
    assert checkout_commit(tmp_path, exclude=("results",)) == head
    assert checkout_commit(tmp_path) == head + "+dirty"
    (tmp_path / "a.py").write_text("x = 2\n")
    assert checkout_commit(tmp_path, exclude=("results",)) == head + "+dirty"
    assert checkout_commit(tmp_path / "missing") is None


def test_update_freq_reaches_both_programs_and_groups_the_batches(cr, tmp_path):
    """``--update-freq K``: each update accumulates the next K batches, in both programs."""
    spec = {"updates": 3, "update_freq": 2, "resume_at": 99, "max_tokens": 128, "warmup": 1,
            "data": "/data", "norm": "layer", "work": "/w", "dtype": "float64"}
    seen = []
    batches = list(range(6))
    import tempfile
    with tempfile.TemporaryDirectory() as d:
        cr.train_loop(lambda samples: seen.append(samples) or {}, torch.nn.Linear(1, 1),
                      batches, spec, None, Path(d) / "out.pt")
    assert seen == [[0, 1], [2, 3], [4, 5]]
    argv = cr.released_argv(spec)
    assert argv[argv.index("--update-freq") + 1] == "2"
    assert cr._update_freq({"updates": 3}) == 1  # records from before the option
    released, data = tmp_path / "released", tmp_path / "data"
    (released / "fairseq" / "modules" / "norms").mkdir(parents=True)
    (released / "fairseq" / "modules" / "norms" / "mask_powernorm.py").write_text("")
    data.mkdir()
    for lang in ("de", "en"):
        (data / f"dict.{lang}.txt").write_text("a 1\n")
    with pytest.raises(SystemExit, match="--update-freq 0"):
        cr.main(["--released", str(released), "--data", str(data), "--update-freq", "0"])
