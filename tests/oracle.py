"""Independent numpy float64 recurrence of (gated) DeltaProduct: the test oracle.

Written without JAX so that it cannot share a bug with the implementations under test.
"""

from __future__ import annotations

import numpy as np


def delta_product_np(q, k, v, beta, g=None, *, scale=None, initial_state=None, doc_starts=None):
    """Return ``(o [B,T,H,V], final [B,H,K,V])`` in float64.

    ``doc_starts``: optional ``[B, T]`` bool, True where the state is reset to zero before token t.
    """
    q, k, v, beta = (np.asarray(x, np.float64) for x in (q, k, v, beta))
    B, T, H, K = q.shape
    n = k.shape[1] // T
    V = v.shape[-1]
    scale = K**-0.5 if scale is None else scale
    S = np.zeros((B, H, K, V)) if initial_state is None else np.array(initial_state, np.float64)
    o = np.zeros((B, T, H, V))
    for b in range(B):
        for t in range(T):
            if doc_starts is not None and doc_starts[b, t]:
                S[b] = 0.0
            if g is not None:
                S[b] *= np.exp(np.asarray(g, np.float64)[b, t])[:, None, None]
            for j in range(n):
                r = t * n + j
                for h in range(H):
                    kk = k[b, r, h]
                    S[b, h] += beta[b, r, h] * np.outer(kk, v[b, r, h] - S[b, h].T @ kk)
            for h in range(H):
                o[b, t, h] = S[b, h].T @ (scale * q[b, t, h])
    return o, S


def rel_rmse(ref, x) -> float:
    """``RMS(ref - x) / RMS(ref)`` (SPEC §3.2), NaN-propagating."""
    ref = np.asarray(ref, np.float64)
    x = np.asarray(x, np.float64)
    return float(np.sqrt(np.mean((ref - x) ** 2)) / (np.sqrt(np.mean(ref**2)) + 1e-12))
