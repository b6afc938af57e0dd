"""Fault injection for tests and drills: a non-finite sample, or a signal, at a chosen step and rank.

``MEGAREWEIGHT_FAULT_NAN=STEP:RANK[:SAMPLE|all][:hidden|loss]`` poisons the first micro-batch of
training step ``STEP`` (1-based, the ``step`` of ``metrics.jsonl``) on global rank ``RANK``:

* ``hidden`` (default): the sample's final hidden states become NaN in the forward and their
  gradient becomes NaN in the backward, as with a real overflow in that sample's activations: the
  NaN reaches the loss *and* the gradients of every layer. The backward half is injected
  explicitly because the loss path may legitimately give a weight-0 sample an exact zero
  gradient (``loss.mode: lean``, the reference), which would hide the fault. The step must be
  skipped on every rank.
* ``loss``: only the sample's loss is non-finite: its tokens are withheld from the loss, which then
  reports the sample's loss as NaN and gives it weight 0 and no gradient, exactly what the loss
  path does with a sample whose loss alone is not finite. The step must be applied.

``SAMPLE`` is the index in the rank's micro-batch (default 0) or ``all``. Several faults are
separated by commas (``3:1,5:0:loss``).

``MEGAREWEIGHT_FAULT_SIGNAL=STEP:RANK:NAME`` (``TERM``, ``INT`` or ``USR1``) sends that signal to
the process of global rank ``RANK`` as step ``STEP`` begins: a pre-emption at an exact step, handled
by the real handler (a test that signals from outside races with the training it signals).

Unset, nothing is wrapped and nothing costs anything. A malformed value is a one-line error naming
the variable.
"""
from __future__ import annotations

import os
import signal
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from megareweight.config import ConfigError

ENV = "MEGAREWEIGHT_FAULT_NAN"
SIGNAL_ENV = "MEGAREWEIGHT_FAULT_SIGNAL"
MODES = ("hidden", "loss")
SIGNALS = {"TERM": signal.SIGTERM, "INT": signal.SIGINT, "USR1": signal.SIGUSR1}


@dataclass(frozen=True)
class NanFault:
    step: int
    rank: int
    sample: Optional[int]  # None: every sample of the micro-batch
    mode: str = "hidden"


def parse(text: str) -> NanFault:
    parts = text.strip().split(":")
    usage = f"{ENV}={text!r}: expected STEP:RANK[:SAMPLE|all][:hidden|loss], e.g. 3:1 or 3:0:all:loss"
    if not 2 <= len(parts) <= 4 or not all(p.isdigit() for p in parts[:2]):
        raise ConfigError(usage)
    mode = parts.pop() if len(parts) > 2 and parts[-1] in MODES else "hidden"
    sample = parts[2] if len(parts) == 3 else "0"
    if not (sample.isdigit() or sample == "all") or int(parts[0]) < 1:
        raise ConfigError(usage)
    return NanFault(int(parts[0]), int(parts[1]), None if sample == "all" else int(sample), mode)


def parse_signal(text: str) -> tuple[int, int, int]:
    """``STEP:RANK:NAME`` -> (step, rank, signal number)."""
    parts = text.strip().split(":")
    if len(parts) != 3 or not (parts[0].isdigit() and parts[1].isdigit()) or parts[2] not in SIGNALS:
        raise ConfigError(f"{SIGNAL_ENV}={text!r}: expected STEP:RANK:NAME with NAME one of "
                          f"{', '.join(SIGNALS)}, e.g. 5:1:USR1")
    return int(parts[0]), int(parts[1]), int(SIGNALS[parts[2]])


class FaultInjector:
    """Wraps the loss function; the loop calls :meth:`begin_step` (1-based) before each step."""

    def __init__(self, faults: list[NanFault], rank: int, signals: Optional[list[tuple[int, int, int]]] = None):
        self.faults, self.rank = faults, rank
        self.signals = signals or []
        self.step = 0
        self._fired_at = -1

    def begin_step(self, step: int) -> None:
        self.step = step
        for at, rank, signum in self.signals:
            if at == step and rank == self.rank:
                os.kill(os.getpid(), signum)

    def _due(self) -> Optional[NanFault]:
        """This step's fault for this rank, once per step (the first micro-batch), while training."""
        if self._fired_at == self.step or not torch.is_grad_enabled():  # evaluation runs under no_grad
            return None
        fault = next((f for f in self.faults if f.step == self.step and f.rank == self.rank), None)
        if fault is not None:
            self._fired_at = self.step
        return fault

    def wrap(self, loss_fn: Callable) -> Callable:
        def poisoned(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, **kw):
            fault = self._due()
            if fault is not None:
                rows = slice(None) if fault.sample is None else fault.sample
                if fault.mode == "hidden":
                    poison = torch.zeros_like(hidden)
                    poison[rows] = float("nan")
                    hidden = hidden + poison  # the identity for autograd: NaN rows forward ...
                    if hidden.requires_grad:
                        hidden.register_hook(lambda grad: grad + poison)  # ... and NaN rows backward
                else:
                    labels = labels.clone()
                    labels[rows] = kw.get("ignore_index", -100)
            return loss_fn(hidden, weight, labels, **kw)

        return poisoned


def from_env(rank: int) -> Optional[FaultInjector]:
    nan = os.environ.get(ENV, "").strip()
    sig = os.environ.get(SIGNAL_ENV, "").strip()
    if not (nan or sig):
        return None
    return FaultInjector([parse(part) for part in nan.split(",")] if nan else [], rank,
                         [parse_signal(part) for part in sig.split(",")] if sig else [])
