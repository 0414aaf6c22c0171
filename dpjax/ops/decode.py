"""One-token recurrent step of (gated) DeltaProduct: the building block of generation."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from dpjax.ops.l2norm import l2norm
from dpjax.ops.reference import token_step


def decode(
    state: jax.Array,
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    beta: jax.Array,
    g: jax.Array | None = None,
    *,
    scale: float | None = None,
    use_qk_l2norm: bool = False,
) -> tuple[jax.Array, jax.Array]:
    """Advance the state by one token: gate, ``n_h`` rank-1 updates, read-out.

    Args:
      state: ``[N, H, K, V]`` fp32 recurrent state.
      q: ``[N, H, K]``; k: ``[N, n_h, H, K]``; v: ``[N, n_h, H, V]``; beta: ``[N, n_h, H]``;
        g: ``[N, H]`` log-space gate or None.
      scale: query scale, default ``K ** -0.5``.
      use_qk_l2norm: L2-normalise q and k first.

    Returns:
      ``(o [N, H, V] in q.dtype, new_state [N, H, K, V] fp32)``. Same function as one token of
      ``delta_product`` started from ``state``.
    """
    N, H, K, V = np.shape(state)
    n = np.shape(k)[1] if np.ndim(k) == 4 else None
    expected = {
        "q": (np.shape(q), (N, H, K)),
        "k": (np.shape(k), (N, n, H, K)),
        "v": (np.shape(v), (N, n, H, V)),
        "beta": (np.shape(beta), (N, n, H)),
    }
    if g is not None:
        expected["g"] = (np.shape(g), (N, H))
    for name, (got, want) in expected.items():
        if got != want:
            raise ValueError(
                f"{name}: expected shape {want} from state {np.shape(state)} "
                f"[N, H, K, V] and k [N, n_h, H, K], got {got}"
            )
    scale = K**-0.5 if scale is None else float(scale)
    if use_qk_l2norm:
        q, k = l2norm(q), l2norm(k)
    f32 = jnp.float32
    new_state, o = token_step(
        jnp.asarray(state, f32),
        jnp.asarray(q, f32),
        jnp.asarray(k, f32),
        jnp.asarray(v, f32),
        jnp.asarray(beta, f32),
        None if g is None else jnp.asarray(g, f32),
        scale,
    )
    return o.astype(jnp.result_type(q)), new_state
