"""The order in which the rows of the training set are evaluated (twin of src/data/order.rs).

Only batch norm in `batch-stats` mode depends on it: each evaluation chunk of `chunk_size`
consecutive rows is normalised with its own statistics. By default lca evaluates the rows in
the order of a seeded permutation: row k of the evaluated set is row `permutation(n, seed)[k]`
of the file. Generator: SplitMix64; uniform integer below b: draw r until
r < floor(2^64 / b) * b, return r mod b; shuffle: Fisher-Yates from the top (for i = n-1 down
to 1: j = below(i + 1), swap p[i] and p[j]). Pure Python, no torch.
"""

from __future__ import annotations

DEFAULT_SEED = 0
"""The seed of lca's default permutation."""

_MASK = (1 << 64) - 1


class SplitMix64:
    """The SplitMix64 generator (Steele, Lea, Flood 2014)."""

    def __init__(self, seed: int) -> None:
        self.state = seed & _MASK

    def next_u64(self) -> int:
        self.state = (self.state + 0x9E3779B97F4A7C15) & _MASK
        z = self.state
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK
        return z ^ (z >> 31)

    def below(self, bound: int) -> int:
        """A uniform integer in [0, bound), by rejection."""
        zone = ((1 << 64) // bound) * bound
        while True:
            r = self.next_u64()
            if r < zone:
                return r % bound


def permutation(n: int, seed: int) -> list[int]:
    """The permutation of range(n) for `seed` (lca's `--data-seed`)."""
    p = list(range(n))
    g = SplitMix64(seed)
    for i in range(n - 1, 0, -1):
        j = g.below(i + 1)
        p[i], p[j] = p[j], p[i]
    return p


def row_order(n: int, order: str, seed: int | None) -> list[int] | None:
    """The rows of a set of `n` in evaluation order: `None` for file order."""
    if order == "file":
        return None
    if order != "shuffled":
        raise ValueError(f"unknown data order {order!r} (expected 'shuffled' or 'file')")
    return permutation(n, DEFAULT_SEED if seed is None else seed)
