"""Cayley tables of S_n, A_n, Z_n and direct products; sequences and prefix-product labels."""

import itertools

import numpy as np
import pytest

from dpjax.data.groups import (
    alternating,
    cyclic,
    direct_product,
    get_group,
    prefix_products,
    sample_sequences,
    symmetric,
)

NAMES = ["S3", "S4", "A4", "A5", "S5", "Z2", "Z60", "S3_x_Z2", "Z2_x_Z3_x_Z2"]


@pytest.mark.parametrize("name", NAMES)
def test_group_axioms(name):
    g = get_group(name)
    t, n = g.table, g.order
    assert t.shape == (n, n) and t.dtype == np.int32
    assert g.name == name and len(g.elements) == n
    # closure and Latin square (every row and column is a permutation of the elements)
    assert t.min() >= 0 and t.max() < n
    for i in range(n):
        assert len(set(t[i])) == n and len(set(t[:, i])) == n
    # identity at index 0
    np.testing.assert_array_equal(t[0], np.arange(n))
    np.testing.assert_array_equal(t[:, 0], np.arange(n))
    # inverses
    inv = g.inverse()
    np.testing.assert_array_equal(t[np.arange(n), inv], 0)
    np.testing.assert_array_equal(t[inv, np.arange(n)], 0)
    # associativity on samples
    rng = np.random.default_rng(0)
    a, b, c = rng.integers(0, n, size=(3, 2000))
    np.testing.assert_array_equal(t[t[a, b], c], t[a, t[b, c]])


@pytest.mark.parametrize(
    "name,order",
    [
        ("S3", 6),
        ("A5", 60),
        ("S5", 120),
        ("A4", 12),
        ("Z60", 60),
        ("S3_x_Z2", 12),
        ("S1", 1),
        ("A3", 3),
    ],
)
def test_orders(name, order):
    assert get_group(name).order == order


def _parity(p):
    return sum(1 for i, j in itertools.combinations(range(len(p)), 2) if p[i] > p[j]) % 2


def test_symmetric_order_and_composition():
    g = symmetric(3)
    perms = list(itertools.permutations((1, 2, 3)))
    assert g.elements == tuple(str(p) for p in perms)  # lexicographic, identity first
    for a, b in itertools.product(range(6), repeat=2):
        pa, pb = perms[a], perms[b]
        composed = tuple(pa[pb[i] - 1] for i in range(3))  # (a·b)(i) = a(b(i))
        assert perms[g.table[a, b]] == composed
    assert not np.array_equal(g.table, g.table.T)  # S3 is not abelian


def test_alternating_elements_are_even_in_sn_order():
    for n in (3, 4, 5):
        a, s = alternating(n), symmetric(n)
        assert a.order == s.order // 2
        perms = [tuple(int(x) for x in e.strip("()").split(", ")) for e in a.elements]
        assert all(_parity(p) == 0 for p in perms)
        sn_index = {e: i for i, e in enumerate(s.elements)}
        idx = [sn_index[e] for e in a.elements]
        assert idx == sorted(idx) and idx[0] == 0  # kept in S_n order, identity first


def test_cyclic_and_direct_product():
    z = cyclic(5)
    np.testing.assert_array_equal(z.table, (np.arange(5)[:, None] + np.arange(5)) % 5)
    s3, z2 = symmetric(3), cyclic(2)
    p = direct_product(s3, z2)
    assert p.name == "S3_x_Z2" and p.order == 12
    for (a1, a2), (b1, b2) in itertools.product(itertools.product(range(6), range(2)), repeat=2):
        assert p.table[a1 * 2 + a2, b1 * 2 + b2] == s3.table[a1, b1] * 2 + z2.table[a2, b2]
    np.testing.assert_array_equal(get_group("S3_x_Z2").table, p.table)


@pytest.mark.parametrize("bad", ["", "S", "Q8", "s3", "S3xZ2", "S3_x_", "D4", "Z0", "S9"])
def test_unknown_names_raise(bad):
    with pytest.raises(ValueError):
        get_group(bad)


def test_prefix_products():
    g = get_group("S3")
    rng = np.random.default_rng(1)
    x = rng.integers(0, 6, size=(5, 20))
    y = prefix_products(g.table, x)
    assert y.shape == x.shape and y.dtype == np.int32
    for b in range(5):
        acc = 0  # identity
        for t in range(20):
            acc = g.table[acc, x[b, t]]
            assert y[b, t] == acc
    np.testing.assert_array_equal(y[:, 0], x[:, 0])
    z = get_group("Z7")
    x = rng.integers(0, 7, size=(3, 11))
    np.testing.assert_array_equal(prefix_products(z.table, x), np.cumsum(x, axis=1) % 7)


def test_sample_sequences_distinct_and_deterministic():
    g = get_group("Z2")
    x = sample_sequences(g, 60, 6, np.random.default_rng(0))  # 60 of the 64 possible
    assert x.shape == (60, 6) and x.dtype == np.int32
    assert len({tuple(r) for r in x}) == 60
    np.testing.assert_array_equal(x, sample_sequences(g, 60, 6, np.random.default_rng(0)))
    with pytest.raises(ValueError, match="distinct"):
        sample_sequences(g, 65, 6, np.random.default_rng(0))
    y = sample_sequences(get_group("S3"), 2000, 6, np.random.default_rng(0))
    counts = np.bincount(y.ravel(), minlength=6)
    assert counts.min() > 1800  # roughly uniform over the 6 elements
