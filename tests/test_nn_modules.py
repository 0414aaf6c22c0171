"""dpjax.nn building blocks against independent numpy computations: short conv (with documents,
padding and the decoding step), norms, SwiGLU, the DeltaProduct mixer (FLA's (n, h, d) layout,
gates, output norm) and hybrid softmax attention (RoPE, GQA, sliding window)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from oracle import delta_product_np

from dpjax.nn import (
    Attention,
    DeltaProductConfig,
    DeltaProductMixer,
    GatedMLP,
    GatedRMSNorm,
    RMSNorm,
    SequenceInfo,
    ShortConv,
)
from dpjax.nn.init import normal, uniform

RTOL = 1e-5  # fp32 modules vs float64 numpy


def _np(x):
    return np.asarray(x, np.float64)


def silu(x):
    return x / (1 + np.exp(-x))


def softplus(x):
    return np.log1p(np.exp(x))


def rel_err(ref, x):
    return float(np.max(np.abs(_np(ref) - _np(x))) / np.max(np.abs(_np(ref))))


# --- short conv ------------------------------------------------------------------------------
def conv_np(x, w, b, seg, mask):
    B, T, C = x.shape
    W = w.shape[0]
    y = np.zeros((B, T, C))
    for bb in range(B):
        for t in range(T):
            acc = b.copy()
            for i in range(W):
                s = t - (W - 1) + i
                if s < 0 or seg[bb, s] != seg[bb, t] or not mask[bb, s]:
                    continue
                acc = acc + w[i] * x[bb, s]
            y[bb, t] = acc
    return silu(y)


def test_short_conv_documents_padding_and_step():
    rng = np.random.default_rng(0)
    B, T, C = 2, 11, 6
    conv = ShortConv(
        C,
        kernel_size=4,
        use_bias=True,
        kernel_init=uniform(0.5),
        bias_init=uniform(0.5),
        rngs=nnx.Rngs(0),
    )
    x = rng.normal(size=(B, T, C)).astype(np.float32)
    seg = np.array([[0] * 4 + [1] * 7, [0] * 2 + [3] * 5 + [4] * 4], np.int32)
    mask = np.ones((B, T), bool)
    mask[1, :2] = False
    w, b = _np(conv.kernel[...]), _np(conv.bias[...])
    got = conv(jnp.asarray(x), segment_ids=jnp.asarray(seg), mask=jnp.asarray(mask))
    np.testing.assert_allclose(got, conv_np(x, w, b, seg, mask), rtol=RTOL, atol=RTOL)
    plain = conv(jnp.asarray(x))
    np.testing.assert_allclose(
        plain, conv_np(x, w, b, np.zeros((B, T)), np.ones((B, T), bool)), rtol=RTOL, atol=RTOL
    )
    # decoding: window after a prefix, then steps, equals the full conv
    window = conv.window(jnp.asarray(x[:, :2]))
    for t in range(2, T):
        y, window = conv.step(jnp.asarray(x[:, t]), window)
        np.testing.assert_allclose(y, plain[:, t], rtol=RTOL, atol=RTOL)


# --- norms and MLP ---------------------------------------------------------------------------
def test_rmsnorm_and_gated_rmsnorm():
    rng = np.random.default_rng(1)
    x, gate = rng.normal(size=(3, 5, 8)), rng.normal(size=(3, 5, 8))
    norm = RMSNorm(8, eps=1e-6, rngs=nnx.Rngs(0))
    norm.weight[...] = jnp.asarray(rng.normal(size=8), jnp.float32)
    w = _np(norm.weight[...])
    ref = x / np.sqrt(np.mean(x**2, -1, keepdims=True) + 1e-6) * w
    np.testing.assert_allclose(norm(jnp.asarray(x, jnp.float32)), ref, rtol=RTOL, atol=RTOL)
    gated = GatedRMSNorm(8, eps=1e-6, rngs=nnx.Rngs(0))
    gated.weight[...] = norm.weight[...]
    got = gated(jnp.asarray(x, jnp.float32), jnp.asarray(gate, jnp.float32))
    np.testing.assert_allclose(got, ref * silu(gate), rtol=RTOL, atol=RTOL)


def test_swiglu():
    rng = np.random.default_rng(2)
    mlp = GatedMLP(8, 12, in_init=normal(0.3), out_init=normal(0.3), rngs=nnx.Rngs(0))
    x = rng.normal(size=(4, 8))
    wg, wu, wd = (_np(m.kernel[...]) for m in (mlp.gate_proj, mlp.up_proj, mlp.down_proj))
    ref = (silu(x @ wg) * (x @ wu)) @ wd
    np.testing.assert_allclose(mlp(jnp.asarray(x, jnp.float32)), ref, rtol=1e-5, atol=1e-5)


# --- mixer -----------------------------------------------------------------------------------
def mixer_np(mixer: DeltaProductMixer, x: np.ndarray) -> np.ndarray:
    """The mixer without short convs, written with explicit per-sub-step projections."""
    c = mixer.config
    B, T, _ = x.shape
    H, n, dk, dv = c.num_heads, c.num_householder, c.head_dim, c.value_head_dim
    W = {
        name: _np(getattr(mixer, name).kernel[...])
        for name in ("q_proj", "k_proj", "v_proj", "b_proj", "o_proj")
    }

    def l2(z):
        return z / np.sqrt(np.sum(z**2, -1, keepdims=True) + 1e-6)

    q = l2(silu(x @ W["q_proj"]).reshape(B, T, H, dk))
    # sub-step j uses the j-th contiguous block of H*d features: FLA's (n, h, d) layout
    ks = [
        silu(x @ W["k_proj"][:, j * H * dk : (j + 1) * H * dk]).reshape(B, T, H, dk)
        for j in range(n)
    ]
    vs = [
        silu(x @ W["v_proj"][:, j * H * dv : (j + 1) * H * dv]).reshape(B, T, H, dv)
        for j in range(n)
    ]
    bs = [1 / (1 + np.exp(-(x @ W["b_proj"][:, j * H : (j + 1) * H]))) for j in range(n)]
    k = l2(np.stack(ks, 2).reshape(B, T * n, H, dk))
    v = np.stack(vs, 2).reshape(B, T * n, H, dv)
    beta = np.stack(bs, 2).reshape(B, T * n, H) * (2.0 if c.allow_neg_eigval else 1.0)
    g = None
    if c.use_forget_gate:
        a = x @ _np(mixer.a_proj.kernel[...]) + _np(mixer.dt_bias[...])
        g = -np.exp(_np(mixer.A_log[...])) * softplus(a)
    o, _ = delta_product_np(q, k, v, beta, g)
    o = o / np.sqrt(np.mean(o**2, -1, keepdims=True) + c.norm_eps) * _np(mixer.o_norm.weight[...])
    if c.use_output_gate:
        o = o * silu((x @ _np(mixer.g_proj.kernel[...])).reshape(B, T, H, dv))
    return o.reshape(B, T, H * dv) @ W["o_proj"]


@pytest.mark.parametrize("n_h, gated", [(1, False), (3, True)])
def test_mixer_matches_numpy(n_h, gated):
    cfg = DeltaProductConfig(
        hidden_size=16,
        num_heads=2,
        head_dim=8,
        expand_v=1.5,
        num_householder=n_h,
        use_short_conv=False,
        use_forget_gate=gated,
        use_output_gate=gated,
        allow_neg_eigval=True,
        num_hidden_layers=1,
        vocab_size=8,
        impl="reference",
        init_scheme="fla",
        initializer_range=0.3,
    )
    mixer = DeltaProductMixer(cfg, rngs=nnx.Rngs(3))
    x = np.random.default_rng(4).normal(size=(2, 7, 16))
    got = mixer(jnp.asarray(x, jnp.float32))
    assert got.shape == (2, 7, 16) and got.dtype == jnp.float32
    assert rel_err(mixer_np(mixer, x), got) < 1e-5


# --- attention -------------------------------------------------------------------------------
def rope_np(x, pos, theta):
    d = x.shape[-1]
    inv = theta ** (-np.arange(0, d, 2) / d)
    ang = pos[..., None] * inv  # [T, d/2]
    cos, sin = np.cos(ang)[:, None], np.sin(ang)[:, None]
    x1, x2 = x[..., : d // 2], x[..., d // 2 :]
    return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1)


def attention_np(attn: Attention, x, window):
    T, D = x.shape
    H, Hkv, hd = attn.num_heads, attn.num_kv_heads, attn.head_dim
    pos = np.arange(T, dtype=np.float64)
    q = rope_np(
        (x @ _np(attn.q_proj.kernel[...]) + _np(attn.q_proj.bias[...])).reshape(T, H, hd),
        pos,
        attn.rope_theta,
    )
    k = rope_np(
        (x @ _np(attn.k_proj.kernel[...]) + _np(attn.k_proj.bias[...])).reshape(T, Hkv, hd),
        pos,
        attn.rope_theta,
    )
    v = (x @ _np(attn.v_proj.kernel[...]) + _np(attn.v_proj.bias[...])).reshape(T, Hkv, hd)
    out = np.zeros((T, H, hd))
    for h in range(H):
        kv = h // (H // Hkv)
        for i in range(T):
            js = [j for j in range(i + 1) if window is None or i - j < window]
            s = np.array([q[i, h] @ k[j, kv] for j in js]) / np.sqrt(hd)
            p = np.exp(s - s.max())
            p /= p.sum()
            out[i, h] = sum(pj * v[j, kv] for pj, j in zip(p, js, strict=True))
    return out.reshape(T, H * hd) @ _np(attn.o_proj.kernel[...])


@pytest.mark.parametrize("window", [None, 3])
def test_attention_matches_numpy(window):
    cfg = DeltaProductConfig(
        hidden_size=16,
        num_heads=2,
        head_dim=8,
        num_hidden_layers=1,
        vocab_size=8,
        attn={
            "layers": [0],
            "num_heads": 4,
            "num_kv_heads": 2,
            "qkv_bias": True,
            "window_size": window,
            "rope_theta": 500.0,
        },
        init_scheme="fla",
        initializer_range=0.3,
    )
    attn = Attention(cfg, rngs=nnx.Rngs(5))
    attn.q_proj.bias[...] = jnp.full_like(attn.q_proj.bias[...], 0.1)
    attn.k_proj.bias[...] = jnp.full_like(attn.k_proj.bias[...], -0.2)
    x = np.random.default_rng(6).normal(size=(2, 9, 16))
    got = attn(jnp.asarray(x, jnp.float32))
    for b in range(2):
        assert rel_err(attention_np(attn, x[b], window), got[b]) < 1e-5


def test_sequence_positions():
    seg = jnp.asarray([[0, 0, 1, 1, 1, 2]])
    mask = jnp.asarray([[1, 1, 0, 1, 1, 1]])
    info = SequenceInfo.build(jnp.zeros((1, 6), jnp.int32), seg, mask)
    np.testing.assert_array_equal(info.positions, [[0, 1, 0, 0, 1, 0]])
    left = SequenceInfo.build(jnp.zeros((1, 5), jnp.int32), None, jnp.asarray([[0, 0, 1, 1, 1]]))
    np.testing.assert_array_equal(left.positions[0, 2:], [0, 1, 2])
    with pytest.raises(ValueError, match="attention_mask: expected shape"):
        SequenceInfo.build(jnp.zeros((1, 5), jnp.int32), None, jnp.ones((1, 4)))


@pytest.mark.parametrize("vocab", [13, 5000])  # one-hot gradient / XLA scatter gradient
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_embedding_lookup_and_gradient(vocab, dtype):
    import jax

    from dpjax.nn.linear import embedding_lookup

    rng = np.random.default_rng(vocab)
    table = jnp.asarray(rng.standard_normal((vocab, 24)), dtype)
    ids = rng.integers(-3, vocab + 3, size=(6, 50))  # out-of-range ids are clipped
    dy = rng.standard_normal((6, 50, 24))
    out, vjp = jax.vjp(lambda t: embedding_lookup(t, jnp.asarray(ids)), table)
    clipped = np.clip(ids, 0, vocab - 1)
    np.testing.assert_array_equal(np.asarray(out, np.float64), _np(table)[clipped])
    (dtable,) = vjp(jnp.asarray(dy, dtype))
    want = np.zeros((vocab, 24))
    np.add.at(want, clipped, _np(jnp.asarray(dy, dtype)))
    assert dtable.dtype == dtype and dtable.shape == table.shape
    tol = 1e-5 if dtype == jnp.float32 else 2e-2
    assert rel_err(want, dtable) < tol


@pytest.mark.parametrize(
    "x_dtype,w_dtype,compute,out",
    [
        (jnp.float32, jnp.float32, jnp.bfloat16, jnp.bfloat16),  # fp32 master weights, bf16 compute
        (jnp.bfloat16, jnp.float32, jnp.bfloat16, jnp.float32),  # bf16 activations, fp32 logits
        (jnp.bfloat16, jnp.bfloat16, jnp.bfloat16, jnp.bfloat16),  # all bf16 (state tracking)
        (jnp.float32, jnp.float32, jnp.float32, jnp.float32),  # fp32 throughout
    ],
)
def test_mixed_matmul_values_gradients_and_dtypes(x_dtype, w_dtype, compute, out):
    from dpjax.nn.linear import mixed_matmul

    rng = np.random.default_rng(7)
    x = jnp.asarray(rng.normal(size=(3, 5, 24)), x_dtype)
    w = jnp.asarray(rng.normal(size=(24, 40)) * 0.2, w_dtype)
    dy = jnp.asarray(rng.normal(size=(3, 5, 40)), jnp.float32)

    def ours(x, w):
        return jnp.sum(mixed_matmul(x, w, compute, out).astype(jnp.float32) * dy)

    def exact(x, w):  # fp32 maths on the operands rounded to the compute dtype
        xc = x.astype(compute).astype(jnp.float32)
        wc = w.astype(compute).astype(jnp.float32)
        return jnp.sum(jnp.einsum("bti,io->bto", xc, wc) * dy)

    y = mixed_matmul(x, w, compute, out)
    assert y.dtype == out and y.shape == (3, 5, 40)
    (dx, dw), (rx, rw) = jax.grad(ours, (0, 1))(x, w), jax.grad(exact, (0, 1))(x, w)
    assert dx.dtype == x_dtype and dw.dtype == w_dtype  # an fp32 master weight gets an fp32 grad
    # the backward rounds the cotangent (and dx) to the compute dtype once: bf16 rounding, no more
    tol = 1e-5 if compute == jnp.float32 else 2e-2
    for got, ref in ((dx, rx), (dw, rw)):
        got, ref = np.asarray(got, np.float32), np.asarray(ref, np.float32)
        assert np.all(np.isfinite(got))
        assert np.sqrt(np.mean((got - ref) ** 2) / np.mean(ref**2)) < tol


def test_mixed_matmul_backward_runs_in_the_compute_dtype():
    """No fp32 x bf16 dot (an fp32/TF32 GEMM on a GPU) in the gradient, lowered for CUDA."""
    from dpjax.nn.linear import mixed_matmul

    x = jnp.ones((4, 8, 16), jnp.float32)
    w = jnp.ones((16, 32), jnp.float32)

    def loss(x, w):
        return jnp.sum(mixed_matmul(x, w, jnp.bfloat16, jnp.bfloat16).astype(jnp.float32) ** 2)

    grad = jax.jit(jax.grad(loss, (0, 1)))
    hlo = grad.trace(x, w).lower(lowering_platforms=("cuda",)).as_text()
    dots = [line for line in hlo.splitlines() if "dot_general" in line]
    assert len(dots) == 3, dots  # forward, dx, dw
    for line in dots:
        operands = line.split(":")[-1].split("->")[0]
        assert "f32" not in operands, line
