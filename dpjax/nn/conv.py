"""Causal depthwise short convolution (kernel ``W``, default 4) followed by SiLU.

``y_t = SiLU(sum_{i<W} w[i] * x_{t-W+1+i} + b)`` per channel, with zeros before the first token
(``w[W-1]`` multiplies the current token; a PyTorch Conv1d weight ``[C, 1, W]`` ports as its
transpose ``[W, C]``). Packed documents never see each other (``segment_ids``) and padding
contributes nothing (``mask``), so each document's outputs equal those of running it alone.
For decoding, ``window`` extracts the last ``W-1`` inputs and ``step`` advances one token.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from dpjax.nn.init import Initializer
from dpjax.nn.param import make_param
from dpjax.nn.sharding_names import CONV_KERNEL, HEADS_BIAS


def _shift(x: jax.Array, s: int) -> jax.Array:
    """Shift ``[B, T, ...]`` right by ``s`` along T, zero fill."""
    if s == 0:
        return x
    pad = [(0, 0)] * x.ndim
    pad[1] = (s, 0)
    return jnp.pad(x[:, : x.shape[1] - s], pad)


class ShortConv(nnx.Module):
    """Depthwise causal conv1d + SiLU over ``channels`` features.

    Args:
      channels: number of channels ``C``.
      kernel_size: ``W``.
      use_bias: add a per-channel bias.
      kernel_init, bias_init: initialisers for ``kernel [W, C]`` and ``bias [C]``.
      dtype: output dtype (math in fp32).
    """

    def __init__(
        self,
        channels: int,
        *,
        kernel_size: int = 4,
        use_bias: bool = False,
        kernel_init: Initializer,
        bias_init: Initializer,
        dtype: jnp.dtype = jnp.float32,
        param_dtype: jnp.dtype = jnp.float32,
        rngs: nnx.Rngs,
    ):
        self.channels = channels
        self.kernel_size = kernel_size
        self.dtype = dtype
        self.kernel = make_param(
            rngs, kernel_init, (kernel_size, channels), CONV_KERNEL, param_dtype
        )
        self.bias = (
            make_param(rngs, bias_init, (channels,), HEADS_BIAS, param_dtype) if use_bias else None
        )

    def _mask_input(self, x: jax.Array, mask: jax.Array | None) -> jax.Array:
        x = x.astype(jnp.float32)
        return x if mask is None else jnp.where(mask[..., None], x, 0.0)

    def _finish(self, y: jax.Array) -> jax.Array:
        if self.bias is not None:
            y = y + self.bias[...].astype(jnp.float32)
        return jax.nn.silu(y).astype(self.dtype)

    def __call__(
        self,
        x: jax.Array,
        *,
        segment_ids: jax.Array | None = None,
        mask: jax.Array | None = None,
    ) -> jax.Array:
        """``x [B, T, C] -> [B, T, C]``.

        Args:
          segment_ids: optional ``[B, T]`` int document ids; taps never cross an id change.
          mask: optional ``[B, T]`` bool, False for padding (treated as zero input).
        """
        x = self._mask_input(x, mask)
        w = self.kernel[...].astype(jnp.float32)
        W = self.kernel_size
        y = x * w[W - 1]
        for s in range(1, min(W, x.shape[1] + 1)):
            xs = _shift(x, s)
            if segment_ids is not None:
                same = _shift(segment_ids, s) == segment_ids
                xs = jnp.where(same[..., None], xs, 0.0)
            y = y + xs * w[W - 1 - s]
        return self._finish(y)

    def window(
        self,
        x: jax.Array,
        *,
        segment_ids: jax.Array | None = None,
        mask: jax.Array | None = None,
    ) -> jax.Array:
        """The decoding cache after ``x [B, T, C]``: its last ``W-1`` inputs ``[B, W-1, C]`` fp32
        (zeros for padding, for tokens of an earlier document than the last token's, and before
        the start)."""
        x = self._mask_input(x, mask)
        if segment_ids is not None:
            x = jnp.where((segment_ids == segment_ids[:, -1:])[..., None], x, 0.0)
        keep = self.kernel_size - 1
        if x.shape[1] < keep:
            x = jnp.pad(x, ((0, 0), (keep - x.shape[1], 0), (0, 0)))
        return x[:, x.shape[1] - keep :]

    def empty_window(self, batch_size: int) -> jax.Array:
        """Zero cache ``[B, W-1, C]`` fp32 (no tokens seen)."""
        return jnp.zeros((batch_size, self.kernel_size - 1, self.channels), jnp.float32)

    def step(self, x: jax.Array, window: jax.Array) -> tuple[jax.Array, jax.Array]:
        """One token: ``x [B, C]``, ``window [B, W-1, C]`` -> ``(y [B, C], new window)``."""
        full = jnp.concatenate([window, x.astype(jnp.float32)[:, None]], axis=1)  # [B, W, C]
        w = self.kernel[...].astype(jnp.float32)
        y = full[:, -1] * w[-1]
        for i in range(self.kernel_size - 2, -1, -1):  # same summation order as __call__
            y = y + full[:, i] * w[i]
        return self._finish(y), full[:, 1:]
