"""lca's row order (`lca._order`) is the Rust one (src/data/order.rs): the same fixed vectors."""

from __future__ import annotations

import pytest

from lca import _order

# Generated once by src/data/order.rs and asserted by its unit test
# `the_generator_and_the_permutation_match_the_fixed_vectors`.
FIXED = [
    (10, 0, [6, 3, 2, 9, 8, 1, 4, 7, 0, 5]),
    (10, 1, [4, 2, 8, 1, 9, 3, 0, 6, 7, 5]),
    (16, 12345, [1, 4, 8, 9, 11, 13, 15, 7, 14, 6, 10, 3, 2, 5, 12, 0]),
    (5, 2**64 - 1, [2, 0, 3, 4, 1]),
]


def test_splitmix64_gives_its_published_outputs() -> None:
    g = _order.SplitMix64(0)
    assert g.next_u64() == 0xE220A8397B1DCDAF
    assert g.next_u64() == 0x6E789E6AA1B965F4


@pytest.mark.parametrize(("n", "seed", "want"), FIXED)
def test_permutation_matches_the_rust_vectors(n: int, seed: int, want: list[int]) -> None:
    assert _order.permutation(n, seed) == want


def test_default_order_of_the_digits_sets() -> None:
    p = _order.permutation(1797, _order.DEFAULT_SEED)
    assert p[:8] == [1219, 1332, 145, 640, 51, 272, 824, 106]
    assert p[1793:] == [220, 199, 1452, 1441]
    assert sorted(p) == list(range(1797))


def test_row_order() -> None:
    assert _order.row_order(5, "file", None) is None
    assert _order.row_order(10, "shuffled", None) == FIXED[0][2]
    assert _order.row_order(10, "shuffled", 1) == FIXED[1][2]
    with pytest.raises(ValueError, match="unknown data order"):
        _order.row_order(3, "random", None)
