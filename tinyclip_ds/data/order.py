"""The run's global sample order: weighted mixing of sources, with no per-sample memory.

A training set is the concatenation of its sources (parts) ``0..S-1`` of sizes ``n_s``; a
sample's *global index* is its part's offset plus its index within the part. Epoch ``e`` has
``T = sum(n_s)`` positions. Each source gets a quota of them in proportion to its weight
(``q_s = T * w_s / sum(w)``, rounded by largest remainder so the quotas add up to ``T``;
without weights ``q_s = n_s``, i.e. every sample once per epoch). Position ``p`` of epoch
``e`` is, all computed on demand:

    j = P_T[e](p)                      slot j of the epoch, a permutation of 0..T-1
    s = the source whose quota range [Q_s, Q_s + q_s) holds j
    r, m = divmod(j - Q_s, n_s)        round r over source s (r > 0 when it is up-sampled)
    index = offset_s + P_{n_s}[e, s, r](m)

so a source shown more often than its size repeats its samples in a fresh order each round,
and one shown less often sees a different subset each epoch. Permutations ``P_n[key]`` are
keyed pseudo-random bijections of ``0..n-1`` (a Feistel network with cycle walking): any
stretch of positions costs time proportional to its length and no memory, where
``torch.randperm`` would hold the whole epoch — 800 MB as a tensor, gigabytes as the list the
sampler needs — at LAION sizes.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence

import numpy as np

from tinyclip_ds.config import RecipeError

_ROUNDS = 6  # Feistel rounds; 4 already mix well for a keyed shuffle, 6 leave margin
_MASK64 = np.uint64(0xFFFFFFFFFFFFFFFF)


def mix_seed(*parts: int | str) -> int:
    """A well-mixed 63-bit seed from its parts (stable across processes and Python runs)."""
    digest = hashlib.blake2b(":".join(str(p) for p in parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def _mix(values: np.ndarray, key: int) -> np.ndarray:
    """A 64-bit hash of ``values`` (uint64) under ``key``: splitmix64's finaliser."""
    with np.errstate(over="ignore"):  # wrap-around multiplication is the point
        z = values + np.uint64(key & 0xFFFFFFFFFFFFFFFF)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


class Permutation:
    """A keyed pseudo-random bijection of ``0..n-1`` computed element-wise (no table).

    A balanced Feistel network permutes ``0..4^h - 1`` (the smallest even bit width ``2h``
    covering ``n``, so at most ``4n`` values); values that land at or past ``n`` are sent
    through again (cycle walking), which keeps it a bijection of ``0..n-1``. About 4 passes
    in the worst case, 1–2 typically."""

    def __init__(self, n: int, key: int) -> None:
        if n < 1:
            raise ValueError(f"a permutation of {n} elements")
        self.n = n
        self.half_bits = max(1, math.ceil(math.log2(n) / 2)) if n > 1 else 1
        self._half_mask = np.uint64((1 << self.half_bits) - 1)
        self._round_keys = [mix_seed(key, "feistel", r) for r in range(_ROUNDS)]

    def _feistel(self, x: np.ndarray) -> np.ndarray:
        shift = np.uint64(self.half_bits)
        left, right = x >> shift, x & self._half_mask
        for key in self._round_keys:
            left, right = right, left ^ (_mix(right, key) & self._half_mask)
        return (left << shift) | right

    def __call__(self, positions: np.ndarray) -> np.ndarray:
        """The images of ``positions`` (integers in ``0..n-1``), as int64."""
        values = np.asarray(positions, dtype=np.uint64)
        if self.n == 1:
            return np.zeros(values.shape, dtype=np.int64)
        values = self._feistel(values)
        outside = values >= np.uint64(self.n)
        while outside.any():
            values[outside] = self._feistel(values[outside])
            outside = values >= np.uint64(self.n)
        return values.astype(np.int64)


def check_weights(weights: Sequence[float], count: int, sources: str, key: str = "data.weights") -> None:
    """``weights`` is empty or one positive, finite weight for each of ``count`` sources (named
    ``sources`` in the message), else a `RecipeError`."""
    if weights and len(weights) != count:
        raise RecipeError(f"'{key}' has {len(weights)} weights for {sources}; give one weight per source, "
                          f"in the order the sources are listed (or [] to show every sample once per epoch)")
    if any(not (math.isfinite(w) and w > 0) for w in weights):
        raise RecipeError(f"'{key}' must be positive numbers (got {list(weights)}); leave a source out of "
                          f"the list instead of giving it weight 0")


def quotas(sizes: Sequence[int], weights: Sequence[float] | None) -> list[int]:
    """Each source's positions per epoch: its size without weights, else ``T * w_s / sum(w)``
    with ``T = sum(sizes)``, rounded by largest remainder (ties to the earlier source)."""
    if weights is None:
        return list(sizes)
    total = sum(sizes)
    exact = [total * w / sum(weights) for w in weights]
    counts = [math.floor(x) for x in exact]
    by_remainder = sorted(range(len(exact)), key=lambda s: (-(exact[s] - counts[s]), s))
    for s in by_remainder[:total - sum(counts)]:
        counts[s] += 1
    return counts


class GlobalOrder:
    """Which global index sits at each position of each epoch (module docstring); the same
    for every rank, worker and world size, and computed for any stretch of positions on demand."""

    def __init__(self, sizes: Sequence[int], seed: int, weights: Sequence[float] | None = None,
                 key: str = "data.weights") -> None:
        sizes = [int(n) for n in sizes]
        if not sizes or any(n < 1 for n in sizes):
            raise ValueError(f"every source needs at least one sample (sizes {sizes})")
        if weights is not None:
            weights = [float(w) for w in weights]
            check_weights(weights, len(sizes), f"{len(sizes)} sources", key)
        self.sizes = sizes
        self.weights = weights
        self.seed = seed
        self.offsets = np.cumsum([0] + sizes[:-1]).astype(np.int64)
        self.quotas = quotas(sizes, weights)
        if 0 in self.quotas:  # a weight so small that the source would never be drawn
            s = self.quotas.index(0)
            raise RecipeError(f"'{key}[{s}]' = {weights[s]} gives source {s} ({sizes[s]} samples) no sample in an "
                              f"epoch of {sum(self.quotas)}; raise its weight or leave the source out")
        self._quota_starts = np.cumsum([0] + self.quotas).astype(np.int64)
        self.epoch_length = int(self._quota_starts[-1])
        self._permutations: dict[tuple, Permutation] = {}

    def _permutation(self, n: int, *key: int | str) -> Permutation:
        if key not in self._permutations:
            if len(self._permutations) > 1024:  # bounded: keys of past epochs are never used again
                self._permutations.clear()
            self._permutations[key] = Permutation(n, mix_seed(self.seed, "order", *key))
        return self._permutations[key]

    def indices(self, epoch: int, start: int, stop: int) -> np.ndarray:
        """The global indices at positions ``start..stop-1`` of ``epoch`` (int64)."""
        if not 0 <= start <= stop <= self.epoch_length:
            raise ValueError(f"positions {start}..{stop} outside an epoch of {self.epoch_length}")
        slots = self._permutation(self.epoch_length, epoch)(np.arange(start, stop, dtype=np.int64))
        source = np.searchsorted(self._quota_starts, slots, side="right") - 1
        within = slots - self._quota_starts[source]
        sizes = np.asarray(self.sizes, dtype=np.int64)[source]
        rounds, members = within // sizes, within % sizes
        result = np.empty_like(slots)
        for s, r in {(int(s), int(r)) for s, r in zip(source, rounds)}:
            chosen = (source == s) & (rounds == r)
            result[chosen] = self.offsets[s] + self._permutation(self.sizes[s], epoch, s, r)(members[chosen])
        return result

    def source_of(self, indices: np.ndarray) -> np.ndarray:
        """The source number of each global index."""
        return np.searchsorted(self.offsets, indices, side="right") - 1

    def describe(self) -> str:
        """One line: each source's samples and share of an epoch."""
        if len(self.sizes) == 1:
            return f"{self.epoch_length} samples per epoch, in a new order each epoch"
        shares = ", ".join(f"{n} samples → {q / self.epoch_length:.1%} of each epoch"
                           for n, q in zip(self.sizes, self.quotas))
        return f"{len(self.sizes)} source(s), {self.epoch_length} samples per epoch ({shares})"
