"""Random inputs for op tests: fresh draws, β in (0, 2), unit-norm keys, log-space gates."""

from __future__ import annotations

import numpy as np


def random_problem(
    rng: np.random.Generator,
    *,
    B: int = 2,
    T: int = 17,
    H: int = 2,
    K: int = 8,
    V: int = 6,
    n_h: int = 2,
    gated: bool = False,
    initial_state: bool = False,
    beta_max: float = 2.0,
) -> dict[str, np.ndarray | None]:
    """Return float64 numpy inputs for ``delta_product`` (keys already L2-normalised)."""
    k = rng.normal(size=(B, T * n_h, H, K))
    k /= np.linalg.norm(k, axis=-1, keepdims=True)
    return {
        "q": rng.normal(size=(B, T, H, K)),
        "k": k,
        "v": rng.normal(size=(B, T * n_h, H, V)),
        "beta": rng.uniform(0.0, beta_max, size=(B, T * n_h, H)),
        "g": np.log(rng.uniform(0.5, 1.0, size=(B, T, H))) if gated else None,
        "initial_state": rng.normal(size=(B, H, K, V)) if initial_state else None,
    }


def random_segments(rng: np.random.Generator, B: int, T: int, max_docs: int = 4) -> np.ndarray:
    """``[B, T]`` int32 segment ids with 1..max_docs documents per row (random cut points)."""
    seg = np.zeros((B, T), np.int32)
    for b in range(B):
        n_docs = int(rng.integers(1, min(max_docs, T) + 1))
        cuts = np.sort(rng.choice(np.arange(1, T), size=n_docs - 1, replace=False)) if T > 1 else []
        for c in cuts:
            seg[b, c:] += 1
    return seg


def starts_from_segments(seg: np.ndarray) -> np.ndarray:
    """``[B, T]`` bool: True where the segment id changes (document start after the first)."""
    out = np.zeros(seg.shape, bool)
    out[:, 1:] = seg[:, 1:] != seg[:, :-1]
    return out
