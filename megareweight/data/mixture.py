"""Mixture-aware, sharded, deterministic, resumable stream of fixed-length training sequences.

Design (in the spirit of OLMo-core's global sample indices):

* Every domain is one token stream cut into non-overlapping windows of ``seq_len + 1`` tokens
  (inputs are the first ``seq_len``, labels the last ``seq_len``). Window order within an epoch is
  a permutation seeded by ``(seed, domain, epoch)``.
* Each call draws the domains of the whole *global* micro-batch (``micro_batch_size * world_size``
  slots) from ``numpy.random.default_rng((seed, step))`` with the current weights. Every rank
  computes the same plan and keeps its slots ``[rank*b, (rank+1)*b)``, which is the rank-major
  order the reweighting all-gather uses. Ranks are therefore disjoint by construction.
* The state is only ``step``, the per-domain window counters and the weights: ``state_dict()`` is
  a few numbers, resuming is exact, and because the counters are global the stream also continues
  without repeats or gaps when the number of ranks changes.
* ``set_weights()`` takes effect from the next batch; weights are part of the state.
"""
from __future__ import annotations

from typing import Any, Iterator, Mapping, Sequence

import numpy as np
import torch

from megareweight.data.shards import TokenShard


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


class MixtureSampler:
    """Yields ``{"input_ids", "labels", "domain_ids"}`` micro-batches for one data-parallel rank."""

    def __init__(
        self,
        shards: Mapping[str, TokenShard],
        weights: Mapping[str, float] | Sequence[float],
        seq_len: int,
        micro_batch_size: int,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
    ):
        if seq_len < 1 or micro_batch_size < 1:
            raise ValueError(f"seq_len and micro_batch_size must be >= 1, got {seq_len}, {micro_batch_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world of size {world_size}")
        self.domains = list(shards)
        self.shards = [shards[d] for d in self.domains]
        self.seq_len = seq_len
        self.micro_batch_size = micro_batch_size
        self.rank = rank
        self.world_size = world_size
        self.seed = seed
        self.windows = np.array([max((s.num_tokens - 1) // seq_len, 0) for s in self.shards], dtype=np.int64)
        self.weights = _as_weights(weights, self.domains)
        self._check_domains_usable()
        self.step = 0
        self.consumed = np.zeros(len(self.domains), dtype=np.int64)
        self._perm_cache: dict[int, tuple[int, np.ndarray]] = {}

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
    def _permutation(self, domain: int, epoch: int) -> np.ndarray:
        cached = self._perm_cache.get(domain)
        if cached is None or cached[0] != epoch:
            rng = np.random.default_rng((self.seed, 1 + domain, epoch))
            cached = (epoch, rng.permutation(int(self.windows[domain])))
            self._perm_cache[domain] = cached
        return cached[1]

    def _plan(self) -> tuple[np.ndarray, np.ndarray]:
        """Domain and within-domain position of every slot of the current global micro-batch."""
        rng = np.random.default_rng((self.seed, 0, self.step))
        slot_domains = rng.choice(len(self.domains), size=self.global_batch_size, p=self.weights)
        positions = np.empty_like(slot_domains)
        seen = self.consumed.copy()
        for j, d in enumerate(slot_domains):
            positions[j] = seen[d]
            seen[d] += 1
        return slot_domains, positions

    def _window(self, domain: int, position: int) -> np.ndarray:
        n = int(self.windows[domain])
        epoch, within = divmod(int(position), n)
        start = int(self._permutation(domain, epoch)[within]) * self.seq_len
        return np.asarray(self.shards[domain].tokens[start : start + self.seq_len + 1], dtype=np.int64)

    def next_batch(self) -> dict[str, torch.Tensor]:
        slot_domains, positions = self._plan()
        lo = self.rank * self.micro_batch_size
        mine = range(lo, lo + self.micro_batch_size)
        windows = np.stack([self._window(int(slot_domains[j]), int(positions[j])) for j in mine])
        self.consumed += np.bincount(slot_domains, minlength=len(self.domains))
        self.step += 1
        tokens = torch.from_numpy(windows)
        return {
            "input_ids": tokens[:, :-1].contiguous(),
            "labels": tokens[:, 1:].contiguous(),
            "domain_ids": torch.from_numpy(slot_domains[lo : lo + self.micro_batch_size].astype(np.int64)),
        }

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
        self.step = int(state["step"])
        self.consumed = np.array([int(state["consumed"][d]) for d in self.domains], dtype=np.int64)
        self.set_weights(state["weights"])


def validation_batches(
    shard: TokenShard, seq_len: int, batch_size: int, max_sequences: int, rank: int = 0, world_size: int = 1
) -> Iterator[torch.Tensor]:
    """The first ``max_sequences`` windows of a validation shard, split across ranks round-robin.

    Always the same windows, so validation curves are comparable across steps and runs. The count
    is rounded down to a multiple of ``world_size`` so every rank runs the same number of batches
    of the same sizes (the loss path's collectives must match across ranks).
    """
    total = min(max((shard.num_tokens - 1) // seq_len, 0), max_sequences)
    total -= total % world_size
    mine = list(range(rank, total, world_size))
    for i in range(0, len(mine), batch_size):
        chunk = mine[i : i + batch_size]
        rows = [np.asarray(shard.tokens[k * seq_len : k * seq_len + seq_len + 1], dtype=np.int64) for k in chunk]
        yield torch.from_numpy(np.stack(rows))
