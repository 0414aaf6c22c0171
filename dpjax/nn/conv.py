"""Causal depthwise short convolution (kernel ``W``, default 4) followed by SiLU.

``y_t = SiLU(sum_{i<W} w[i] * x_{t-W+1+i} + b)`` per channel, with zeros before the first token
(``w[W-1]`` multiplies the current token; a PyTorch Conv1d weight ``[C, 1, W]`` ports as its
transpose ``[W, C]``). Packed documents never see each other (``segment_ids``) and padding
contributes nothing (``mask``), so each document's outputs equal those of running it alone.
For decoding, ``window`` extracts the last ``W-1`` inputs and ``step`` advances one token.
With ``norm_group`` each group of that many channels is L2-normalised after the SiLU (the mixer's
q and k heads), in fp32 before the cast, and inside the kernels below.

The backward (``backward=``): XLA's autodiff of the forward writes the pre-activation gradient in
fp32 and reads it back for the kernel's gradient (separate fusions, ≈ 10 % of a 392M language
model's train step on an H100); ``backward="auto"`` (the default) runs it on a GPU as one Pallas
kernel instead (``pallas_kernels.short_conv``: reads ``x`` and ``dy`` once, writes ``dx`` once;
2.8x faster than autodiff on an H100, docs/BENCHMARKS.md), under ``shard_map`` over the batch
when ``dpjax.ops.sharded.batch_parallel`` is active; off the GPU it falls back to autodiff.
The forward (``forward=``, ``"auto"`` by default) is the same kind of one-pass kernel on a GPU
(``short_conv_forward``): XLA's fusion of the convolution with the group L2 norm took 0.99 ms at
the 392M models' largest shape on an H100, the kernel 0.15 ms (docs/BENCHMARKS.md).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from dpjax.nn.init import Initializer
from dpjax.nn.param import make_param
from dpjax.nn.sharding_names import CONV_KERNEL, HEADS_BIAS
from dpjax.ops import sharded
from dpjax.ops.l2norm import L2NORM_EPS, l2norm_groups
from pallas_kernels.common import default_interpret
from pallas_kernels.short_conv import channel_block, short_conv_backward, short_conv_forward

CONV_IMPLS = ("auto", "xla", "pallas")


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
    norm_group: int | None = None,
) -> jax.Array:
    """``SiLU(causal_depthwise_conv(x, kernel) + bias)``: ``x [B, T, C]`` (padding zeroed),
    ``kernel [W, C]``, ``bias [C]`` or None, ``segment_ids [B, T]`` or None -> ``[B, T, C]``
    ``out_dtype`` (math in fp32); with ``norm_group`` each group of that many channels
    L2-normalised (``dpjax.ops.l2norm``) before the cast."""
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
    return _bias_silu(y, bias, out_dtype, norm_group)


def _bias_silu(
    y: jax.Array, bias: jax.Array | None, out_dtype: jnp.dtype, norm_group: int | None
) -> jax.Array:
    """``SiLU(y + bias)`` in fp32 (``y [..., C]`` fp32 pre-activation), each group of
    ``norm_group`` channels L2-normalised (None: not normalised), cast to ``out_dtype``."""
    if bias is not None:
        y = y + bias.astype(jnp.float32)
    y = jax.nn.silu(y)
    if norm_group is not None:
        y = l2norm_groups(y, norm_group)
    return y.astype(out_dtype)


def _kernel_forward(x, kernel, bias, segment_ids, out_dtype, norm_group, interpret: bool):
    """``pallas_kernels.short_conv.short_conv_forward``, per device
    (``sharded.per_device_rows``)."""

    def run(x, segment_ids, kernel, bias):
        y = short_conv_forward(
            x, kernel, bias, segment_ids, out_dtype, interpret=interpret, **_norm(norm_group)
        )
        return (y,)

    (y,) = sharded.per_device_rows(
        run, (x, segment_ids), (kernel, bias), 1, 0, "the short convolution's batch"
    )
    return y


def _kernel_backward(x, dy, kernel, bias, segment_ids, norm_group, interpret: bool):
    """``pallas_kernels.short_conv.short_conv_backward``, per device
    (``sharded.per_device_rows``; the kernel and bias gradients summed over the devices)."""

    def run(x, dy, segment_ids, kernel, bias):
        return short_conv_backward(
            x, dy, kernel, bias, segment_ids, interpret=interpret, **_norm(norm_group)
        )

    return sharded.per_device_rows(
        run, (x, dy, segment_ids), (kernel, bias), 1, 2, "the short convolution's batch"
    )


def _norm(norm_group: int | None) -> dict:
    return {"norm_group": norm_group, "norm_eps": L2NORM_EPS}


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6, 7, 8))
def conv_silu_kernels(
    x: jax.Array,
    kernel: jax.Array,
    bias: jax.Array | None,
    segment_ids: jax.Array | None,
    out_dtype: jnp.dtype,
    norm_group: int | None,
    forward_kernel: bool,
    backward_kernel: bool,
    interpret: bool,
) -> jax.Array:
    """``conv_silu`` with its forward (``forward_kernel``) and/or backward (``backward_kernel``)
    each one Pallas kernel (module doc); the other by XLA."""
    return _forward(x, kernel, bias, segment_ids, out_dtype, norm_group, forward_kernel, interpret)


def _forward(x, kernel, bias, segment_ids, out_dtype, norm_group, forward_kernel, interpret):
    args = (x, kernel, bias, segment_ids, out_dtype, norm_group)
    return _kernel_forward(*args, interpret) if forward_kernel else conv_silu(*args)


def _vjp_fwd(x, kernel, bias, segment_ids, out_dtype, norm_group, forward_kernel, _, interpret):
    y = _forward(x, kernel, bias, segment_ids, out_dtype, norm_group, forward_kernel, interpret)
    return y, (x, kernel, bias, segment_ids)


def _vjp_bwd(out_dtype, norm_group, forward_kernel, backward_kernel, interpret, res, dy):
    x, kernel, bias, segment_ids = res
    if backward_kernel:
        dx, dw, db = _kernel_backward(x, dy, kernel, bias, segment_ids, norm_group, interpret)
    else:
        _, pullback = jax.vjp(
            lambda x, w, b: conv_silu(x, w, b, segment_ids, out_dtype, norm_group),
            x,
            kernel,
            bias,
        )
        dx, dw, db = pullback(dy)
    return (
        dx.astype(x.dtype),
        dw.astype(kernel.dtype),
        None if bias is None else db.astype(bias.dtype),
        None,
    )


conv_silu_kernels.defvjp(_vjp_fwd, _vjp_bwd)


class ShortConv(nnx.Module):
    """Depthwise causal conv1d + SiLU over ``channels`` features.

    Args:
      channels: number of channels ``C``.
      kernel_size: ``W``.
      use_bias: add a per-channel bias.
      kernel_init, bias_init: initialisers for ``kernel [W, C]`` and ``bias [C]``.
      dtype: output dtype (math in fp32).
      norm_group: None, or L2-normalise each group of this many channels after the SiLU (the
        mixer's q and k heads; with the kernels: a power of two >= 16).
      forward, backward: ``"auto"`` (the Pallas kernel on a GPU when ``C`` has a power-of-two
        divisor >= 16, else XLA), ``"xla"`` (XLA; for the backward its autodiff), or ``"pallas"``
        (the kernel; interpret mode off the GPU). Both default to ``"auto"``.
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
        norm_group: int | None = None,
        forward: str = "auto",
        backward: str = "auto",
        rngs: nnx.Rngs,
    ):
        for name, impl in (("forward", forward), ("backward", backward)):
            if impl not in CONV_IMPLS:
                raise ValueError(f"{name}: expected one of {CONV_IMPLS}, got {impl!r}")
            if impl == "pallas" and channel_block(channels, norm_group=norm_group) is None:
                raise ValueError(
                    f"{name}='pallas': channels must have a power-of-two divisor >= 16 (with "
                    f"norm_group: a power-of-two group >= 16), got channels={channels}, "
                    f"norm_group={norm_group}"
                )
        if norm_group is not None and (norm_group < 1 or channels % norm_group):
            raise ValueError(
                f"norm_group: expected a positive divisor of channels={channels}, got {norm_group}"
            )
        self.channels = channels
        self.norm_group = norm_group
        self.forward = forward
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
        bias = None if self.bias is None else self.bias[...]
        return _bias_silu(y, bias, self.dtype, self.norm_group)

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
        args = (x, self.kernel[...], bias, segment_ids, self.dtype, self.norm_group)
        forward_kernel, backward_kernel = (
            self.uses_kernel(self.forward),
            self.uses_kernel(self.backward),
        )
        if forward_kernel or backward_kernel:
            return conv_silu_kernels(*args, forward_kernel, backward_kernel, default_interpret())
        return conv_silu(*args)

    def uses_kernel(self, impl: str) -> bool:
        """Whether ``impl`` (``self.forward`` or ``self.backward``) runs the Pallas kernel here."""
        if impl == "auto":
            served = channel_block(self.channels, norm_group=self.norm_group) is not None
            return jax.default_backend() == "gpu" and served
        return impl == "pallas"

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
