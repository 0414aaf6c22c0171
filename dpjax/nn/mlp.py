"""SwiGLU MLP: ``down(SiLU(gate(x)) * up(x))``, no biases, with FLA's intermediate-size rule."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from dpjax.nn.init import Initializer
from dpjax.nn.linear import Linear
from dpjax.nn.sharding_names import MLP_IN, MLP_OUT


def intermediate_size(
    hidden_size: int, hidden_ratio: float = 4, explicit: int | None = None
) -> int:
    """FLA's rule: ``explicit`` if given, else ``256 * ceil(int(D * hidden_ratio * 2/3) / 256)``.

    Examples: D=1024 -> 2816, D=768 -> 2048, D=1536 -> 4096, D=128 -> 512, D=2048 -> 5632.
    """
    if explicit is not None:
        return int(explicit)
    return 256 * math.ceil(int(hidden_size * hidden_ratio * 2 / 3) / 256)


class GatedMLP(nnx.Module):
    """SwiGLU MLP ``[..., D] -> [..., D]`` with intermediate size ``I``.

    Args:
      hidden_size: ``D``; inter_size: ``I``.
      in_init: initialiser of ``gate_proj``/``up_proj`` ``[D, I]``; out_init: of ``down_proj``
        ``[I, D]``.
    """

    def __init__(
        self,
        hidden_size: int,
        inter_size: int,
        *,
        in_init: Initializer,
        out_init: Initializer,
        dtype: jnp.dtype = jnp.float32,
        param_dtype: jnp.dtype = jnp.float32,
        rngs: nnx.Rngs,
    ):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.gate_proj = Linear(hidden_size, inter_size, names=MLP_IN, init=in_init, **kw)
        self.up_proj = Linear(hidden_size, inter_size, names=MLP_IN, init=in_init, **kw)
        self.down_proj = Linear(inter_size, hidden_size, names=MLP_OUT, init=out_init, **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        """``x [..., D] -> [..., D]``."""
        return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))
