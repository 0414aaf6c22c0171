"""Finite groups for the state-tracking tasks: Cayley tables, sequences and prefix-product labels.

Element indexing follows the paper's data generator (SPEC §5.1):

* ``S<n>``: the permutations of ``(1, ..., n)`` in lexicographic order (``itertools.permutations``),
  so index 0 is the identity. The product is composition, ``(a·b)(i) = a(b(i))``.
* ``A<n>``: the even permutations of ``S<n>``, kept in ``S<n>`` order (identity first).
* ``Z<n>``: residues ``0, ..., n-1``; the product is addition mod ``n`` (index 0 is the identity).
* ``G1_x_G2_x...``: direct products; elements are the Cartesian product of the factors' elements
  in ``itertools.product`` order (the last factor varies fastest), the product is component-wise.

A task sequence ``x_1..x_k`` (i.i.d. uniform element ids) is labelled with its prefix products
``y_1 = x_1``, ``y_t = y_{t-1}·x_t``.

Example::

    g = get_group("S3")                      # g.order == 6, g.table: int32 [6, 6]
    x = sample_sequences(g, num=4, length=8, rng=np.random.default_rng(0))   # int32 [4, 8]
    y = prefix_products(g.table, x)                                          # int32 [4, 8]
"""

from __future__ import annotations

import itertools
import math
import re
from dataclasses import dataclass, field

import numpy as np

__all__ = [
    "Group",
    "MAX_ORDER",
    "alternating",
    "cyclic",
    "direct_product",
    "get_group",
    "prefix_products",
    "sample_sequences",
    "symmetric",
]

MAX_ORDER = 5040
"""Largest group order we build a Cayley table for (``S7``; the table is ``order²`` int32)."""

_FACTOR_RE = re.compile(r"^([SAZ])(\d+)$")


@dataclass(frozen=True, eq=False)
class Group:
    """A finite group given by its Cayley table.

    Attributes:
      name: canonical name (``"S3"``, ``"A5"``, ``"Z60"``, ``"S3_x_Z2"``).
      table: int32 ``[order, order]``; ``table[a, b]`` is the id of ``a·b``.
      elements: one human-readable label per element id (e.g. ``"(2, 1, 3)"``).
    """

    name: str
    table: np.ndarray
    elements: tuple[str, ...] = field(repr=False)

    @property
    def order(self) -> int:
        """Number of elements ``|G|``."""
        return int(self.table.shape[0])

    @property
    def identity(self) -> int:
        """Id of the identity element (always 0 for the groups built here)."""
        return 0

    def inverse(self) -> np.ndarray:
        """int32 ``[order]``: ``inverse()[a]`` is the id of ``a⁻¹``."""
        rows, cols = np.nonzero(self.table == self.identity)
        inv = np.empty(self.order, dtype=np.int32)
        inv[rows] = cols
        return inv


def _check_n(kind: str, n: int, minimum: int) -> None:
    if not isinstance(n, (int, np.integer)) or n < minimum:
        raise ValueError(f"{kind}: n must be an integer >= {minimum}, got {n!r}")


def _check_order(name: str, order: int) -> None:
    if order > MAX_ORDER:
        raise ValueError(
            f"group {name!r} has order {order} > MAX_ORDER={MAX_ORDER}; its Cayley table "
            f"({order}x{order}) is too large"
        )


def _permutation_group(name: str, perms: np.ndarray) -> Group:
    """Cayley table of a set of permutations closed under composition.

    Args:
      perms: int ``[m, n]`` permutations of ``0..n-1`` (row ``i`` maps ``j -> perms[i, j]``).
    """
    m, n = perms.shape
    # Encode each permutation as a base-n integer to look up its index.
    weights = n ** np.arange(n - 1, -1, -1, dtype=np.int64)
    codes = perms.astype(np.int64) @ weights
    order_codes = np.argsort(codes)
    sorted_codes = codes[order_codes]
    table = np.empty((m, m), dtype=np.int32)
    for a in range(m):
        # (a·b)(j) = a(b(j)) for every b at once: perms[a][perms[b]].
        composed = perms[a][perms]  # [m, n]
        c = composed.astype(np.int64) @ weights
        pos = np.searchsorted(sorted_codes, c)
        if np.any(pos >= m) or np.any(sorted_codes[np.minimum(pos, m - 1)] != c):
            raise ValueError(f"{name}: permutations are not closed under composition")
        table[a] = order_codes[pos]
    labels = tuple(str(tuple(int(v) + 1 for v in p)) for p in perms)
    return Group(name=name, table=table, elements=labels)


def _permutations(n: int) -> np.ndarray:
    """int8 ``[n!, n]``: permutations of ``0..n-1`` in lexicographic order."""
    return np.array(list(itertools.permutations(range(n))), dtype=np.int8).reshape(-1, n)


def _is_even(perm: np.ndarray) -> bool:
    """Parity by counting cycles: even iff ``n - #cycles`` is even."""
    n = len(perm)
    seen = np.zeros(n, dtype=bool)
    cycles = 0
    for i in range(n):
        if not seen[i]:
            cycles += 1
            j = i
            while not seen[j]:
                seen[j] = True
                j = int(perm[j])
    return (n - cycles) % 2 == 0


def symmetric(n: int) -> Group:
    """``S_n``: all permutations of ``(1..n)``, lexicographic order, identity at index 0."""
    _check_n("S_n", n, 1)
    _check_order(f"S{n}", math.factorial(n))
    return _permutation_group(f"S{n}", _permutations(n))


def alternating(n: int) -> Group:
    """``A_n``: the even permutations of ``S_n`` in ``S_n`` order, identity at index 0."""
    _check_n("A_n", n, 1)
    _check_order(f"A{n}", max(1, math.factorial(n) // 2))
    perms = _permutations(n)
    even = np.array([_is_even(p) for p in perms], dtype=bool)
    return _permutation_group(f"A{n}", perms[even])


def cyclic(n: int) -> Group:
    """``Z_n``: residues mod ``n`` under addition; index = residue."""
    _check_n("Z_n", n, 1)
    _check_order(f"Z{n}", n)
    r = np.arange(n, dtype=np.int32)
    table = ((r[:, None] + r[None, :]) % n).astype(np.int32)
    return Group(name=f"Z{n}", table=table, elements=tuple(str(i) for i in range(n)))


def direct_product(*groups: Group) -> Group:
    """``G1 × G2 × ...`` with Cartesian-order element ids (last factor fastest).

    The id of ``(g1, ..., gm)`` is the mixed-radix number with digits ``g_i`` and radices
    ``|G_i|``; the product is component-wise.
    """
    if len(groups) < 1:
        raise ValueError("direct_product: need at least one group, got none")
    order = math.prod(g.order for g in groups)
    name = "_x_".join(g.name for g in groups)
    _check_order(name, order)
    table = groups[0].table.astype(np.int64)
    elements = list(groups[0].elements)
    for g in groups[1:]:
        m = g.order
        # new[(a1, a2), (b1, b2)] = (t1[a1, b1], t2[a2, b2]) with id = i1 * m + i2.
        table = (table[:, None, :, None] * m + g.table[None, :, None, :]).reshape(
            table.shape[0] * m, table.shape[1] * m
        )
        elements = [f"{a}x{b}" for a, b in itertools.product(elements, g.elements)]
    return Group(name=name, table=table.astype(np.int32), elements=tuple(elements))


def get_group(name: str) -> Group:
    """Build a group from its name: ``S<n>``, ``A<n>``, ``Z<n>`` or ``<G1>_x_<G2>[_x_...]``.

    Raises:
      ValueError: for an unknown or malformed name, naming the offending part.
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"group name must be a non-empty string like 'S3', got {name!r}")
    factors = []
    for part in name.split("_x_"):
        match = _FACTOR_RE.match(part)
        if match is None:
            raise ValueError(
                f"unknown group {name!r}: factor {part!r} is not one of S<n> (symmetric), "
                "A<n> (alternating), Z<n> (cyclic); direct products are written like 'S3_x_Z2'"
            )
        kind, n = match.group(1), int(match.group(2))
        factors.append({"S": symmetric, "A": alternating, "Z": cyclic}[kind](n))
    return factors[0] if len(factors) == 1 else direct_product(*factors)


def prefix_products(table: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Prefix products ``y_1 = x_1``, ``y_t = y_{t-1}·x_t`` (left fold from the identity).

    Args:
      table: int ``[order, order]`` Cayley table.
      x: int ``[..., T]`` element ids.
    Returns:
      int32 ``[..., T]``.
    """
    x = np.asarray(x)
    if x.ndim == 0:
        raise ValueError(f"x must have a time axis, got a scalar {x!r}")
    y = np.empty(x.shape, dtype=np.int32)
    if x.shape[-1] == 0:
        return y
    y[..., 0] = x[..., 0]
    for t in range(1, x.shape[-1]):
        y[..., t] = table[y[..., t - 1], x[..., t]]
    return y


def sample_sequences(
    group: Group,
    num: int,
    length: int,
    rng: np.random.Generator,
    *,
    distinct: bool = True,
) -> np.ndarray:
    """``num`` sequences of ``length`` i.i.d. uniform element ids.

    With ``distinct=True`` (the paper's generator) duplicates are dropped and replaced by fresh
    draws until ``num`` distinct sequences exist; their order is the draw order.

    Returns:
      int32 ``[num, length]``.
    Raises:
      ValueError: if ``num`` distinct sequences do not exist (``num > order**length``).
    """
    if num < 0 or length < 1:
        raise ValueError(f"need num >= 0 and length >= 1, got num={num}, length={length}")
    if distinct and num > group.order**length:
        raise ValueError(
            f"cannot draw {num} distinct sequences of length {length} from {group.name}: only "
            f"{group.order}**{length} = {group.order**length} exist"
        )
    out = rng.integers(0, group.order, size=(num, length), dtype=np.int32)
    if not distinct:
        return out
    while True:
        _, first = np.unique(out, axis=0, return_index=True)
        if len(first) == num:
            return out
        keep = out[np.sort(first)]
        extra = rng.integers(0, group.order, size=(num - len(keep), length), dtype=np.int32)
        out = np.concatenate([keep, extra], axis=0)
