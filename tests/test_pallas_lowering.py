"""Deviceless Triton lowering of every kernel stage for an H100 (no GPU needed; JAX_NOTES §1.4).

Tracing and lowering under an abstract CUDA device runs the Pallas -> Triton lowering itself, so
constructs the Triton backend cannot express (value slicing, non-power-of-2 shapes, batched dots,
unsupported precisions) fail here, on CPU CI. Triton -> PTX errors still need a GPU.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest
from jax.sharding import AbstractDevice, AbstractMesh, AxisType

from pallas_kernels import common
from pallas_kernels import forward as kernels
from pallas_kernels.output import output
from pallas_kernels.prepare import prepare
from pallas_kernels.state_pass import state_pass

TRITON_CALL = "__gpu$xla.gpu.triton"
B, T, H = 2, 256, 4


@pytest.fixture(autouse=True)
def no_automatic_split(monkeypatch):
    """These small shapes (``B * H = 8``) would get the automatic sequence split
    (``common.auto_split``); the launch counts below are those of the unsplit passes, and the
    split passes are lowered by the tests that ask for them (``state_split`` > 1)."""
    monkeypatch.setattr(common, "SPLIT_FREE_PROGRAMS", 0)


def lower_text(fn, *args) -> str:
    device = AbstractDevice("NVIDIA H100 80GB HBM3", 1, "cuda")
    mesh = AbstractMesh((1,), ("x",), (AxisType.Explicit,), abstract_device=device)
    with jax.sharding.use_abstract_mesh(mesh):
        return jax.jit(fn).trace(*args).lower().as_text()


def sds(shape, dtype=jnp.bfloat16):
    return jax.ShapeDtypeStruct(shape, dtype)


def forward_args(
    n, K, V, *, tokens=T, dtype=jnp.bfloat16, gated=False, h0=False, resets=False, lead=()
):
    """Abstract ``kernels.forward`` inputs ``(q, k, v, beta, g, h0, resets)``; ``lead``: extra
    leading (vmapped) axes."""
    L = tokens * n
    return (
        sds((*lead, B, tokens, H, K), dtype),
        sds((*lead, B, L, H, K), dtype),
        sds((*lead, B, L, H, V), dtype),
        sds((*lead, B, L, H), dtype),
        sds((*lead, B, tokens, H), jnp.float32) if gated else None,
        sds((*lead, B, H, K, V), jnp.float32) if h0 else None,
        sds((*lead, B, tokens), jnp.bool_) if resets else None,
    )


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16, jnp.float32])
@pytest.mark.parametrize("decay", [False, True])
@pytest.mark.parametrize("n", [1, 2, 3])
def test_each_stage_lowers(n, decay, dtype):
    K = V = 128
    L = T * n
    gate = sds((B, H, L), jnp.float32) if decay else None
    text = lower_text(
        lambda k, b, g: prepare(k, b, g, interpret=False),
        sds((B, L, H, K), dtype),
        sds((B, L, H), dtype),
        gate,
    )
    assert text.count(TRITON_CALL) == 1

    vec = sds((B, H, L), jnp.float32) if decay else None
    text = lower_text(
        lambda a, k, v, b, gam, fdec, h0: state_pass(
            a, k, v, b, gam, fdec, h0, num_householder=n, interpret=False, tf32_state=decay
        ),
        sds((B, H, L, 64), jnp.float32),
        sds((B, L, H, K), dtype),
        sds((B, L, H, V), dtype),
        sds((B, L, H), dtype),
        vec,
        vec,
        sds((B, H, K, V), jnp.float32),
    )
    assert text.count(TRITON_CALL) == 1

    text = lower_text(
        lambda q, k, vn, h, g: output(
            q, k, vn, h, g, num_householder=n, scale=0.1, interpret=False
        ),
        sds((B, T, H, K), dtype),
        sds((B, L, H, K), dtype),
        sds((B, H, L, V), dtype),
        sds((B, H, T // 64, K, V), dtype),
        sds((B, H, T), jnp.float32) if decay else None,
    )
    assert text.count(TRITON_CALL) == 1


@pytest.mark.parametrize("n", [1, 2, 3, 4])
@pytest.mark.parametrize("gated", [False, True])
def test_forward_lowers(n, gated):
    """The composed forward at a realistic shape, with state, resets and poisoned buffers."""
    K = V = 128
    args = forward_args(n, K, V, gated=gated, h0=True, resets=True)
    text = lower_text(
        lambda *a: kernels.forward(
            *a, num_householder=n, scale=K**-0.5, interpret=False, poison=True
        )[:2],
        *args,
    )
    assert text.count(TRITON_CALL) == 3


@pytest.mark.parametrize("K,V", [(20, 36), (64, 64), (256, 256), (100, 60)])
def test_forward_lowers_other_head_dims(K, V):
    n = 2
    args = forward_args(n, K, V, tokens=100, gated=True)
    text = lower_text(
        lambda *a: kernels.forward(*a, num_householder=n, scale=0.1, interpret=False)[:2], *args
    )
    assert text.count(TRITON_CALL) == 3


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(blocked=False),
        dict(unroll=1, num_warps=8),
        dict(unroll=5, precision="split3"),
        dict(precision="tf32", num_warps=2),
    ],
)
def test_prepare_variants_lower(kwargs):
    L = T * 2
    text = lower_text(
        lambda k, b, g: prepare(k, b, g, interpret=False, **kwargs),
        sds((B, L, H, 64)),
        sds((B, L, H)),
        sds((B, H, L), jnp.float32),
    )
    assert text.count(TRITON_CALL) == 1


@pytest.mark.parametrize(
    "config",
    [
        kernels.KernelConfig(state_block_v=16, out_block_v=32),
        kernels.KernelConfig(state_block_v=64, out_block_v=128, out_warps=8, prep_warps=8),
        kernels.KernelConfig(prep_blocked=False),
        kernels.KernelConfig(prep_precision="split3", prep_unroll=1),
        kernels.KernelConfig(prep_precision="tf32", prep_unroll=5, prep_warps=2),
        kernels.KernelConfig(state_stored_wu=True),
        kernels.KernelConfig(state_loop="sub"),
    ],
)
def test_forward_lowers_other_tiles(config):
    n, K, V = 2, 128, 128
    args = forward_args(n, K, V)
    text = lower_text(
        lambda *a: kernels.forward(
            *a, num_householder=n, scale=0.1, interpret=False, config=config
        )[:2],
        *args,
    )
    assert text.count(TRITON_CALL) == 3


@pytest.mark.parametrize("n,gated", [(1, False), (2, True), (3, True)])
def test_sequence_split_forward_lowers(n, gated):
    """``state_split``: the transfer launch (value + identity tiles) and the piecewise pass."""
    K, V = 128, 64
    args = forward_args(n, K, V, gated=gated, h0=True, resets=True)
    config = kernels.KernelConfig(state_split=4)
    text = lower_text(
        lambda *a: kernels.forward(
            *a, num_householder=n, scale=0.1, interpret=False, config=config, save_states=True
        )[:2],
        *args,
    )
    assert text.count(TRITON_CALL) == 4


def test_default_config_splits_few_programs(monkeypatch):
    """The default configs on ``B * H = 8`` heads: the automatic split's transfer launch in the
    forward and the backward state passes (4 forward launches, the backward's with the reverse
    pass's transfer launch)."""
    from pallas_kernels import backward as kernel_backward

    monkeypatch.setattr(common, "SPLIT_FREE_PROGRAMS", 96)
    n, K, V = 2, 128, 128
    args = forward_args(n, K, V, gated=True, h0=True)

    def fwd_bwd(*a):
        o, final, res = kernels.forward(
            *a, num_householder=n, scale=0.1, interpret=False, save_states=True
        )
        return kernel_backward.backward(
            *a[:4], res, o, final, num_householder=n, scale=0.1, interpret=False
        )

    split = kernel_backward.BackwardConfig(state_split=2)  # any split: its transfer launch
    assert_backward_kernels(lower_text(fwd_bwd, *args), backward_kernels(split), 4)


def test_vmapped_forward_lowers():
    n, K, V = 2, 64, 64
    args = forward_args(n, K, V, gated=True, lead=(3,))[:5]
    f = lambda q, k, v, b, g: kernels.forward(
        q, k, v, b, g, None, None, num_householder=n, scale=0.1, interpret=False
    )[:2]
    assert lower_text(jax.vmap(f), *args).count(TRITON_CALL) == 3


def backward_kernels(config=None, K=128, V=128, *, n=2, save_states=True) -> list[str]:
    """The kernels ``backward.backward`` launches for ``config`` (None: ``config_for(K, V)``) at
    ``n_h = n`` in their order: the recompute stage without saved states, ``dv_out`` unless the
    reverse pass or the output adjoint forms it, the output adjoint unless merged with the
    state adjoint, the reverse pass (and its transfer launch when split), then the state and WY
    adjoints as one fused kernel, as the merged chunk adjoint + WY, or as two kernels; with
    ``chunk_grads`` the output, state and WY adjoints as one kernel."""
    from pallas_kernels import backward as kernel_backward

    config = config or kernel_backward.config_for(K, V)
    Kp = kernels.padded_dims(K, V)[0]
    grads_kernel = config.runs_chunk_grads(K, V, n)
    merged = config.merges_adjoints(K, V, n)
    names = []
    if not save_states:
        names.append("dp_bwd_recompute")
    elif not config.state_fused_dv_out and not (config.output_dv and Kp <= config.output_block_k):
        names.append("dp_bwd_dv_out")
    if not (merged or grads_kernel):
        names.append("dp_bwd_output")
    if config.state_split > 1:
        names.append("dp_bwd_state_transfer")
    names.append("dp_bwd_state_pass")
    if grads_kernel:
        names.append("dp_bwd_chunk_grads")
    elif config.wy_fused:
        names.append("dp_bwd_wy_fused")
    else:
        names += ["dp_bwd_chunk_adjoint" if merged else "dp_bwd_state_adjoint", "dp_bwd_wy"]
    return names


def assert_backward_kernels(text: str, names: list[str], forward_launches: int = 3) -> None:
    """``text`` (lowered forward + backward) launches exactly ``names`` after the forward's."""
    assert text.count(TRITON_CALL) == forward_launches + len(names), names
    for name in names:
        assert f'"{name}"' in text, name


def lower_forward_backward(n, args, config=None, *, save_states=True) -> str:
    """Lowered text of the kernel forward (keeping its states unless told otherwise, as the
    custom_vjp does) followed by the kernel backward. ``args``: ``forward_args(...)``; without
    ``h0``/``resets`` when given only the first five."""
    from pallas_kernels import backward as kernel_backward

    def fwd_bwd(q, k, v, beta, g, h0=None, resets=None):
        reads_mid = (
            config or kernel_backward.config_for(q.shape[-1], v.shape[-1])
        ).reads_mid_states
        o, final, res = kernels.forward(
            q,
            k,
            v,
            beta,
            g,
            h0,
            resets,
            num_householder=n,
            scale=0.1,
            interpret=False,
            save_states=save_states,
            save_mid_states=reads_mid(q.shape[-1], v.shape[-1], n),
            save_w=config is not None and config.state_stored_w,
        )
        final_cotangent = final if h0 is not None or resets is not None else None
        return kernel_backward.backward(
            q,
            k,
            v,
            beta,
            res,
            o,
            final_cotangent,
            num_householder=n,
            scale=0.1,
            interpret=False,
            config=config,
        )

    return lower_text(fwd_bwd, *args)


@pytest.mark.parametrize("n", [1, 2, 3, 4])
@pytest.mark.parametrize("gated", [False, True])
def test_backward_lowers(n, gated):
    """Forward + every backward kernel (dv_out, output adjoint, reverse state pass, state
    adjoint, WY adjoint) at a realistic shape, with initial state, resets and a final-state
    cotangent."""
    text = lower_forward_backward(n, forward_args(n, 128, 128, gated=gated, h0=True, resets=True))
    assert_backward_kernels(text, backward_kernels(n=n))
    assert "dp_bwd_recompute" not in text


@pytest.mark.parametrize(
    "n,fields",
    [
        (2, dict(merged_mid_states=True)),
        (3, dict(merged_mid_states=False)),
        (4, dict(merged_mid_states=False)),
        (3, dict(merged_loop=True)),
        (4, dict(merged_loop=True, merged_warps=8)),
    ],
)
def test_merged_adjoint_variants_lower(n, fields):
    """The merged adjoint on the forward's ``h_mid`` or forming its terms (``merged_mid_states``;
    the default forms them at n_h = 2 only), or walking the sub-chunks in a loop, gated, with
    initial states and resets."""
    from pallas_kernels import backward as kernel_backward

    config = kernel_backward.BackwardConfig(**fields)
    assert config.reads_mid_states(128, 128, n) == fields.get("merged_mid_states", n > 2)
    args = forward_args(n, 128, 128, gated=True, h0=True, resets=True)
    text = lower_forward_backward(n, args, config)
    assert_backward_kernels(text, backward_kernels(config, n=n))


@pytest.mark.parametrize("n", [1, 2])
def test_automatic_chunk_grads_lowers(n):
    """The default ``chunk_grads=None``: the per-chunk gradient kernel at n_h = 1, the merged
    adjoint + WY adjoint above."""
    from pallas_kernels import backward as kernel_backward

    config = kernel_backward.BackwardConfig()
    text = lower_forward_backward(n, forward_args(n, 128, 128, gated=True), config)
    assert_backward_kernels(text, backward_kernels(config, n=n))
    assert ('"dp_bwd_chunk_grads"' in text) == (n == 1)


@pytest.mark.parametrize("n", [1, 2])
def test_sequence_split_backward_lowers(n):
    """``state_split`` in the backward: the reverse pass's transfer launch and piecewise pass."""
    from pallas_kernels import backward as kernel_backward

    args = forward_args(n, 128, 64, gated=True, h0=True, resets=True)
    config = kernel_backward.BackwardConfig(state_split=4, state_read_masked=n > 1)
    text = lower_forward_backward(n, args, config)
    assert_backward_kernels(text, backward_kernels(config, n=n))
    assert "dp_bwd_state_transfer" in text


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("n", [1, 3])
def test_backward_lowers_recomputing_states(n, fused):
    """Residuals without saved states (the recompute stage runs first; no dv_out kernel), and the
    previous fused stage 3 + 4 kernel."""
    from pallas_kernels import backward as kernel_backward

    args = forward_args(n, 128, 128, gated=True, h0=True, resets=True)
    config = kernel_backward.BackwardConfig(wy_fused=fused)
    text = lower_forward_backward(n, args, config, save_states=False)
    assert_backward_kernels(text, backward_kernels(config, n=n, save_states=False))
    assert "dp_bwd_recompute" in text and "dp_bwd_dv_out" not in text
    assert ("dp_bwd_wy_fused" in text) == fused


@pytest.mark.parametrize(
    "fields",
    [
        dict(output_dv=True),
        dict(wy_warps=8, wy_block=128),
        dict(wy_dots="split"),
        dict(wy_dots="input"),
        dict(state_block_v=16, state_stages=2, adjoint_warps=4, dv_block_v=128),
        dict(grad_dtype="input"),
        dict(grad_dtype="input", wy_dots="split", wy_fused=True),
        dict(state_loop="token"),
        dict(state_read_masked=False),
        dict(state_dots="input"),
        dict(state_dots="tf32", state_dv_out_dots="input"),
        dict(state_dots="tf32", state_stored_w=True),
        dict(wy_chunks=4, wy_stages=2),
        dict(wy_chunks=2, wy_dots="tf32", grad_dtype="float32"),
        dict(state_stored_w=True, state_split=2),
        dict(state_fused_dv_out=True),
        dict(state_fused_dv_out=True, state_split=2, state_read_masked=False),
        dict(state_fused_dv_out=True, state_loop="token"),
        dict(merged_adjoint=True),
        dict(merged_adjoint=True, state_fused_dv_out=True, grad_dtype="float32"),
        dict(merged_adjoint=True, merged_warps=8, merged_stages=2),
        dict(chunk_grads=True, grad_dtype="float32", wy_dots="tf32"),
        dict(chunk_grads=True, chunk_grads_warps=4, chunk_grads_stages=2, state_split=2),
    ],
)
def test_backward_lowers_other_configs(fields):
    from pallas_kernels import backward as kernel_backward

    args = forward_args(2, 128, 128, gated=True, h0=True, resets=True)
    text = lower_forward_backward(2, args, kernel_backward.BackwardConfig(**fields))
    assert_backward_kernels(text, backward_kernels(kernel_backward.BackwardConfig(**fields)))


# the per-chunk kernels' own kernels: which separate kernels each one replaces
PER_CHUNK_KERNELS = {
    "merged_adjoint": ("dp_bwd_output", "dp_bwd_state_adjoint"),
    "chunk_grads": ("dp_bwd_output", "dp_bwd_chunk_adjoint", "dp_bwd_state_adjoint", "dp_bwd_wy"),
}


@pytest.mark.parametrize("field", sorted(PER_CHUNK_KERNELS))
@pytest.mark.parametrize(
    "n,K,V,dtype,save_states",
    [
        (1, 128, 128, jnp.bfloat16, True),
        (2, 128, 128, jnp.bfloat16, True),
        (3, 128, 128, jnp.bfloat16, True),
        (4, 64, 64, jnp.bfloat16, False),
        (2, 100, 60, jnp.float32, True),
        (3, 20, 36, jnp.float16, True),
    ],
)
def test_per_chunk_kernels_lower(field, n, K, V, dtype, save_states):
    """The output and state adjoints as one kernel (``merged_adjoint``), and with the WY adjoint
    too (``chunk_grads``), for every n_h, head dims up to 128, 16- and 32-bit inputs, gated, and
    with the states recomputed: the kernels they replace are not launched."""
    from pallas_kernels import backward as kernel_backward

    config = kernel_backward.BackwardConfig(**{field: True}, save_states=save_states)
    args = forward_args(n, K, V, tokens=200, dtype=dtype, gated=True, h0=True, resets=True)
    text = lower_forward_backward(n, args, config, save_states=save_states)
    assert_backward_kernels(text, backward_kernels(config, K, V, n=n, save_states=save_states))
    for name in PER_CHUNK_KERNELS[field]:
        assert f'"{name}"' not in text, name


@pytest.mark.parametrize("K,V", [(20, 36), (64, 64), (100, 60)])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float16])
def test_backward_lowers_other_head_dims_and_dtypes(K, V, dtype):
    args = forward_args(3, K, V, tokens=100, dtype=dtype, gated=True)[:5]
    assert_backward_kernels(lower_forward_backward(3, args), backward_kernels(K=K, V=V, n=3))


@pytest.mark.parametrize(
    "K,V,n,gated",
    [(256, 256, 2, True), (256, 128, 1, False), (100, 200, 3, True), (64, 256, 2, False)],
)
def test_backward_lowers_wide_heads(K, V, n, gated):
    """Head dims above 128 with the wide-head tiles of ``backward.config_for`` (key-tile grid axis
    of the output adjoint, tiled state adjoint, reverse state pass at 8 warps): every backward
    kernel lowers, none is replaced by the fallback."""
    text = lower_forward_backward(
        n, forward_args(n, K, V, tokens=128, gated=gated, h0=True, resets=True)
    )
    assert_backward_kernels(text, backward_kernels(K=K, V=V, n=n))


@pytest.mark.parametrize(
    "fields",
    [
        dict(),  # the 128 defaults: 128-wide tiles at 256
        dict(output_dv=True, state_fused_dv_out=False),  # key tiles: dv_out stays its own kernel
        dict(save_states=False, adjoint_block_k=32, output_block_k=32, output_block_v=32),
        dict(adjoint_block_k=64, grad_dtype="input"),  # 16-bit dk, dW, dkp
    ],
    ids=["defaults", "output_dv", "recompute_small_tiles", "grad_dtype_input"],
)
def test_backward_lowers_wide_heads_other_configs(fields):
    from pallas_kernels import backward as kernel_backward

    config = kernel_backward.BackwardConfig(**fields)
    args = forward_args(2, 256, 256, tokens=128, gated=True, h0=True, resets=True)
    text = lower_forward_backward(2, args, config, save_states=config.save_states)
    names = backward_kernels(config, 256, 256, save_states=config.save_states)
    assert_backward_kernels(text, names)
    assert ("dp_bwd_dv_out" in names) == (fields.get("state_fused_dv_out") is False)
