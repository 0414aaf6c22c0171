"""The RMSNorm Pallas kernels (``pallas_kernels.rms_norm``) and ``dpjax.nn.norms``'s kernel path:
forward and gradients against XLA's autodiff of the fp32 formula in interpret mode, per device
under ``shard_map``, lowered for an H100, and on a real GPU (marker ``gpu``)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from oracle import rel_rmse
from test_pallas_lowering import TRITON_CALL, lower_text, sds

from dpjax.nn.config import DeltaProductConfig
from dpjax.nn.norms import GatedRMSNorm, RMSNorm, rms_norm
from dpjax.ops import sharded
from dpjax.train import mesh as mesh_lib
from pallas_kernels.rms_norm import rms_norm_backward, rms_norm_forward, tiles

EPS = 1e-6


def rel_err(got, want) -> float:
    """``oracle.rel_rmse(want, got)``, after checking ``got`` is finite."""
    assert np.isfinite(np.asarray(got, np.float64)).all()
    return rel_rmse(want, got)


def problem(rng, shape, gated, dtype=jnp.float32):
    """``x, weight, gate (or None), dy`` of ``shape`` (weight ``[shape[-1]]`` fp32)."""
    x = jnp.asarray(rng.normal(size=shape) * 3.0, dtype)
    weight = jnp.asarray(1.0 + 0.3 * rng.normal(size=shape[-1:]), jnp.float32)
    gate = jnp.asarray(rng.normal(size=shape) * 2.0, dtype) if gated else None
    dy = jnp.asarray(rng.normal(size=shape), dtype)
    return x, weight, gate, dy


def formula(x, weight, gate):
    """The fp32 norm written out (XLA's path of ``dpjax.nn.norms.rms_norm``)."""
    return rms_norm(x, weight, gate, eps=EPS, out_dtype=jnp.float32, impl="xla")


def autodiff(x, weight, gate, dy):
    args = (x, weight) if gate is None else (x, weight, gate)
    y, vjp = jax.vjp(lambda *a: formula(a[0], a[1], a[2] if len(a) > 2 else None), *args)
    grads = vjp(dy.astype(jnp.float32))
    return y, grads[0], grads[1], grads[2] if gate is not None else None


@pytest.mark.parametrize(
    "shape, gated, block_rows, row_steps",
    [
        ((2, 7, 64), False, None, None),  # rows not a multiple of the tile
        ((3, 5, 20), True, 2, None),  # D not a power of two, several programs
        ((3, 5, 20), True, 2, 3),  # programs walk 3 row blocks, the last past the end
        ((2, 9, 3, 128), True, None, 2),  # the mixer's per-head gated norm
        ((4, 1468), False, 1, None),  # the dp2-805m width, one row per program
        ((1, 3, 2048), True, 4, None),
    ],
)
def test_kernels_match_autodiff(rng, shape, gated, block_rows, row_steps):
    x, weight, gate, dy = problem(rng, shape, gated)
    kw = dict(block_rows=block_rows, interpret=True)
    y, r = rms_norm_forward(x, weight, gate, eps=EPS, out_dtype=jnp.float32, **kw)
    dx, dgate, dweight = rms_norm_backward(x, weight, gate, r, dy, row_steps=row_steps, **kw)
    y_ref, dx_ref, dw_ref, dg_ref = autodiff(x, weight, gate, dy)
    assert y.shape == x.shape and r.shape == x.shape[:-1] and r.dtype == jnp.float32
    assert rel_err(y, y_ref) < 1e-6
    assert rel_err(dx, dx_ref) < 1e-5
    assert rel_err(dweight, dw_ref) < 1e-5
    if gated:
        assert rel_err(dgate, dg_ref) < 1e-5
    else:
        assert dgate is None


def test_kernel_output_dtypes_and_bad_input(rng):
    x, weight, gate, dy = problem(rng, (2, 6, 32), True, jnp.bfloat16)
    y, r = rms_norm_forward(x, weight, gate, eps=EPS, out_dtype=jnp.bfloat16, interpret=True)
    dx, dgate, dweight = rms_norm_backward(x, weight, gate, r, dy, interpret=True)
    assert (y.dtype, dx.dtype, dgate.dtype, dweight.dtype) == (
        jnp.bfloat16,
        jnp.bfloat16,
        jnp.bfloat16,
        jnp.float32,
    )
    y_ref = formula(x, weight, gate)
    assert rel_err(y.astype(jnp.float32), y_ref) < 8e-3
    with pytest.raises(ValueError, match=r"weight: expected shape \(32,\), got \(31,\)"):
        rms_norm_forward(x, weight[:31], eps=EPS, out_dtype=jnp.float32, interpret=True)
    with pytest.raises(ValueError, match="gate: expected the shape of x"):
        rms_norm_forward(x, weight, gate[:1], eps=EPS, out_dtype=jnp.float32, interpret=True)
    with pytest.raises(ValueError, match="block_rows: expected a power of two, got 3"):
        tiles(10, 32, 3)
    with pytest.raises(ValueError, match="row_steps: expected >= 1, got 0"):
        rms_norm_backward(x, weight, gate, r, dy, row_steps=0, interpret=True)
    assert tiles(10_000, 1468) == (2, 2048, 8) and tiles(3, 128) == (4, 128, 4)


@pytest.mark.parametrize("gated", [False, True])
def test_modules_with_kernels_equal_xla(rng, gated):
    """``RMSNorm`` / ``GatedRMSNorm`` with ``impl="pallas"``: the output and the gradients of
    x, gate and the weight equal XLA's path; the config validates ``norm_impl``."""
    shape = (2, 11, 4, 32) if gated else (3, 13, 48)
    x, _, gate, dy = problem(rng, shape, gated)
    cls = GatedRMSNorm if gated else RMSNorm

    def grads(impl):
        module = cls(shape[-1], eps=EPS, impl=impl, rngs=nnx.Rngs(0))
        module.weight[...] = jnp.asarray(1.0 + 0.2 * rng.normal(size=shape[-1:]), jnp.float32)
        graph, state = nnx.split(module)

        def loss(state, x, gate):
            out = nnx.merge(graph, state)(x, gate) if gated else nnx.merge(graph, state)(x)
            return jnp.sum(out * dy), out

        (_, out), g = jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(state, x, gate)
        return out, g

    rng_state = rng.bit_generator.state
    out_ref, (gs_ref, gx_ref, gg_ref) = grads("xla")
    rng.bit_generator.state = rng_state  # the same weights
    out, (gs, gx, gg) = grads("pallas")
    assert rel_err(out, out_ref) < 1e-6
    assert rel_err(gx, gx_ref) < 1e-5
    assert rel_err(gs["weight"][...], gs_ref["weight"][...]) < 1e-5
    if gated:
        assert rel_err(gg, gg_ref) < 1e-5
    with pytest.raises(ValueError, match="impl: expected one of"):
        RMSNorm(8, impl="triton", rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="norm_impl: expected one of"):
        DeltaProductConfig(norm_impl="fast")


def test_kernels_under_shard_map(rng):
    """Inside ``batch_parallel`` the kernels run per device on their rows and the weight
    gradient is summed over the shards."""
    if jax.device_count() < 8:
        pytest.skip("needs 8 (simulated) devices")
    mesh = mesh_lib.make_mesh(fsdp=2)
    x, weight, gate, dy = problem(rng, (8, 6, 2, 32), True)

    def loss(x, weight, gate):
        y = rms_norm(x, weight, gate, eps=EPS, out_dtype=jnp.float32, impl="pallas")
        return jnp.sum(y * dy)

    with sharded.batch_parallel(mesh, mesh_lib.BATCH_AXES):
        step = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
        assert "shard_map" in str(jax.make_jaxpr(step)(x, weight, gate))
        gx, gw, gg = step(x, weight, gate)
    _, gx_ref, gw_ref, gg_ref = autodiff(x, weight, gate, dy)
    assert rel_err(gx, gx_ref) < 1e-5
    assert rel_err(gw, gw_ref) < 1e-5
    assert rel_err(gg, gg_ref) < 1e-5


@pytest.mark.parametrize(
    "shape, gated", [((8, 4096, 1024), False), ((8, 4096, 8, 128), True), ((2, 4096, 1468), False)]
)
def test_kernels_lower_for_h100(shape, gated):
    x, w = sds(shape), sds(shape[-1:], jnp.float32)
    z = sds(shape) if gated else None
    fwd = lower_text(
        lambda x, w, z: rms_norm_forward(x, w, z, eps=EPS, out_dtype=jnp.bfloat16), x, w, z
    )
    bwd = lower_text(
        lambda x, w, z, r, dy: rms_norm_backward(x, w, z, r, dy),
        x,
        w,
        z,
        sds(shape[:-1], jnp.float32),
        x,
    )
    assert fwd.count(TRITON_CALL) == 1 and bwd.count(TRITON_CALL) == 1


@pytest.mark.gpu
@pytest.mark.parametrize(
    "shape, gated", [((8, 4096, 1024), False), ((8, 4096, 8, 128), True), ((8, 4096, 1468), False)]
)
def test_gpu_kernels_match_autodiff(rng, shape, gated):
    """The 392M models' norms (and the dp2-805m width) in bf16 on the GPU, against the fp32
    formula's autodiff of the same bf16 inputs."""
    x, weight, gate, dy = problem(rng, shape, gated, jnp.bfloat16)
    y, r = jax.jit(
        lambda *a: rms_norm_forward(*a, eps=EPS, out_dtype=jnp.bfloat16, interpret=False)
    )(x, weight, gate)
    dx, dgate, dweight = jax.jit(lambda *a: rms_norm_backward(*a, interpret=False))(
        x, weight, gate, r, dy
    )
    y_ref, dx_ref, dw_ref, dg_ref = jax.jit(autodiff)(x, weight, gate, dy)
    assert rel_err(y.astype(jnp.float32), y_ref) < 8e-3
    assert rel_err(dx.astype(jnp.float32), dx_ref) < 8e-3
    assert rel_err(dweight, dw_ref) < 1e-4
    if gated:
        assert rel_err(dgate.astype(jnp.float32), dg_ref) < 8e-3
