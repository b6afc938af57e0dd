"""Small helpers over ``torch.distributed`` that are no-ops in a single process."""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank(group: Optional[dist.ProcessGroup] = None) -> int:
    return dist.get_rank(group) if is_distributed() else 0


def world_size(group: Optional[dist.ProcessGroup] = None) -> int:
    return dist.get_world_size(group) if is_distributed() else 1


def all_reduce_sum(tensor: torch.Tensor, group: Optional[dist.ProcessGroup] = None) -> torch.Tensor:
    """Sum over ranks in place (and return it); unchanged in one process."""
    if is_distributed() and world_size(group) > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=group)
    return tensor


def broadcast_object(obj, src: int = 0):
    """Rank ``src``'s Python object on every rank (e.g. a decision to stop)."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]
