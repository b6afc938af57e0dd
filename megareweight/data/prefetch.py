"""Build the next micro-batches in a background thread, without changing the stream or its state.

Why: :meth:`MixtureSampler.next_batch` reads memory-mapped shards and stacks windows on the main
thread, between the GPU's steps. :class:`PrefetchLoader` runs it ``depth`` batches ahead in one
background thread, pins the batches on CUDA (so the engine's ``non_blocking`` host-to-device copy
is a real asynchronous DMA and not a staged, synchronising copy) and hands them over in order.

What stays exact:

* **The stream.** One thread calls the sampler, in order, so the batches are those of the plain
  sampler, bit for bit (a test checks it).
* **The state.** The sampler runs ahead of training, so its own state is wrong for a checkpoint.
  Each batch travels with the sampler state right after it was drawn; :meth:`state_dict` returns
  the state after the last batch *consumed*, so resuming from a checkpoint replays nothing and
  skips nothing.
* **Mixture changes.** :meth:`set_weights` and :meth:`load_state_dict` stop the thread, drop the
  prefetched batches and rewind the sampler to the consumed state before changing it, so a new
  mixture applies from the next consumed batch, exactly as with the plain sampler.

The sampler belongs to the background thread while it runs; every other read goes through this
class (``epochs()`` and ``tokens_consumed()`` are computed from the consumed state).
"""
from __future__ import annotations

import queue
import threading
import weakref
from typing import Any, Mapping, Optional, Sequence

import numpy as np
import torch

from megareweight.data.mixture import MixtureSampler

_POLL_SECONDS = 0.1


def _produce(sampler: MixtureSampler, out: queue.Queue, stop: threading.Event, pin: bool,
             device: Optional[torch.device]) -> None:
    """The thread's body: (batch, state after it) pairs in order; an exception is handed over too.

    It holds no reference to the loader, so an abandoned loader is garbage-collected (and its
    finaliser stops this thread).
    """
    try:
        if pin and device is not None and device.index is not None:
            torch.cuda.set_device(device)  # pin through this device's context, as DataLoader does
        while not stop.is_set():
            batch = sampler.next_batch()
            if pin:
                batch = {k: v.pin_memory() if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
            item: Any = (batch, sampler.state_dict())
            while not stop.is_set():
                try:
                    out.put(item, timeout=_POLL_SECONDS)
                    break
                except queue.Full:
                    continue
    except BaseException as exc:  # noqa: BLE001 - re-raised on the consumer's thread
        out.put(exc)


def _stop_thread(thread: threading.Thread, stop: threading.Event, items: queue.Queue) -> None:
    stop.set()
    while thread.is_alive():
        try:  # unblock a put() that is waiting for room
            items.get(timeout=_POLL_SECONDS)
        except queue.Empty:
            pass
    thread.join()


class PrefetchLoader:
    """A :class:`MixtureSampler` with its next ``depth`` micro-batches built in the background.

    Same interface as the sampler for what the training loop uses (``next_batch``,
    ``state_dict``/``load_state_dict``, ``set_weights``, ``weights``, ``domains``, ``epochs``,
    ``tokens_consumed``, ``global_batch_size``). ``depth=0`` calls the sampler directly.
    """

    def __init__(self, sampler: MixtureSampler, depth: int = 2, pin_memory: bool = False,
                 device: Optional[torch.device] = None):
        if depth < 0:
            raise ValueError(f"data.prefetch must be >= 0, got {depth}")
        self.sampler = sampler
        self.depth = depth
        self.pin_memory = pin_memory
        self.device = device
        self._state = sampler.state_dict()
        self._ahead = False  # the sampler has drawn batches that were not consumed
        self._thread: Optional[threading.Thread] = None
        self._stop: Optional[threading.Event] = None
        self._items: Optional[queue.Queue] = None
        self._finalizer: Optional[weakref.finalize] = None

    # --- the sampler's interface ----------------------------------------------------------------
    @property
    def domains(self) -> list[str]:
        return self.sampler.domains

    @property
    def weights(self) -> np.ndarray:
        return np.array([self._state["weights"][d] for d in self.domains])

    @property
    def global_batch_size(self) -> int:
        return self.sampler.global_batch_size

    def next_batch(self) -> dict[str, torch.Tensor]:
        if self.depth == 0:
            batch = self.sampler.next_batch()
            self._state = self.sampler.state_dict()
            return batch
        if self._thread is None:
            self._start()
        item = self._items.get()
        if isinstance(item, BaseException):
            self.close()
            raise item
        batch, self._state = item
        return batch

    def state_dict(self) -> dict[str, Any]:
        """The sampler state after the last consumed batch (what a checkpoint must hold)."""
        return {k: (dict(v) if isinstance(v, dict) else v) for k, v in self._state.items()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Drop prefetched batches and continue from ``state``."""
        self.close()
        self.sampler.load_state_dict(state)
        self._state = self.sampler.state_dict()
        self._ahead = False

    def set_weights(self, weights: Mapping[str, float] | Sequence[float]) -> None:
        """New mixture from the next consumed batch: prefetched batches are dropped and redrawn."""
        self.close()
        self._rewind()
        self.sampler.set_weights(weights)
        self._state = self.sampler.state_dict()

    def epochs(self) -> dict[str, float]:
        """Passes over each domain as of the last consumed batch (see ``MixtureSampler.epochs``)."""
        consumed = self._state["consumed"]
        return {d: (consumed[d] / float(n) if n else 0.0) for d, n in zip(self.domains, self.sampler.windows)}

    def tokens_consumed(self) -> dict[str, int]:
        """Training tokens drawn from each domain as of the last consumed batch, over all ranks."""
        return {d: int(self._state["consumed"][d]) * self.sampler.seq_len for d in self.domains}

    # --- the thread -------------------------------------------------------------------------------
    def _rewind(self) -> None:
        """Put the sampler back to the consumed state, with the weights bit for bit
        (``MixtureSampler.load_state_dict`` renormalises them, which may move the last bit)."""
        if self._ahead:
            self.sampler.load_state_dict(self._state)
            self.sampler.weights = self.weights
            self._ahead = False

    def _start(self) -> None:
        self._rewind()  # continue right after the last consumed batch
        self._ahead = True
        self._items = queue.Queue(maxsize=self.depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=_produce, args=(self.sampler, self._items, self._stop, self.pin_memory, self.device),
            name="megareweight-prefetch", daemon=True)
        self._thread.start()
        self._finalizer = weakref.finalize(self, _stop_thread, self._thread, self._stop, self._items)

    def close(self) -> None:
        """Stop the thread and drop what it prefetched (the consumed state is kept)."""
        if self._finalizer is not None:
            self._finalizer()  # runs _stop_thread once
        self._thread = self._stop = self._items = self._finalizer = None
