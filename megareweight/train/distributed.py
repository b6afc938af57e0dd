"""Small helpers over ``torch.distributed`` that are no-ops in a single process."""
from __future__ import annotations

import pickle
from typing import Any, Callable, Optional, TypeVar

import torch
import torch.distributed as dist

_CONTROL_GROUP: Optional[dist.ProcessGroup] = None
_SHUT_DOWN = False  # set by shutdown() once it destroyed this process's groups
T = TypeVar("T")


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


def control_group() -> Optional[dist.ProcessGroup]:
    """A CPU (gloo) group for control decisions: stop requests, refusals, "all ranks wrote".

    Why not the default group: under NCCL a control flag would have to go to the GPU and back
    (a device sync per step for the stop check), and ``broadcast_object_list`` before the engine
    has set each rank's device puts every rank on GPU 0. Created on first use, which every rank
    reaches at the same point (the run-directory claim at the start of training).
    """
    global _CONTROL_GROUP
    if not is_distributed():
        return None
    if dist.get_backend() == "gloo":
        return dist.group.WORLD
    if _CONTROL_GROUP is None:
        _CONTROL_GROUP = dist.new_group(backend="gloo")
    return _CONTROL_GROUP


def shutdown() -> None:
    """Destroy every process group at the end of a rank's run, while the interpreter is fully alive.

    Why: a gloo group left to interpreter teardown can abort the rank with SIGABRT ("terminate
    called without an active exception") when its worker threads still hold the work objects of
    asynchronous collectives, which ZeRO-3's parameter prefetch issues; the launcher then reports
    a failed run although training finished. Call it only on a clean exit that every rank reaches
    (a finished run, an agreed stop): ranks that are still inside a collective cannot shut down
    together, and after an error the process exits anyway.
    """
    global _CONTROL_GROUP, _SHUT_DOWN
    if is_distributed():
        dist.destroy_process_group()  # every group, the control group included
        _SHUT_DOWN = True
    _CONTROL_GROUP = None


def was_shut_down() -> bool:
    """Whether :func:`shutdown` destroyed this process's groups (it ran torch.distributed)."""
    return _SHUT_DOWN


def all_true(flag: bool) -> bool:
    """True on every rank iff ``flag`` is true on every rank (a barrier too)."""
    if not is_distributed() or world_size() == 1:
        return bool(flag)
    value = torch.tensor([0 if flag else 1], dtype=torch.int32)
    dist.all_reduce(value, op=dist.ReduceOp.MAX, group=control_group())
    return int(value) == 0


def max_over_ranks(value: int) -> int:
    """The largest of every rank's ``value`` (on every rank)."""
    if not is_distributed() or world_size() == 1:
        return int(value)
    box = torch.tensor([int(value)], dtype=torch.int64)
    dist.all_reduce(box, op=dist.ReduceOp.MAX, group=control_group())
    return int(box)


def broadcast_object(obj, src: int = 0):
    """Rank ``src``'s Python object on every rank (e.g. a decision to stop)."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src, group=control_group())
    return box[0]


def decided_by_rank0(decide: Callable[[], T], is_writer: bool) -> T:
    """Run ``decide`` on the writing rank only; every rank returns its result or raises its error.

    For decisions that touch the file system (claiming the run directory, choosing the checkpoint):
    one rank decides, so ranks cannot disagree, and an error on that rank is raised on every rank
    instead of leaving the others waiting in the next collective.
    """
    outcome: Any = None
    if is_writer:
        try:
            outcome = ("ok", decide())
        except Exception as exc:  # noqa: BLE001 - re-raised on every rank below
            try:
                pickle.dumps(exc)
            except Exception:  # noqa: BLE001
                exc = RuntimeError(str(exc))
            outcome = ("error", exc)
    kind, value = broadcast_object(outcome)
    if kind == "error":
        raise value
    return value
