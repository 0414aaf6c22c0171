"""The short convolution's one-pass Pallas kernels (``pallas_kernels.short_conv``) against XLA:
the backward against autodiff of the same forward and the forward against ``conv_silu``, alone
(interpret mode), the backward inside ``ShortConv`` and the model config and under
``shard_map``, both lowered for an H100 and on a real GPU (marker ``gpu``)."""

from __future__ import annotations

import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from oracle import rel_rmse
from test_pallas_lowering import TRITON_CALL, lower_text, sds

from dpjax.nn.config import DeltaProductConfig
from dpjax.nn.conv import ShortConv, conv_silu
from dpjax.nn.init import uniform
from dpjax.ops import sharded
from dpjax.train import mesh as mesh_lib
from pallas_kernels.short_conv import channel_block, short_conv_backward, short_conv_forward


def problem(rng, B, T, C, W, bias, segments, dtype=jnp.float32):
    """Random ``x, dy [B, T, C]``, ``kernel [W, C]``, ``bias [C]`` / None, sorted segment ids
    (several documents per row, some one token long) / None."""
    x = jnp.asarray(rng.normal(size=(B, T, C)), dtype)
    dy = jnp.asarray(rng.normal(size=(B, T, C)), dtype)
    kernel = jnp.asarray(rng.normal(size=(W, C)), jnp.float32)
    b = jnp.asarray(rng.normal(size=(C,)), jnp.float32) if bias else None
    seg = None
    if segments:
        seg = jnp.asarray(np.sort(rng.integers(0, max(2, T // 5), size=(B, T)), axis=1), jnp.int32)
    return x, dy, kernel, b, seg


def autodiff(x, dy, kernel, b, seg):
    """XLA's gradients of ``<conv_silu(x, kernel, b, seg), dy>`` (fp32 math)."""

    def f(x, kernel, b):
        return jnp.sum(conv_silu(x, kernel, b, seg, jnp.float32) * dy.astype(jnp.float32))

    return jax.grad(f, argnums=(0, 1, 2))(x, kernel, b)


def rel_err(got, want) -> float:
    """``oracle.rel_rmse(want, got)``, after checking ``got`` is finite."""
    assert np.isfinite(np.asarray(got, np.float64)).all()
    return rel_rmse(want, got)


KERNEL_CASES = pytest.mark.parametrize(
    "B, T, C, W, bias, segments, rows, seg_len, ahead",
    [
        (2, 50, 64, 4, True, True, 4, 8, 1),  # the last program's stretches run past the end
        (1, 33, 32, 4, False, False, 2, 16, 2),
        (2, 64, 128, 3, True, False, 1, 64, 1),  # one stretch per program
        (1, 17, 48, 2, False, True, 8, 3, 3),  # channel tile 16
        (3, 5, 16, 4, True, True, 2, 2, 1),  # stretches shorter than the kernel
        (2, 9, 32, 1, True, True, 4, 1, 2),  # one tap
        (2, 3, 64, 6, False, True, 1, 2, 1),  # a width that is no power of two, longer than T
        (2, 40, 32, 5, True, True, 4, 3, 4),
        (2, 129, 32, 4, True, True, 8, 64, 1),  # the default stretches, cut to 17 tokens
    ],
)


@KERNEL_CASES
def test_kernel_matches_autodiff(rng, B, T, C, W, bias, segments, rows, seg_len, ahead):
    """Against autodiff, with documents (some one token long) and widths 1 to 6."""
    x, dy, kernel, b, seg = problem(rng, B, T, C, W, bias, segments)
    dx, dw, db = short_conv_backward(
        x, dy, kernel, b, seg, rows=rows, seg_len=seg_len, ahead=ahead, interpret=True
    )
    gx, gw, gb = autodiff(x, dy, kernel, b, seg)
    assert dx.shape == x.shape and dx.dtype == x.dtype and dw.shape == kernel.shape
    assert rel_err(dx, gx) < 1e-6 and rel_err(dw, gw) < 1e-6
    if bias:
        assert rel_err(db, gb) < 1e-6
    else:
        assert db is None


@KERNEL_CASES
def test_forward_kernel_matches_conv_silu(rng, B, T, C, W, bias, segments, rows, seg_len, ahead):
    """The forward kernel against ``conv_silu`` (fp32 and bf16 outputs)."""
    x, _, kernel, b, seg = problem(rng, B, T, C, W, bias, segments)
    for dtype in (jnp.float32, jnp.bfloat16):
        y = short_conv_forward(
            x, kernel, b, seg, dtype, rows=rows, seg_len=seg_len, ahead=ahead, interpret=True
        )
        want = conv_silu(x, kernel, b, seg, dtype)
        assert y.shape == x.shape and y.dtype == dtype
        assert rel_err(y.astype(jnp.float32), want.astype(jnp.float32)) < (
            1e-6 if dtype == jnp.float32 else 1e-3
        )


@pytest.mark.parametrize(
    "B, T, C, group, bias, segments, rows, seg_len",
    [
        (2, 50, 64, 32, True, True, 4, 8),  # two heads per row of channels
        (1, 37, 128, 128, False, False, 2, 16),
        (2, 21, 48, 16, True, True, 8, 3),
    ],
)
def test_kernels_with_l2norm(rng, B, T, C, group, bias, segments, rows, seg_len):
    """``norm_group``: the forward against ``conv_silu(..., norm_group)`` and the backward
    against its autodiff (the L2 norm over each group of channels after the SiLU)."""
    x, dy, kernel, b, seg = problem(rng, B, T, C, 4, bias, segments)
    tiles = dict(rows=rows, seg_len=seg_len, norm_group=group, interpret=True)
    y = short_conv_forward(x, kernel, b, seg, jnp.float32, **tiles)
    want = conv_silu(x, kernel, b, seg, jnp.float32, group)
    assert rel_err(y, want) < 1e-6
    norms = jnp.sum(want.reshape(B, T, C // group, group) ** 2, axis=-1)
    assert float(jnp.max(jnp.abs(norms - 1.0))) < 1e-4  # a real normalisation

    def f(x, kernel, b):
        return jnp.sum(conv_silu(x, kernel, b, seg, jnp.float32, group) * dy)

    gx, gw, gb = jax.grad(f, argnums=(0, 1, 2))(x, kernel, b)
    dx, dw, db = short_conv_backward(x, dy, kernel, b, seg, **tiles)
    assert rel_err(dx, gx) < 1e-5 and rel_err(dw, gw) < 1e-5
    if bias:
        assert rel_err(db, gb) < 1e-5
    with pytest.raises(ValueError, match="norm_group: expected a power of two >= 16 dividing"):
        short_conv_forward(x, kernel, b, seg, jnp.float32, norm_group=24, interpret=True)


def test_kernel_bf16_inputs(rng):
    """bf16 x, dy: the kernel's fp32 sums against fp32 autodiff of the same bf16 values."""
    x, dy, kernel, b, seg = problem(rng, 2, 70, 64, 4, True, True, jnp.bfloat16)
    dx, dw, db = short_conv_backward(x, dy, kernel, b, seg, interpret=True)
    gx, gw, gb = autodiff(x.astype(jnp.float32), dy, kernel, b, seg)
    assert dx.dtype == jnp.bfloat16
    assert rel_err(dx, gx) < 8e-3  # one bf16 rounding of dx
    assert rel_err(dw, gw) < 1e-5 and rel_err(db, gb) < 1e-5


def test_bad_arguments_are_named(rng):
    x, dy, kernel, b, seg = problem(rng, 1, 8, 24, 4, False, False)
    with pytest.raises(ValueError, match="channel count 24"):
        short_conv_backward(x, dy, kernel, b, seg, interpret=True)
    x, dy, kernel, b, seg = problem(rng, 1, 8, 32, 4, False, False)
    with pytest.raises(ValueError, match="dy: expected shape"):
        short_conv_backward(x, dy[:, :4], kernel, b, seg, interpret=True)
    bad = [
        (dict(rows=12), "rows: expected a power of two, got 12"),
        (dict(seg_len=0), "seg_len: expected a positive length, got 0"),
        (dict(ahead=0), "ahead: expected a positive count, got 0"),
    ]
    for kwargs, message in bad:
        with pytest.raises(ValueError, match=message):
            short_conv_backward(x, dy, kernel, b, seg, interpret=True, **kwargs)
        with pytest.raises(ValueError, match=message):
            short_conv_forward(x, kernel, b, seg, jnp.float32, interpret=True, **kwargs)
    with pytest.raises(ValueError, match=r"kernel: expected shape \[W, 32\]"):
        short_conv_forward(x, kernel[:, :16], b, seg, jnp.float32, interpret=True)
    assert channel_block(2048) == 128 and channel_block(96) == 32 and channel_block(40) is None


def make_conv(C, backward, use_bias=True, forward="xla"):
    return ShortConv(
        C,
        kernel_size=4,
        use_bias=use_bias,
        kernel_init=uniform(0.5),
        bias_init=uniform(0.5),
        forward=forward,
        backward=backward,
        rngs=nnx.Rngs(0),
    )


def module_grads(conv, x, seg, mask, cot):
    def loss(conv, x):
        return jnp.sum(conv(x, segment_ids=seg, mask=mask).astype(jnp.float32) * cot)

    return nnx.grad(loss, argnums=(0, 1))(conv, x)


@pytest.mark.parametrize(
    "forward, backward", [("xla", "pallas"), ("pallas", "xla"), ("pallas", "pallas")]
)
def test_module_kernels_equal_xla(rng, forward, backward):
    """``ShortConv`` with either or both kernels: the output and gradients (x, kernel, bias) of
    XLA's forward and autodiff, with documents and padding."""
    B, T, C = 2, 37, 64
    x = jnp.asarray(rng.normal(size=(B, T, C)), jnp.float32)
    seg = jnp.asarray(np.sort(rng.integers(0, 5, size=(B, T)), axis=1), jnp.int32)
    mask = jnp.asarray(rng.random((B, T)) > 0.2)
    cot = jnp.asarray(rng.normal(size=(B, T, C)), jnp.float32)
    ref, fast = make_conv(C, "xla"), make_conv(C, backward, forward=forward)
    y_ref, y_fast = (m(x, segment_ids=seg, mask=mask) for m in (ref, fast))
    if forward == "xla":
        np.testing.assert_array_equal(y_fast, y_ref)
    else:  # the kernel sums the taps in another order
        assert rel_err(y_fast, y_ref) < 1e-6
    (g_ref, gx_ref), (g_fast, gx_fast) = (module_grads(m, x, seg, mask, cot) for m in (ref, fast))
    assert rel_err(gx_fast, gx_ref) < 1e-6
    assert rel_err(g_fast.kernel[...], g_ref.kernel[...]) < 1e-6
    assert rel_err(g_fast.bias[...], g_ref.bias[...]) < 1e-6
    assert float(jnp.max(jnp.abs(jnp.where(mask[..., None], 0.0, gx_fast)))) == 0.0


def test_module_and_config_choices():
    conv = make_conv(64, "auto")
    assert conv.uses_kernel("auto") == (jax.default_backend() == "gpu")
    assert not conv.uses_kernel("xla")
    assert conv.uses_kernel("pallas")
    assert not make_conv(24, "auto").uses_kernel("auto")  # XLA for channel counts it can't tile
    with pytest.raises(ValueError, match="backward: expected one of"):
        make_conv(64, "triton")
    with pytest.raises(ValueError, match="forward: expected one of"):
        make_conv(64, "xla", forward="cuda")
    with pytest.raises(ValueError, match="backward='pallas': channels must have a power-of-two"):
        make_conv(24, "pallas")
    with pytest.raises(ValueError, match="forward='pallas': channels must have a power-of-two"):
        make_conv(24, "xla", forward="pallas")
    with pytest.raises(ValueError, match="conv_backward: expected one of"):
        DeltaProductConfig(conv_backward="fast")
    with pytest.raises(ValueError, match="conv_forward: expected one of"):
        DeltaProductConfig(conv_forward="fast")


@pytest.mark.parametrize(
    "use_bias, segments, forward",
    [(True, True, "pallas"), (False, False, "pallas"), (False, True, "xla")],
)
def test_kernels_under_shard_map(rng, use_bias, segments, forward):
    """Inside ``batch_parallel`` the kernels run per device on their rows (a ``shard_map``) and
    the kernel/bias gradients are summed over the shards."""
    if jax.device_count() < 8:
        pytest.skip("needs 8 (simulated) devices")
    mesh = mesh_lib.make_mesh(fsdp=2)
    B, T, C = 8, 20, 32
    x = jnp.asarray(rng.normal(size=(B, T, C)), jnp.float32)
    seg = None
    if segments:
        seg = jnp.asarray(np.sort(rng.integers(0, 4, size=(B, T)), axis=1), jnp.int32)
    cot = jnp.asarray(rng.normal(size=(B, T, C)), jnp.float32)
    conv, ref = make_conv(C, "pallas", use_bias, forward), make_conv(C, "xla", use_bias)
    graph, state = nnx.split(conv)

    def loss(state, x):
        return jnp.sum(nnx.merge(graph, state)(x, segment_ids=seg) * cot)

    with sharded.batch_parallel(mesh, mesh_lib.BATCH_AXES):
        step = jax.jit(jax.grad(loss, argnums=(0, 1)))
        assert "shard_map" in str(jax.make_jaxpr(step)(state, x))
        g_state, gx = step(state, x)
        y = jax.jit(lambda state, x: nnx.merge(graph, state)(x, segment_ids=seg))(state, x)
    assert rel_err(y, ref(x, segment_ids=seg)) < 1e-6
    g_ref, gx_ref = module_grads(ref, x, seg, None, cot)
    assert rel_err(gx, gx_ref) < 1e-6
    assert rel_err(g_state["kernel"][...], g_ref.kernel[...]) < 1e-6
    if use_bias:
        assert rel_err(g_state["bias"][...], g_ref.bias[...]) < 1e-6


@pytest.mark.parametrize("forward", [False, True])
@pytest.mark.parametrize(
    "bias, segments, tiles",
    [(False, True, dict()), (True, False, dict(rows=16, ahead=3, num_warps=8))],
)
def test_kernel_lowers_for_h100(forward, bias, segments, tiles):
    T, C = 4096, 2048

    def run(x, dy, w, b, s):
        if forward:
            return short_conv_forward(x, w, b, s, jnp.bfloat16, interpret=False, **tiles)
        return short_conv_backward(x, dy, w, b, s, interpret=False, **tiles)

    text = lower_text(
        run,
        sds((2, T, C)),
        sds((2, T, C)),
        sds((4, C), jnp.float32),
        sds((C,), jnp.float32) if bias else None,
        sds((2, T), jnp.int32) if segments else None,
    )
    assert text.count(TRITON_CALL) == 1


@pytest.mark.gpu
@pytest.mark.parametrize(
    "B, T, C, bias, tiles",
    [
        (8, 4096, 2048, False, dict()),
        (8, 4096, 2048, True, dict(rows=16, ahead=3, num_warps=8)),
        (2, 1000, 96, True, dict(rows=4, seg_len=100, ahead=2)),
    ],
)
def test_gpu_kernel_matches_autodiff(rng, B, T, C, bias, tiles):
    x, dy, kernel, b, seg = problem(rng, B, T, C, 4, bias, True, jnp.bfloat16)
    run = jax.jit(lambda *a: short_conv_backward(*a, interpret=False, **tiles))
    dx, dw, db = run(x, dy, kernel, b, seg)
    gx, gw, gb = jax.jit(autodiff)(x.astype(jnp.float32), dy, kernel, b, seg)
    assert rel_err(dx, gx) < 8e-3
    assert rel_err(dw, gw) < 1e-4
    if bias:
        assert rel_err(db, gb) < 1e-4
    y = jax.jit(lambda *a: short_conv_forward(*a, jnp.bfloat16, interpret=False, **tiles))(
        x, kernel, b, seg
    )
    want = jax.jit(lambda *a: conv_silu(*a, jnp.float32))(x, kernel, b, seg)
    assert rel_err(y.astype(jnp.float32), want) < 8e-3  # one bf16 rounding of y


@pytest.mark.gpu
def test_gpu_kernels_with_l2norm(rng):
    """``norm_group=128`` (the mixer's q and k heads) at the 392M models' shape, bf16."""
    x, dy, kernel, _, seg = problem(rng, 8, 4096, 2048, 4, False, True, jnp.bfloat16)
    tiles = dict(norm_group=128, interpret=False)
    y = jax.jit(lambda *a: short_conv_forward(*a, jnp.bfloat16, **tiles))(x, kernel, None, seg)
    want = jax.jit(lambda *a: conv_silu(*a, jnp.float32, 128))(x, kernel, None, seg)
    assert rel_err(y.astype(jnp.float32), want) < 8e-3

    def f(x, kernel):
        return jnp.sum(conv_silu(x, kernel, None, seg, jnp.float32, 128) * dy.astype(jnp.float32))

    gx, gw = jax.jit(jax.grad(f, argnums=(0, 1)))(x.astype(jnp.float32), kernel)
    dx, dw, _ = jax.jit(lambda *a: short_conv_backward(*a, **tiles))(x, dy, kernel, None, seg)
    assert rel_err(dx, gx) < 8e-3 and rel_err(dw, gw) < 1e-4


def test_bench_conv_runs(tmp_path):
    """experiments/bench_conv.py end to end at a tiny shape (interpret mode on CPU)."""
    exp = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "experiments")
    if exp not in sys.path:
        sys.path.insert(0, exp)
    import bench_conv

    records = bench_conv.main(
        ["--case", "2,40,32", "--repeats", "1", "--iters", "1", "--out", str(tmp_path)]
    )
    assert {r["variant"] for r in records} >= {
        "xla autodiff (fwd+bwd)",
        "pallas backward (fwd+bwd)",
        "xla forward",
        "pallas forward",
    }
    assert all(np.isfinite(r["ms"]) and r["ms"] > 0 for r in records)
    assert (tmp_path / "bench_conv.md").exists()
