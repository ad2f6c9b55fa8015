"""``sync_stats=True``: 2 gloo workers on CPU see the statistics of the concatenated batch."""

import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from powernorm_fairseq.norms import build_norm

C, T, B, STEPS = 8, 5, 4, 3
CONFIGS = {
    "batch": ("batch", {}),
    "power_v": ("power_v", {}),
    "power_paper": ("power", {"warmup_updates": 1, "group_num": 2}),
    "power_reference": ("power", {"variant": "reference", "group_num": 2, "warmup_updates": 2,
                                   "warmup_unit": "forwards"}),
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _inputs(step):
    gen = torch.Generator().manual_seed(step)
    x = torch.randn(T, B, C, generator=gen) * (1.0 + step) + 0.5
    grad_y = torch.randn(T, B, C, generator=gen)
    pad = torch.zeros(B, T, dtype=torch.bool)
    pad[0, 3:] = True
    pad[3, 4:] = True
    grad_y[pad.t()] = 0.0
    return x, grad_y, pad


def _run(name, rank, world):
    """Train STEPS steps on this rank's slice of the batch; return outputs, grads, buffers."""
    norm_name, kwargs = CONFIGS[name]
    torch.manual_seed(0)
    norm = build_norm(norm_name, C, sync_stats=world > 1, **kwargs)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
        norm.bias.uniform_(-0.2, 0.2)
    cols = slice(rank * B // world, (rank + 1) * B // world)
    out = []
    for step in range(STEPS):
        x, grad_y, pad = _inputs(step)
        x = x[:, cols].clone().requires_grad_()
        norm.set_num_updates(step)
        norm.zero_grad()
        y = norm(x, padding_mask=pad[cols])
        y.backward(grad_y[:, cols])
        out.append({"y": y.detach(), "grad_x": x.grad, "grad_weight": norm.weight.grad.clone(),
                    "grad_bias": norm.bias.grad.clone(),
                    "buffers": {k: v.clone() for k, v in norm.named_buffers()}})
    return out


def _worker(rank, world, port, path):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world)
    try:
        torch.save({name: _run(name, rank, world) for name in CONFIGS}, f"{path}.{rank}")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_workers_match_one_worker_on_the_concatenated_batch(tmp_path):
    path = str(tmp_path / "result")
    mp.spawn(_worker, args=(2, _free_port(), path), nprocs=2, join=True)
    ranks = [torch.load(f"{path}.{r}") for r in range(2)]
    for name in CONFIGS:
        single = _run(name, 0, 1)
        for step, ref in enumerate(single):
            parts = [ranks[r][name][step] for r in range(2)]
            where = f"{name} step {step}"
            torch.testing.assert_close(torch.cat([p["y"] for p in parts], 1), ref["y"],
                                       msg=f"y, {where}")
            torch.testing.assert_close(torch.cat([p["grad_x"] for p in parts], 1),
                                       ref["grad_x"], msg=f"grad_x, {where}")
            for key in ("grad_weight", "grad_bias"):  # local grads; DDP sums (averages) them
                torch.testing.assert_close(parts[0][key] + parts[1][key], ref[key],
                                           msg=f"{key}, {where}")
            for key, value in ref["buffers"].items():
                for p in parts:
                    torch.testing.assert_close(p["buffers"][key], value, msg=f"{key}, {where}")
