"""Create an ``nnx.Param`` that carries its logical sharding names (see ``sharding_names``)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from dpjax.nn.init import Initializer
from dpjax.nn.sharding_names import Names


def _mesh_is_set() -> bool:
    return not jax.sharding.get_abstract_mesh().empty


def make_param(
    rngs: nnx.Rngs,
    init: Initializer,
    shape: tuple[int, ...],
    names: Names,
    dtype: jnp.dtype = jnp.float32,
) -> nnx.Param:
    """``nnx.Param(init(key, shape, dtype))`` with ``out_sharding=names``.

    Eager sharding (flax's default) is used only when a mesh is set (``jax.set_mesh``): without
    one flax would refuse to create an annotated variable; the names then stay metadata that
    ``nnx.get_partition_spec`` reads.
    """
    if len(names) != len(shape):
        raise ValueError(f"sharding names {names} do not match parameter shape {shape}")
    value = init(rngs.params(), shape, dtype)
    eager = nnx.using_eager_sharding() and _mesh_is_set()
    return nnx.Param(value, out_sharding=tuple(names), eager_sharding=eager)
