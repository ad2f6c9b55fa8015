"""PN ``variant="reference"`` against the released MaskPowerNorm, number for number.

``tests/data/reference_powernorm.json`` holds the released module's outputs, gradients and buffers
step by step on fixed inputs (3 cases: with/without padding, group_num 1/2/4, warmup 2/4).
"""

import json
from collections import OrderedDict
from pathlib import Path

import pytest
import torch

from powernorm_fairseq.norms import PowerNormReference, build_norm

DATA = json.loads((Path(__file__).parent / "data" / "reference_powernorm.json").read_text())
CASES = {case["name"]: case for case in DATA["cases"]}
TOL = {"atol": 1e-5, "rtol": 1e-5}
# every test here runs on both the fused CPU kernels and the eager path (tests/conftest.py)
pytestmark = pytest.mark.usefixtures("kernel_path")


def _tensor(values):
    return torch.tensor(values, dtype=torch.float32)


def _build(case):
    norm = build_norm("power", case["C"], variant="reference", eps=case["eps"],
                      alpha_fwd=case["alpha_fwd"], alpha_bkw=case["alpha_bkw"],
                      warmup_updates=case["warmup_iters"], group_num=case["group_num"],
                      warmup_unit="forwards")  # the released module counts its forward calls
    with torch.no_grad():
        norm.weight.copy_(_tensor(case["weight"]))
        norm.bias.copy_(_tensor(case["bias"]))
    return norm


def _mask(case):
    mask = case["pad_mask_B_T"]
    return None if mask is None else torch.tensor(mask, dtype=torch.bool)


@pytest.mark.parametrize("name", sorted(CASES))
def test_matches_released_module_step_by_step(name):
    case = CASES[name]
    norm = _build(case).train()
    mask = _mask(case)
    for k, step in enumerate(case["steps"]):
        norm.zero_grad()
        x = _tensor(step["x_T_B_C"]).requires_grad_()
        y = norm(x, padding_mask=mask)
        y.backward(_tensor(step["grad_y"]))
        where = f"{name} step {k}"
        torch.testing.assert_close(y, _tensor(step["y"]), **TOL, msg=f"y, {where}")
        torch.testing.assert_close(x.grad, _tensor(step["grad_x"]), **TOL,
                                   msg=f"grad_x, {where}")
        torch.testing.assert_close(norm.weight.grad, _tensor(step["grad_weight"]), **TOL,
                                   msg=f"grad_weight, {where}")
        torch.testing.assert_close(norm.bias.grad, _tensor(step["grad_bias"]), **TOL,
                                   msg=f"grad_bias, {where}")
        torch.testing.assert_close(norm.running_phi.view(-1), _tensor(step["running_phi_after"]),
                                   **TOL, msg=f"running_phi, {where}")
        torch.testing.assert_close(norm.ema_gz.view(-1), _tensor(step["ema_gz_after"]), **TOL,
                                   msg=f"ema_gz, {where}")
        assert int(norm.iters) == k + 1
    norm.eval()
    with torch.no_grad():
        y = norm(_tensor(case["eval"]["x_T_B_C"]), padding_mask=mask)
    torch.testing.assert_close(y, _tensor(case["eval"]["y"]), **TOL)
    assert int(norm.iters) == len(case["steps"])
    assert int(norm.num_unstable) == 0


def test_released_state_dict_loads():
    """A state dict in the released format (no num_unstable, no version metadata) loads."""
    case = CASES["pad_group2"]
    C = case["C"]
    released = {
        "weight": _tensor(case["weight"]),
        "bias": _tensor(case["bias"]),
        "running_phi": torch.linspace(0.5, 2.0, C).view(1, C, 1, 1),
        "ema_gz": torch.linspace(-0.1, 0.1, C).view(1, C, 1, 1),
        "iters": torch.tensor([7], dtype=torch.long),
    }
    norm = PowerNormReference(C, group_num=2)
    norm.load_state_dict(released)
    assert int(norm.iters) == 7 and int(norm.num_unstable) == 0
    torch.testing.assert_close(norm.running_phi, released["running_phi"])
    torch.testing.assert_close(norm.ema_gz, released["ema_gz"])
    scale, shift = norm.eval_affine()
    torch.testing.assert_close(scale, released["weight"] / (released["running_phi"].view(-1)
                                                            + 1e-5).sqrt())
    torch.testing.assert_close(shift, released["bias"])


def _released_state_after(case, k, prefix=""):
    """The released ``MaskPowerNorm``'s state dict after step ``k`` of ``case``, as torch saves it:
    an OrderedDict with ``_metadata`` version 1 (torch's default ``_version``) for the module."""
    C = case["C"]
    step = case["steps"][k]
    state = OrderedDict([
        (prefix + "weight", _tensor(case["weight"])),
        (prefix + "bias", _tensor(case["bias"])),
        (prefix + "running_phi", _tensor(step["running_phi_after"]).view(1, C, 1, 1)),
        (prefix + "ema_gz", _tensor(step["ema_gz_after"]).view(1, C, 1, 1)),
        (prefix + "iters", torch.tensor([k + 1], dtype=torch.long)),
    ])
    state._metadata = OrderedDict([(prefix.rstrip("."), {"version": 1})])
    return state


def _continue_like_released(name, norm, mask, start, grads_of=None):
    """Steps ``start..`` of ``case`` from the loaded state equal the released module's."""
    case = CASES[name]
    grads_of = grads_of or norm
    for k in range(start, len(case["steps"])):
        step = case["steps"][k]
        grads_of.zero_grad()
        x = _tensor(step["x_T_B_C"]).requires_grad_()
        y = norm(x, padding_mask=mask)
        y.backward(_tensor(step["grad_y"]))
        where = f"{name} step {k} after loading"
        torch.testing.assert_close(y, _tensor(step["y"]), **TOL, msg=f"y, {where}")
        torch.testing.assert_close(x.grad, _tensor(step["grad_x"]), **TOL, msg=f"grad_x, {where}")
        torch.testing.assert_close(norm.weight.grad, _tensor(step["grad_weight"]), **TOL,
                                   msg=f"grad_weight, {where}")
        torch.testing.assert_close(norm.running_phi.view(-1), _tensor(step["running_phi_after"]),
                                   **TOL, msg=f"running_phi, {where}")
        torch.testing.assert_close(norm.ema_gz.view(-1), _tensor(step["ema_gz_after"]), **TOL,
                                   msg=f"ema_gz, {where}")
        assert int(norm.iters) == k + 1


@pytest.mark.parametrize("name", sorted(CASES))
def test_released_state_dict_with_metadata_loads_strictly_and_continues(name):
    """Issue #13 fault 3: the released module's own ``state_dict()`` (``_metadata`` version 1,
    no ``num_unstable``) loads strictly, and training continues as the released module did."""
    case = CASES[name]
    start = 1  # state after the first step; the remaining steps must match
    norm = _build(case).train()
    norm.load_state_dict(_released_state_after(case, start - 1), strict=True)
    assert int(norm.num_unstable) == 0
    _continue_like_released(name, norm, _mask(case), start)


@pytest.mark.parametrize("name", sorted(CASES))
def test_released_model_checkpoint_with_metadata_loads_strictly(name, tmp_path):
    """The same state nested in a model's state dict, as fairseq saves it
    (``torch.save({"model": model.state_dict(), ...})``, metadata per submodule), loads
    strictly into a model holding the reference variant and continues identically."""
    case = CASES[name]

    class Layer(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = torch.nn.Linear(case["C"], case["C"])
            self.final_layer_norm = _build(case)

    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.encoder = torch.nn.Module()
            self.encoder.layers = torch.nn.ModuleList([Layer()])

    source = Model()
    prefix = "encoder.layers.0.final_layer_norm."
    state = source.state_dict()
    metadata = state._metadata
    for key in [k for k in state if k.startswith(prefix)]:
        del state[key]
    released = _released_state_after(case, 0, prefix)
    state.update(released)
    metadata.update(released._metadata)  # torch's own entries for the parents, v1 for the norm
    state._metadata = metadata
    assert state._metadata[prefix.rstrip(".")] == {"version": 1}
    path = tmp_path / "checkpoint_last.pt"
    torch.save({"model": state, "args": None, "optimizer_history": []}, path)

    model = Model().train()
    loaded = torch.load(path, weights_only=False)["model"]
    assert loaded._metadata[prefix.rstrip(".")]["version"] == 1  # the metadata survives pickling
    model.load_state_dict(loaded, strict=True)
    norm = model.encoder.layers[0].final_layer_norm
    _continue_like_released(name, norm, _mask(case), 1, grads_of=model)
