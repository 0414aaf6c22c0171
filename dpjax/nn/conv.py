"""Causal depthwise short convolution (kernel ``W``, default 4) followed by SiLU.

``y_t = SiLU(sum_{i<W} w[i] * x_{t-W+1+i} + b)`` per channel, with zeros before the first token
(``w[W-1]`` multiplies the current token; a PyTorch Conv1d weight ``[C, 1, W]`` ports as its
transpose ``[W, C]``). Packed documents never see each other (``segment_ids``) and padding
contributes nothing (``mask``), so each document's outputs equal those of running it alone.
For decoding, ``window`` extracts the last ``W-1`` inputs and ``step`` advances one token.

The backward (``backward=``): XLA's autodiff of the forward writes the pre-activation gradient in
fp32 and reads it back for the kernel's gradient (separate fusions, ≈ 10 % of a 392M language
model's train step on an H100); ``backward="auto"`` (the default) runs it on a GPU as one Pallas
kernel instead (``pallas_kernels.short_conv``: reads ``x`` and ``dy`` once, writes ``dx`` once;
2.8x faster than autodiff on an H100, docs/BENCHMARKS.md), under ``shard_map`` over the batch
when ``dpjax.ops.sharded.batch_parallel`` is active; off the GPU it falls back to autodiff.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import PartitionSpec as P

from dpjax.nn.init import Initializer
from dpjax.nn.param import make_param
from dpjax.nn.sharding_names import CONV_KERNEL, HEADS_BIAS
from dpjax.ops import sharded
from pallas_kernels.common import default_interpret
from pallas_kernels.short_conv import channel_block, short_conv_backward

CONV_BACKWARDS = ("auto", "xla", "pallas")


def _shift(x: jax.Array, s: int) -> jax.Array:
    """Shift ``[B, T, ...]`` right by ``s`` along T, zero fill."""
    if s == 0:
        return x
    pad = [(0, 0)] * x.ndim
    pad[1] = (s, 0)
    return jnp.pad(x[:, : x.shape[1] - s], pad)


def conv_silu(
    x: jax.Array,
    kernel: jax.Array,
    bias: jax.Array | None,
    segment_ids: jax.Array | None,
    out_dtype: jnp.dtype,
) -> jax.Array:
    """``SiLU(causal_depthwise_conv(x, kernel) + bias)``: ``x [B, T, C]`` (padding zeroed),
    ``kernel [W, C]``, ``bias [C]`` or None, ``segment_ids [B, T]`` or None -> ``[B, T, C]``
    ``out_dtype`` (math in fp32)."""
    x = x.astype(jnp.float32)
    w = kernel.astype(jnp.float32)
    W = kernel.shape[0]
    y = x * w[W - 1]
    for s in range(1, min(W, x.shape[1] + 1)):
        xs = _shift(x, s)
        if segment_ids is not None:
            same = _shift(segment_ids, s) == segment_ids
            xs = jnp.where(same[..., None], xs, 0.0)
        y = y + xs * w[W - 1 - s]
    return _bias_silu(y, bias, out_dtype)


def _bias_silu(y: jax.Array, bias: jax.Array | None, out_dtype: jnp.dtype) -> jax.Array:
    """``SiLU(y + bias)`` in fp32 (``y`` fp32 pre-activation), cast to ``out_dtype``."""
    if bias is not None:
        y = y + bias.astype(jnp.float32)
    return jax.nn.silu(y).astype(out_dtype)


def _kernel_backward(x, dy, kernel, bias, segment_ids, interpret: bool):
    """``pallas_kernels.short_conv.short_conv_backward``, per device on its rows when a
    ``batch_parallel`` block covering ``"pallas"`` is active."""
    run = functools.partial(short_conv_backward, interpret=interpret)
    setting = sharded.active()
    if setting is None or "pallas" not in setting.impls:
        return run(x, dy, kernel, bias, segment_ids)
    sharded.check_rows(x.shape[0], setting.size, setting.axes, "the short convolution's batch")
    rows = sharded.row_spec(setting.axes)

    def local(x, dy, kernel, bias, segment_ids):
        dx, dw, db = run(x, dy, kernel, bias, segment_ids)
        return dx, dw[None], None if db is None else db[None]

    dx, dw, db = jax.shard_map(
        local,
        mesh=setting.mesh,
        in_specs=(rows, rows, P(), P(), None if segment_ids is None else rows),
        out_specs=(rows, rows, None if bias is None else rows),
        check_vma=False,
    )(x, dy, kernel, bias, segment_ids)
    return dx, jnp.sum(dw, axis=0), None if db is None else jnp.sum(db, axis=0)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def conv_silu_kernel_vjp(x, kernel, bias, segment_ids, out_dtype, interpret: bool):
    """``conv_silu`` with its backward in one Pallas kernel (module doc)."""
    return conv_silu(x, kernel, bias, segment_ids, out_dtype)


def _vjp_fwd(x, kernel, bias, segment_ids, out_dtype, interpret):
    return conv_silu(x, kernel, bias, segment_ids, out_dtype), (x, kernel, bias, segment_ids)


def _vjp_bwd(out_dtype, interpret, res, dy):
    x, kernel, bias, segment_ids = res
    dx, dw, db = _kernel_backward(x, dy, kernel, bias, segment_ids, interpret)
    return (
        dx,
        dw.astype(kernel.dtype),
        None if bias is None else db.astype(bias.dtype),
        None,
    )


conv_silu_kernel_vjp.defvjp(_vjp_fwd, _vjp_bwd)


class ShortConv(nnx.Module):
    """Depthwise causal conv1d + SiLU over ``channels`` features.

    Args:
      channels: number of channels ``C``.
      kernel_size: ``W``.
      use_bias: add a per-channel bias.
      kernel_init, bias_init: initialisers for ``kernel [W, C]`` and ``bias [C]``.
      dtype: output dtype (math in fp32).
      backward: ``"auto"`` (the default: the Pallas kernel on a GPU when ``C`` has a
        power-of-two divisor >= 16, else autodiff), ``"xla"`` (autodiff), or ``"pallas"`` (the
        kernel; interpret mode off the GPU).
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
        backward: str = "auto",
        rngs: nnx.Rngs,
    ):
        if backward not in CONV_BACKWARDS:
            raise ValueError(f"backward: expected one of {CONV_BACKWARDS}, got {backward!r}")
        if backward == "pallas" and channel_block(channels) is None:
            raise ValueError(
                f"backward='pallas': channels must have a power-of-two divisor >= 16, got "
                f"{channels}"
            )
        self.channels = channels
        self.backward = backward
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
        return _bias_silu(y, None if self.bias is None else self.bias[...], self.dtype)

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
        if mask is not None:
            x = jnp.where(mask[..., None], x, jnp.zeros((), x.dtype))
        bias = None if self.bias is None else self.bias[...]
        args = (x, self.kernel[...], bias, segment_ids, self.dtype)
        if self._kernel_backward():
            return conv_silu_kernel_vjp(*args, default_interpret())
        return conv_silu(*args)

    def _kernel_backward(self) -> bool:
        if self.backward == "auto":
            return jax.default_backend() == "gpu" and channel_block(self.channels) is not None
        return self.backward == "pallas"

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
