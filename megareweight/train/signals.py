"""SIGTERM / SIGINT / SIGUSR1: finish the current step, write a checkpoint, exit resumable.

Why a flag and a step-boundary check, not work in the handler: a checkpoint is a collective
under DeepSpeed, and a handler runs at an arbitrary point of one rank's Python code. The handler
only records the signal; at the end of every step the loop asks :meth:`StopRequests.agreed`,
which is a MAX all-reduce of one integer over the CPU control group, so all ranks stop after the
same step even when the signal reached only some of them (a cluster may signal only the
launcher's children on one node). Cost: one tiny CPU all-reduce per step in a distributed run,
nothing in one process.

Signals: SIGTERM (``kill``, SLURM at the time limit or on pre-emption), SIGINT (Ctrl-C), SIGUSR1
(SLURM's advance warning, ``#SBATCH --signal=USR1@180``; see ``launch/slurm_train.sbatch``). A
second SIGINT interrupts at once (:class:`KeyboardInterrupt`, no checkpoint): the way out when a
step hangs. The exit code is ``128 + signal number`` (130 SIGINT, 143 SIGTERM, 138 SIGUSR1), the
shell's convention for "ended by this signal", so a job script can tell a resumable stop from a
finished run (0) or a failure (1, 2).
"""
from __future__ import annotations

import signal
import sys
import threading
from pathlib import Path
from types import FrameType
from typing import Any, Optional

from megareweight.train.distributed import max_over_ranks, rank, world_size

HANDLED = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)


class StoppedBySignal(Exception):
    """Training stopped cleanly after a signal; ``checkpoint`` holds the state to resume from."""

    def __init__(self, signum: int, step: int, checkpoint: Optional[Path]):
        self.signum, self.step, self.checkpoint = signum, step, checkpoint
        self.exit_code = 128 + signum
        where = f"checkpoint {checkpoint}" if checkpoint else "no checkpoint written"
        super().__init__(f"stopped by {signal.Signals(signum).name} after step {step}; {where}")


class StopRequests:
    """Context manager: installs the handlers (main thread only) and restores the previous ones."""

    def __init__(self, announce: bool = True):
        self.signum = 0
        self.announce = announce
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, _frame: Optional[FrameType]) -> None:
        if signum == signal.SIGINT and self.signum == signal.SIGINT:
            raise KeyboardInterrupt
        if not self.signum:
            self.signum = signum
            if self.announce:
                where = f" by rank {rank()}" if world_size() > 1 else ""
                print(f"[megareweight] {signal.Signals(signum).name} received{where}: finishing this step and "
                      "writing a checkpoint (Ctrl-C again to abort without one)", file=sys.stderr, flush=True)

    def __enter__(self) -> "StopRequests":
        if threading.current_thread() is threading.main_thread():
            for signum in HANDLED:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    def agreed(self) -> int:
        """The signal any rank received (0: none), the same on every rank; call at step boundaries."""
        return max_over_ranks(self.signum)
