"""Mixture-aware, sharded, deterministic, resumable stream of fixed-length training sequences.

Design (in the spirit of OLMo-core's global sample indices):

* Every domain is a stream of shards (:class:`~megareweight.data.shards.TokenStream`), each cut into
  non-overlapping windows of ``seq_len + 1`` tokens (inputs are the first ``seq_len``, labels the
  last ``seq_len``); windows do not straddle shards. The domain's windows are numbered globally
  and visited, epoch after epoch, in the order of a keyed bijection of ``[0, n)`` computed on the
  fly (:mod:`megareweight.data.permutation`), keyed by ``(seed, domain name, epoch)``. Memory per
  rank is O(domains + shards), never O(windows): nothing per window is ever stored.
* Each call draws the domains of the whole *global* micro-batch (``micro_batch_size * world_size``
  slots) from ``numpy.random.default_rng((seed, 0, step))`` with the current weights. Every rank
  computes the same plan and keeps its slots ``[rank*b, (rank+1)*b)``, which is the rank-major
  order the reweighting all-gather uses. Ranks are therefore disjoint by construction.
* The state is only ``step``, the per-domain window counters and the weights: ``state_dict()`` is
  a few numbers, resuming is exact, and because the counters are global the stream also continues
  without repeats or gaps when the number of ranks changes.
* ``set_weights()`` takes effect from the next batch; weights are part of the state.
* ``packing="documents"`` also emits ``segment_ids`` [B, T] (0 = the document the window starts
  in, +1 at every document start, from the ``.idx`` offsets) so that attention and the loss can
  keep documents apart. Nothing crosses a boundary: the label of a document's last input (its
  EOS) would be the next document's first token, predicted from an unrelated context, so it is
  set to ``IGNORE_INDEX``. Each document's inputs and labels are then exactly those of the
  document run alone, truncated to the window (a test checks this against the model).
"""
from __future__ import annotations

import warnings
from typing import Any, Iterator, Mapping, Sequence

import numpy as np
import torch

from megareweight.data.permutation import KeyedPermutation, derive_key, name_salt
from megareweight.data.shards import TokenShard, TokenStream

#: Label value the loss ignores (PyTorch's cross-entropy default; ``train.objective`` uses it too).
IGNORE_INDEX = -100
PACKINGS = ("concat", "documents")
ORDER = "keyed-feistel-v1"  # recorded in the state: how window order is computed


def _as_weights(weights: Mapping[str, float] | Sequence[float], domains: Sequence[str]) -> np.ndarray:
    if isinstance(weights, Mapping):
        unknown = sorted(set(weights) - set(domains))
        if unknown:
            raise ValueError(f"mixture weights name unknown domains {unknown}; available: {', '.join(domains)}")
        arr = np.array([float(weights.get(d, 0.0)) for d in domains])
    else:
        arr = np.asarray(weights, dtype=float)
        if arr.shape != (len(domains),):
            raise ValueError(f"expected {len(domains)} mixture weights (one per domain), got {arr.shape}")
    if not np.all(np.isfinite(arr)) or np.any(arr < 0):
        raise ValueError(f"mixture weights must be finite and >= 0, got {arr.tolist()}")
    if arr.sum() <= 0:
        raise ValueError("mixture weights sum to 0: at least one domain needs a positive weight")
    return arr / arr.sum()


def window_batch(rows: list[np.ndarray], segments: list[np.ndarray] | None) -> dict[str, torch.Tensor]:
    """Windows of ``seq_len + 1`` tokens (and their document numbers) -> inputs, labels, segment ids."""
    tokens = torch.from_numpy(np.stack(rows))
    # clone: with one row both slices are already contiguous views of the same storage
    batch = {"input_ids": tokens[:, :-1].contiguous(), "labels": tokens[:, 1:].clone()}
    if segments is not None:
        seg = torch.from_numpy(np.stack(segments))
        batch["labels"][seg[:, 1:] != seg[:, :-1]] = IGNORE_INDEX
        batch["segment_ids"] = seg[:, :-1].contiguous()
    return batch


class MixtureSampler:
    """Yields ``{"input_ids", "labels", "domain_ids"[, "segment_ids"]}`` micro-batches for one rank."""

    def __init__(
        self,
        shards: Mapping[str, TokenStream | TokenShard],
        weights: Mapping[str, float] | Sequence[float],
        seq_len: int,
        micro_batch_size: int,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        packing: str = "concat",
    ):
        if seq_len < 1 or micro_batch_size < 1:
            raise ValueError(f"seq_len and micro_batch_size must be >= 1, got {seq_len}, {micro_batch_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world of size {world_size}")
        if packing not in PACKINGS:
            raise ValueError(f"data.packing: {packing!r} is not allowed; allowed values: {', '.join(PACKINGS)}")
        self.domains = list(shards)
        self.streams = [TokenStream.of(shards[d], d) for d in self.domains]
        self.seq_len = seq_len
        self.micro_batch_size = micro_batch_size
        self.rank = rank
        self.world_size = world_size
        self.seed = seed
        self.packing = packing
        self.windows = np.array([s.num_windows(seq_len) for s in self.streams], dtype=np.int64)
        self._salts = [name_salt(d) for d in self.domains]
        self._orders: dict[int, tuple[int, KeyedPermutation]] = {}
        self.weights = _as_weights(weights, self.domains)
        self._check_domains_usable()
        self.step = 0
        self.consumed = np.zeros(len(self.domains), dtype=np.int64)

    def _check_domains_usable(self) -> None:
        for d, n, w in zip(self.domains, self.windows, self.weights):
            if w > 0 and n == 0:
                raise ValueError(f"domain {d!r} has fewer than seq_len+1={self.seq_len + 1} tokens but weight {w:.3g}")

    # --- mixture -------------------------------------------------------------------------------
    def set_weights(self, weights: Mapping[str, float] | Sequence[float]) -> None:
        """Change the mixture from the next batch on (deterministic: weights are in the state)."""
        self.weights = _as_weights(weights, self.domains)
        self._check_domains_usable()

    @property
    def global_batch_size(self) -> int:
        return self.micro_batch_size * self.world_size

    # --- sampling ------------------------------------------------------------------------------
    def _plan(self) -> tuple[np.ndarray, np.ndarray]:
        """Domain and within-domain position of every slot of the current global micro-batch."""
        rng = np.random.default_rng((self.seed, 0, self.step))
        slot_domains = rng.choice(len(self.domains), size=self.global_batch_size, p=self.weights)
        positions = np.empty_like(slot_domains)
        for d in np.unique(slot_domains):
            slots = np.flatnonzero(slot_domains == d)
            positions[slots] = self.consumed[d] + np.arange(slots.size)
        return slot_domains, positions

    def window_numbers(self, domain: int, positions: np.ndarray) -> np.ndarray:
        """Positions in the domain's endless stream -> window numbers (a fresh order per epoch)."""
        n = int(self.windows[domain])
        epochs, within = np.divmod(positions, n)
        out = np.empty_like(within)
        for epoch in np.unique(epochs):
            sel = epochs == epoch
            out[sel] = self._permutation(domain, int(epoch))(within[sel])
        return out

    def _permutation(self, domain: int, epoch: int) -> KeyedPermutation:
        """The domain's order in ``epoch`` (a few numbers; the current one is kept per domain)."""
        cached = self._orders.get(domain)
        if cached is None or cached[0] != epoch:
            key = derive_key(self.seed, self._salts[domain], epoch)
            cached = self._orders[domain] = (epoch, KeyedPermutation(int(self.windows[domain]), key))
        return cached[1]

    def next_batch(self) -> dict[str, torch.Tensor]:
        slot_domains, positions = self._plan()
        lo = self.rank * self.micro_batch_size
        mine = slice(lo, lo + self.micro_batch_size)
        doms, pos = slot_domains[mine], positions[mine]
        length = self.seq_len + 1
        rows: list[np.ndarray] = [np.empty(0)] * doms.size
        segments: list[np.ndarray] | None = [np.empty(0)] * doms.size if self.packing == "documents" else None
        for d in np.unique(doms):
            slots = np.flatnonzero(doms == d)
            stream = self.streams[d]
            shard_ids, starts = stream.locate(self.window_numbers(int(d), pos[slots]), self.seq_len)
            for j, s, start in zip(slots, shard_ids.tolist(), starts.tolist()):
                rows[j] = stream.read(s, start, length)
                if segments is not None:
                    segments[j] = stream.shards[s].segment_ids(start, length)
        self.consumed += np.bincount(slot_domains, minlength=len(self.domains))
        self.step += 1
        batch = window_batch(rows, segments)
        batch["domain_ids"] = torch.from_numpy(doms.astype(np.int64))
        return batch

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        while True:
            yield self.next_batch()

    # --- accounting and state ------------------------------------------------------------------
    def tokens_consumed(self) -> dict[str, int]:
        """Training tokens (inputs) drawn so far from each domain, over all ranks."""
        return {d: int(c) * self.seq_len for d, c in zip(self.domains, self.consumed)}

    def epochs(self) -> dict[str, float]:
        """How many times each domain has been gone through (> 1 means repetition)."""
        return {
            d: (float(c) / float(n) if n else 0.0) for d, c, n in zip(self.domains, self.consumed, self.windows)
        }

    def state_dict(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "consumed": {d: int(c) for d, c in zip(self.domains, self.consumed)},
            "weights": {d: float(w) for d, w in zip(self.domains, self.weights)},
            "seed": self.seed,
            "seq_len": self.seq_len,
            "order": ORDER,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore a state; the seed and sequence length must match, the world size may differ."""
        if state["seed"] != self.seed or state["seq_len"] != self.seq_len:
            raise ValueError(
                f"sampler state is for seed={state['seed']}, seq_len={state['seq_len']}; "
                f"this sampler has seed={self.seed}, seq_len={self.seq_len}"
            )
        if set(state["consumed"]) != set(self.domains):
            raise ValueError(f"sampler state covers domains {sorted(state['consumed'])}, this sampler {self.domains}")
        if state.get("order") != ORDER:
            warnings.warn("sampler state written by an older version (window order from a stored numpy permutation): "
                          "the counters carry over, but the rest of each domain's current epoch is visited in a "
                          "different order")
        self.step = int(state["step"])
        self.consumed = np.array([int(state["consumed"][d]) for d in self.domains], dtype=np.int64)
        self.set_weights(state["weights"])


def validation_batches(
    shard: TokenStream | TokenShard, seq_len: int, batch_size: int, max_sequences: int, rank: int = 0,
    world_size: int = 1, packing: str = "concat",
) -> Iterator[dict[str, torch.Tensor]]:
    """Up to ``max_sequences`` fixed windows of a validation split, split across ranks round-robin.

    Always the same windows, so validation curves are comparable across steps and runs; when the
    split has more windows than wanted they are spread evenly over it (every shard of a sharded
    preparation is represented). The count is rounded down to a multiple of ``world_size`` so
    every rank runs the same number of batches of the same sizes (the loss path's collectives
    must match across ranks). Batches have the training batches' keys (``segment_ids`` with
    ``packing="documents"``).
    """
    stream = TokenStream.of(shard)
    n = stream.num_windows(seq_len)
    total = min(n, max_sequences)
    total -= total % world_size
    chosen = (np.arange(total, dtype=np.int64) * n) // max(total, 1)
    mine = chosen[rank::world_size]
    shard_ids, starts = stream.locate(mine, seq_len)
    for i in range(0, mine.size, batch_size):
        picks = list(zip(shard_ids[i : i + batch_size].tolist(), starts[i : i + batch_size].tolist()))
        rows = [stream.read(s, start, seq_len + 1) for s, start in picks]
        segments = [stream.shards[s].segment_ids(start, seq_len + 1) for s, start in picks] if packing == "documents" else None
        yield window_batch(rows, segments)
