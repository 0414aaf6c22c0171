"""The (Gated) DeltaProduct token mixer (SPEC §4.1); DeltaNet is ``num_householder = 1``.

Per token ``x [D]`` (already pre-normed by the block):

1. ``q = SiLU(conv_q(x W_q))``, ``k = SiLU(conv_k(x W_k))``, ``v = SiLU(conv_v(x W_v))``
   (without short convs: ``SiLU(x W)``), q and k L2-normalised per head (``x / sqrt(sum x^2 +
   1e-6)``; with short convs inside them: fused into their Pallas kernels on a GPU).
   ``W_k``/``W_v`` fuse the ``n_h`` sub-step projections with FLA's ``(n, h, d)`` feature layout
   (sub-step ``j`` = the ``j``-th contiguous block).
2. ``beta = sigmoid(x W_b)`` (``[n_h * H]``, ``(n, h)`` layout), ``x 2`` with ``allow_neg_eigval``.
3. Forget gate (optional, fp32): ``g = -exp(A_log) * softplus(x W_a + dt_bias)``, ``[H]``.
4. ``o = delta_product(q, k, v, beta, g)`` (scale ``d_k^-1/2``; q and k are normalised already,
   so ``use_qk_l2norm=False``).
5. Per-head RMSNorm over ``d_v``, times ``SiLU(x W_g)`` with the output gate; then ``o_proj``.

Padding (``mask``) sets ``beta = 0`` and ``g = 0`` on pad tokens, which leaves the state
untouched; packed documents reset the state through the op's ``segment_ids``.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from dpjax.nn.config import DeltaProductConfig
from dpjax.nn.conv import ShortConv
from dpjax.nn.init import a_log_init, dt_bias_init, initializer
from dpjax.nn.linear import Linear
from dpjax.nn.norms import GatedRMSNorm, RMSNorm
from dpjax.nn.param import make_param
from dpjax.nn.sequence import SequenceInfo
from dpjax.nn.sharding_names import IN_PROJ, OUT_PROJ, SCALAR_PROJ, VECTOR
from dpjax.ops import decode, delta_product
from dpjax.ops.l2norm import l2norm_groups

MixerCache = dict[str, Any]


class DeltaProductMixer(nnx.Module):
    """DeltaProduct mixer ``[B, T, D] -> [B, T, D]`` built from ``config``.

    Parameters (Linear kernels ``[in, out]``): ``q_proj [D, H*d_k]``, ``k_proj [D, n_h*H*d_k]``,
    ``v_proj [D, n_h*H*d_v]``, ``b_proj [D, n_h*H]``; with the forget gate ``a_proj [D, H]``,
    ``A_log [H]``, ``dt_bias [H]`` (fp32); with short convs ``q_conv``, ``k_conv``, ``v_conv``;
    with the output gate ``g_proj [D, H*d_v]``; ``o_norm.weight [d_v]``; ``o_proj [H*d_v, D]``.
    """

    def __init__(self, config: DeltaProductConfig, *, layer_idx: int = 0, rngs: nnx.Rngs):
        c = config
        self.config = c
        self.layer_idx = layer_idx
        D, H, n = c.hidden_size, c.num_heads, c.num_householder
        dk, dv = c.head_dim, c.value_head_dim
        dtype, pdtype = c.compute_dtype, c.parameter_dtype
        kw = dict(dtype=dtype, param_dtype=pdtype, rngs=rngs)

        def proj(out, names, splits=1):
            return Linear(D, out, names=names, init=initializer(c, "mixer_in", splits=splits), **kw)

        self.q_proj = proj(H * dk, IN_PROJ)
        self.k_proj = proj(n * H * dk, IN_PROJ, n)
        self.v_proj = proj(n * H * dv, IN_PROJ, n)
        self.b_proj = proj(n * H, SCALAR_PROJ, n)
        if c.use_forget_gate:
            self.a_proj = proj(H, SCALAR_PROJ)
            self.A_log = make_param(rngs, a_log_init, (H,), VECTOR, jnp.float32)
            self.dt_bias = make_param(rngs, dt_bias_init(), (H,), VECTOR, jnp.float32)
        if c.use_short_conv:

            def conv(channels, norm_group=None):
                return ShortConv(
                    channels,
                    norm_group=norm_group,
                    kernel_size=c.conv_size,
                    use_bias=c.conv_bias,
                    kernel_init=initializer(c, "conv_kernel"),
                    bias_init=initializer(c, "conv_bias"),
                    forward=c.conv_forward,
                    backward=c.conv_backward,
                    **kw,
                )

            self.q_conv = conv(H * dk, dk)
            self.k_conv = conv(n * H * dk, dk)
            self.v_conv = conv(n * H * dv)
        if c.use_output_gate:
            self.g_proj = proj(H * dv, IN_PROJ)
            self.o_norm = GatedRMSNorm(dv, eps=c.norm_eps, impl=c.norm_impl, **kw)
        else:
            self.o_norm = RMSNorm(dv, eps=c.norm_eps, impl=c.norm_impl, **kw)
        self.o_proj = Linear(H * dv, D, names=OUT_PROJ, init=initializer(c, "mixer_out"), **kw)

    # ----------------------------------------------------------------------------------------
    def _silu_qkv(self, q, k, v) -> tuple[jax.Array, jax.Array, jax.Array]:
        """Without short convolutions: ``SiLU`` of ``q, k, v [..., C]``, q and k L2-normalised
        per head of ``d_k`` channels (as the convolutions' ``norm_group`` does)."""
        dk = self.config.head_dim
        q, k, v = jax.nn.silu(q), jax.nn.silu(k), jax.nn.silu(v)
        return l2norm_groups(q, dk), l2norm_groups(k, dk), v

    def _gate(self, x: jax.Array) -> jax.Array:
        """``x [..., D] -> g [..., H]`` fp32 log-space forget gate (<= 0)."""
        a = self.a_proj(x).astype(jnp.float32) + self.dt_bias[...]
        return -jnp.exp(self.A_log[...]) * jax.nn.softplus(a)

    def _beta(self, x: jax.Array) -> jax.Array:
        """``x [..., D] -> [..., n_h*H]`` in ``(0, 1)`` or ``(0, 2)``."""
        beta = jax.nn.sigmoid(self.b_proj(x).astype(jnp.float32))
        if self.config.allow_neg_eigval:
            beta = 2.0 * beta
        return beta.astype(self.config.compute_dtype)

    def _output(self, o: jax.Array, x: jax.Array) -> jax.Array:
        """``o [..., H, d_v]``, ``x [..., D]`` -> ``[..., D]``."""
        if self.config.use_output_gate:
            gate = self.g_proj(x).reshape(o.shape)
            o = self.o_norm(o, gate)
        else:
            o = self.o_norm(o)
        return self.o_proj(o.reshape(*o.shape[:-2], -1))

    def op_inputs(
        self, x: jax.Array, seq: SequenceInfo | None = None
    ) -> dict[str, jax.Array | None]:
        """The ``delta_product`` inputs this mixer computes from ``x [B, T, D]``.

        Returns:
          ``{"q": [B,T,H,d_k], "k": [B,T*n_h,H,d_k], "v": [B,T*n_h,H,d_v], "beta": [B,T*n_h,H],
          "g": [B,T,H] fp32 or None, "segment_ids": [B,T] or None}`` (q and k L2-normalised per
          head, as ``__call__`` passes them to the op with ``use_qk_l2norm=False``).
        """
        return self._op_inputs(x, seq)[0]

    def _op_inputs(
        self, x: jax.Array, seq: SequenceInfo | None, *, windows: bool = False
    ) -> tuple[dict[str, jax.Array | None], MixerCache]:
        """``op_inputs`` and, with ``windows``, the short-conv decoding windows after the last
        token (``{"conv_q", "conv_k", "conv_v"}``; empty otherwise)."""
        c = self.config
        B, T, _ = x.shape
        H, n, dk, dv = c.num_heads, c.num_householder, c.head_dim, c.value_head_dim
        seg = None if seq is None else seq.segment_ids
        mask = None if seq is None else seq.mask
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        cache: MixerCache = {}
        if c.use_short_conv:
            if windows:
                for name, conv, inp in (
                    ("q", self.q_conv, q),
                    ("k", self.k_conv, k),
                    ("v", self.v_conv, v),
                ):
                    cache[f"conv_{name}"] = conv.window(inp, segment_ids=seg, mask=mask)
            q = self.q_conv(q, segment_ids=seg, mask=mask)
            k = self.k_conv(k, segment_ids=seg, mask=mask)
            v = self.v_conv(v, segment_ids=seg, mask=mask)
        else:
            q, k, v = self._silu_qkv(q, k, v)
        beta = self._beta(x)
        g = self._gate(x) if c.use_forget_gate else None
        if mask is not None:
            beta = jnp.where(mask[..., None], beta, 0)
            g = None if g is None else jnp.where(mask[..., None], g, 0.0)
        inputs = {
            "q": q.reshape(B, T, H, dk),
            "k": k.reshape(B, T * n, H, dk),
            "v": v.reshape(B, T * n, H, dv),
            "beta": beta.reshape(B, T * n, H),
            "g": g,
            "segment_ids": seg,
        }
        return inputs, cache

    def __call__(
        self,
        x: jax.Array,
        seq: SequenceInfo | None = None,
        *,
        return_cache: bool = False,
    ) -> jax.Array | tuple[jax.Array, MixerCache]:
        """Mix a sequence.

        Args:
          x: ``[B, T, D]``.
          seq: padding mask / document ids (``SequenceInfo.build``); None = one unpadded
            document per row.
          return_cache: also return the decoding cache after the last token (the last
            document's state and conv windows).

        Returns:
          ``[B, T, D]`` in the compute dtype (and the cache ``{"state": [B,H,d_k,d_v] fp32,
          "conv_q"/"conv_k"/"conv_v": [B, W-1, C] fp32}`` with ``return_cache``).
        """
        inp, cache = self._op_inputs(x, seq, windows=return_cache)
        o, state = delta_product(
            inp["q"],
            inp["k"],
            inp["v"],
            inp["beta"],
            inp["g"],
            num_householder=self.config.num_householder,
            segment_ids=inp["segment_ids"],
            output_final_state=return_cache,
            use_qk_l2norm=False,
            impl=self.config.impl,
        )
        out = self._output(o, x)
        if not return_cache:
            return out
        cache["state"] = state
        return out, cache

    # ----------------------------------------------------------------------------------------
    def init_cache(self, batch_size: int) -> MixerCache:
        """Empty decoding cache (zero state and conv windows) for ``batch_size`` rows."""
        c = self.config
        cache: MixerCache = {
            "state": jnp.zeros((batch_size, c.num_heads, c.head_dim, c.value_head_dim), jnp.float32)
        }
        if c.use_short_conv:
            cache["conv_q"] = self.q_conv.empty_window(batch_size)
            cache["conv_k"] = self.k_conv.empty_window(batch_size)
            cache["conv_v"] = self.v_conv.empty_window(batch_size)
        return cache

    def step(self, x: jax.Array, cache: MixerCache) -> tuple[jax.Array, MixerCache]:
        """Decode one token: ``x [B, D]`` -> ``(y [B, D], new cache)``; same function as the
        last row of ``__call__`` on the whole sequence."""
        c = self.config
        B = x.shape[0]
        H, n, dk, dv = c.num_heads, c.num_householder, c.head_dim, c.value_head_dim
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        new: MixerCache = {}
        if c.use_short_conv:
            q, new["conv_q"] = self.q_conv.step(q, cache["conv_q"])
            k, new["conv_k"] = self.k_conv.step(k, cache["conv_k"])
            v, new["conv_v"] = self.v_conv.step(v, cache["conv_v"])
        else:
            q, k, v = self._silu_qkv(q, k, v)
        beta = self._beta(x).reshape(B, n, H)
        g = self._gate(x) if c.use_forget_gate else None
        o, new["state"] = decode(
            cache["state"],
            q.reshape(B, H, dk),
            k.reshape(B, n, H, dk),
            v.reshape(B, n, H, dv),
            beta,
            g,
            use_qk_l2norm=False,
        )
        return self._output(o.astype(c.compute_dtype), x), new
