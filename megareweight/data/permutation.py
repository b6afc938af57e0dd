"""A keyed bijection of ``[0, n)`` computed on the fly: the window order of the mixture sampler.

Why: a materialised permutation costs 8 bytes per window on every rank (3.9 GB per rank for 1e12
tokens at seq 2048, and MemoryError for a few such domains). Here a window's position in the
epoch's order is computed from its index alone, in O(1) memory, for any n up to 2**62.

How (the format-preserving-encryption construction, e.g. Black & Rogaway, "Ciphers with
arbitrary finite domains", 2002):

* a balanced Feistel network on ``2h`` bits with ``2**(2h) >= n`` (the smallest such ``h``): split
  x into halves (L, R) of h bits, and each round maps ``(L, R) -> (R, L xor F_k(R))``. Every round
  is invertible whatever F is, so the network is a bijection of ``[0, 2**(2h))``;
* F_k(R) = splitmix64's finaliser of ``R xor k`` (a strong 64-bit mixer: every input bit flips
  each output bit with probability ~1/2), truncated to h bits; the round keys come from the key by
  the same mixer. Luby-Rackoff needs 3-4 rounds with random round functions; a fast mixer is not
  a PRF, so we use 6 rounds (cost is negligible next to reading a 2049-token window);
* cycle walking: while the result is >= n, apply the network again. The walk stays inside the
  orbit of x, so the restriction to ``[0, n)`` is itself a bijection. As ``2**(2h) < 4n``, the
  expected number of applications is below 4.

Everything is vectorised over numpy uint64 arrays (multiplication wraps modulo 2**64, which is
exactly what the mixer wants).
"""
from __future__ import annotations

import hashlib

import numpy as np

ROUNDS = 6
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
_GOLDEN = 0x9E3779B97F4A7C15
_MASK64 = (1 << 64) - 1


def mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser on a uint64 array (a bijection of 64-bit words)."""
    x = np.array(x, dtype=np.uint64)  # a copy, then in place: fewer temporaries on small batches
    x ^= x >> np.uint64(30)
    x *= _M1
    x ^= x >> np.uint64(27)
    x *= _M2
    x ^= x >> np.uint64(31)
    return x


def derive_key(*parts: int) -> int:
    """Fold integers (seed, domain salt, epoch, ...) into one 64-bit key."""
    key = 0
    for part in parts:
        key = int(mix64(np.array([(key + _GOLDEN + (int(part) & _MASK64)) & _MASK64], dtype=np.uint64))[0])
    return key


def name_salt(name: str) -> int:
    """A stable 64-bit number for a name (a domain's order does not depend on the other domains)."""
    return int.from_bytes(hashlib.blake2b(name.encode("utf-8"), digest_size=8).digest(), "little")


class KeyedPermutation:
    """``p = KeyedPermutation(n, key); p(indices)`` -> positions, a bijection of ``[0, n)``."""

    def __init__(self, n: int, key: int, rounds: int = ROUNDS):
        if not 1 <= n <= 2**62:
            raise ValueError(f"permutation size must be in [1, 2**62], got {n}")
        self.n = int(n)
        self.half = max(1, ((self.n - 1).bit_length() + 1) // 2)
        self._mask = np.uint64((1 << self.half) - 1)
        seeds = np.array([(key + r * _GOLDEN) & _MASK64 for r in range(rounds)], dtype=np.uint64)
        self._round_keys = mix64(seeds)

    def _network(self, x: np.ndarray) -> np.ndarray:
        h = np.uint64(self.half)
        left, right = x >> h, x & self._mask
        for k in self._round_keys:
            left, right = right, left ^ (mix64(right ^ k) & self._mask)
        return (left << h) | right

    def __call__(self, indices: np.ndarray | int) -> np.ndarray:
        given = np.asarray(indices, dtype=np.int64)
        x = given.reshape(-1)
        if x.size and (x.min() < 0 or x.max() >= self.n):
            raise IndexError(f"permutation of [0, {self.n}) applied to an index outside it")
        y = self._network(x.astype(np.uint64))
        outside = y >= np.uint64(self.n)
        while outside.any():
            y[outside] = self._network(y[outside])
            outside = y >= np.uint64(self.n)
        return y.astype(np.int64).reshape(given.shape)
