"""Cross-rank reduction of normalization statistics.

All statistics a norm needs for one step are packed into a single flat tensor and summed with ONE
``all_reduce`` (like ``torch.nn.SyncBatchNorm`` packs mean/invstd/count), so ``W`` workers see the
statistics of the concatenated batch. Everything here is a no-op unless ``sync_stats`` is on,
``torch.distributed`` is initialized and the group has more than one rank.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor


def sync_enabled(sync_stats: bool, process_group=None) -> bool:
    """Return True when statistics must be all-reduced over ``process_group``.

    Called once per forward (not per tensor) and reads only host-side state: no device sync.
    """
    if not sync_stats or not dist.is_available() or not dist.is_initialized():
        return False
    return dist.get_world_size(process_group) > 1


def all_reduce_packed(tensors: list[Tensor], process_group=None) -> list[Tensor]:
    """Sum each tensor of ``tensors`` over all ranks with one collective.

    Args:
        tensors: tensors of any shape, one floating dtype, on the same device.
        process_group: group to reduce over (default: the world).

    Returns:
        New tensors, same shapes and dtypes as the inputs, holding the sums over ranks. The inputs
        are not modified (their originals stay valid as local statistics, e.g. for parameter grads).
    """
    flat = torch.cat([t.reshape(-1) for t in tensors])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=process_group)
    out, offset = [], 0
    for t in tensors:
        out.append(flat[offset:offset + t.numel()].view_as(t))
        offset += t.numel()
    return out


def maybe_all_reduce(tensors: list[Tensor], enabled: bool, process_group=None) -> list[Tensor]:
    """:func:`all_reduce_packed` when ``enabled`` (see :func:`sync_enabled`), else the inputs."""
    return all_reduce_packed(tensors, process_group) if enabled else list(tensors)
