"""Parameter initialisers and the two initialisation schemes (SPEC §4.2–§4.4).

``init_scheme="paper"`` (default; what the paper's checkpoints were trained with, vendored FLA
v0.2.2):

* DeltaProduct mixer Linears (q, k, v, beta, a, g, o projections): xavier-uniform with gain
  ``2**-2.5``; fans are those of ONE sub-step projection (the paper had ``n_h`` separate
  ``D -> H*d`` Linears, we fuse them).
* short convs: PyTorch's Conv1d default, ``U(-1/sqrt(W), 1/sqrt(W))`` (depthwise: fan-in = W)
  for kernel and bias.
* embedding, untied lm_head, MLP gate/up, attention q/k/v: ``N(0, initializer_range)``.
* MLP ``down_proj`` and attention ``o_proj``: PyTorch Linear default (kaiming-uniform a=sqrt(5),
  ``U(-1/sqrt(fan_in), 1/sqrt(fan_in))``) divided by ``sqrt(2 * num_hidden_layers)``.

``init_scheme="fla"`` (current FLA / HF ``_init_weights``): every Linear, conv and embedding
weight ``N(0, initializer_range)``, biases zero.

Both: norm weights 1; forget-gate ``A_log = log U(0, 16)`` and ``dt_bias = softplus^-1(dt)``
with ``dt`` log-uniform in ``[1e-3, 0.1]`` clamped at ``1e-4`` (SPEC §4.3).

Every initialiser has the ``jax.nn.initializers`` signature ``init(key, shape, dtype)``; Linear
kernels are ``[in, out]``, conv kernels ``[W, C]``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp

if TYPE_CHECKING:
    from dpjax.nn.config import DeltaProductConfig

Initializer = Callable[[jax.Array, tuple[int, ...], jnp.dtype], jax.Array]

INIT_SCHEMES = ("paper", "fla")
PAPER_MIXER_GAIN = 2.0**-2.5

ROLES = (
    "embedding",
    "lm_head",
    "mixer_in",
    "mixer_out",
    "conv_kernel",
    "conv_bias",
    "mlp_in",
    "mlp_out",
    "attn_in",
    "attn_out",
    "bias",
)


def zeros(key: jax.Array, shape: tuple[int, ...], dtype=jnp.float32) -> jax.Array:
    del key
    return jnp.zeros(shape, dtype)


def ones(key: jax.Array, shape: tuple[int, ...], dtype=jnp.float32) -> jax.Array:
    del key
    return jnp.ones(shape, dtype)


def normal(std: float) -> Initializer:
    """``N(0, std^2)``."""

    def init(key, shape, dtype=jnp.float32):
        return (std * jax.random.normal(key, shape, jnp.float32)).astype(dtype)

    return init


def uniform(bound: float) -> Initializer:
    """``U(-bound, bound)``."""

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, jnp.float32, -bound, bound).astype(dtype)

    return init


def xavier_uniform(gain: float = 1.0, splits: int = 1) -> Initializer:
    """Xavier/Glorot uniform for a ``[in, out]`` kernel whose ``out`` axis fuses ``splits``
    independent projections: ``bound = gain * sqrt(6 / (in + out / splits))``."""

    def init(key, shape, dtype=jnp.float32):
        fan_in, fan_out = shape[0], shape[-1] // splits
        return uniform(gain * math.sqrt(6.0 / (fan_in + fan_out)))(key, shape, dtype)

    return init


def torch_linear_default(divisor: float = 1.0) -> Initializer:
    """PyTorch ``nn.Linear`` default (kaiming-uniform, a=sqrt(5)) for a ``[in, out]`` kernel:
    ``U(-1/sqrt(in), 1/sqrt(in))``, then divided by ``divisor``."""

    def init(key, shape, dtype=jnp.float32):
        return uniform(1.0 / math.sqrt(shape[0]) / divisor)(key, shape, dtype)

    return init


def a_log_init(key: jax.Array, shape: tuple[int, ...], dtype=jnp.float32) -> jax.Array:
    """Forget-gate decay rates: ``A_log = log A``, ``A ~ U(0, 16)`` (SPEC §4.3)."""
    a = jax.random.uniform(key, shape, jnp.float32, 0.0, 16.0)
    return jnp.log(jnp.maximum(a, jnp.finfo(jnp.float32).tiny)).astype(dtype)


def dt_bias_init(dt_min: float = 1e-3, dt_max: float = 0.1, dt_floor: float = 1e-4) -> Initializer:
    """``dt_bias = softplus^-1(dt)``; ``dt`` log-uniform in ``[dt_min, dt_max]``, >= dt_floor."""

    def init(key, shape, dtype=jnp.float32):
        u = jax.random.uniform(key, shape, jnp.float32)
        dt = jnp.exp(u * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
        dt = jnp.maximum(dt, dt_floor)
        return (dt + jnp.log(-jnp.expm1(-dt))).astype(dtype)

    return init


def initializer(
    config: DeltaProductConfig, role: str, *, splits: int = 1, conv_size: int | None = None
) -> Initializer:
    """The initialiser of one parameter role under ``config.init_scheme``.

    Args:
      config: model config (``init_scheme``, ``initializer_range``, ``num_hidden_layers``).
      role: one of ``ROLES``.
      splits: number of fused sub-step projections in a ``mixer_in`` kernel (``n_h`` for k/v/beta).
      conv_size: kernel width ``W`` for ``conv_*`` roles (default ``config.conv_size``).
    """
    if role not in ROLES:
        raise ValueError(f"initializer: unknown role {role!r}; known: {ROLES}")
    std = config.initializer_range
    if role == "bias":
        return zeros
    if config.init_scheme == "fla":
        return zeros if role == "conv_bias" else normal(std)
    rescale = math.sqrt(2 * config.num_hidden_layers)
    width = config.conv_size if conv_size is None else conv_size
    if role in ("mixer_in", "mixer_out"):
        return xavier_uniform(PAPER_MIXER_GAIN, splits)
    if role in ("conv_kernel", "conv_bias"):
        return uniform(1.0 / math.sqrt(width))
    if role in ("mlp_out", "attn_out"):
        return torch_linear_default(rescale)
    return normal(std)  # embedding, lm_head, mlp_in, attn_in
