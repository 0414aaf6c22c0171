"""Pallas backward kernels: gradients (interpret mode on CPU) against the chunked path's
hand-written backward and the reference's autodiff, each kernel stage against its plain-JAX twin
in ``dpjax.ops.chunked_backward``, and (marker ``gpu``) the compiled kernels at real sizes.

Every check draws fresh random inputs (unit-norm keys, beta in (0, 2), log gates <= 0) and random
cotangents for both outputs (o and the final state).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import random_problem, random_segments, starts_from_segments
from oracle import rel_rmse

import dpjax
import dpjax.ops
from dpjax.ops import chunked, chunked_backward, reference
from dpjax.ops import pallas as dp_pallas
from dpjax.ops.chunked_forward import CHUNK, group_by_token_chunk
from pallas_kernels import backward as kernel_backward
from pallas_kernels import forward as kernels
from pallas_kernels.backward_state_pass import launch_plan
from pallas_kernels.common import DotMode, split_pieces, through_product

NAMES = ("dq", "dk", "dv", "dbeta", "dg", "dh0")
FP32_TOL = 1e-4
LOW_TOL = {"dq": 8e-3, "dk": 8e-3, "dv": 8e-3, "dh0": 8e-3, "dbeta": 2e-2, "dg": 2e-2}


def random_resets(rng, B: int, T: int, first: bool = False) -> np.ndarray:
    resets = starts_from_segments(random_segments(rng, B, T))
    resets[:, 0] = first
    return resets


def inputs(p, dtype):
    args = [jnp.asarray(p[x], dtype) for x in ("q", "k", "v", "beta")]
    g = None if p["g"] is None else jnp.asarray(p["g"], jnp.float32)
    h0 = None if p["initial_state"] is None else jnp.asarray(p["initial_state"], jnp.float32)
    return [*args, g, h0]


def grads(impl, args, resets, cot_o, cot_s, n, scale, jit=False):
    """Gradients of ``<o, cot_o> + <final, cot_s>`` w.r.t. every differentiable input given."""
    argnums = tuple(i for i, a in enumerate(args) if a is not None)

    def loss(*a):
        o, final = impl(*a, resets, num_householder=n, scale=scale)
        return jnp.sum(o.astype(jnp.float32) * cot_o) + jnp.sum(final * cot_s)

    grad = jax.grad(loss, argnums)
    got = (jax.jit(grad) if jit else grad)(*args)
    return {NAMES[i]: np.asarray(x.astype(jnp.float32)) for i, x in zip(argnums, got, strict=True)}


def use_backward_config(monkeypatch, config) -> None:
    """Make the op's custom_vjp run the backward kernels with ``config`` for every head dim."""
    monkeypatch.setattr(dp_pallas, "backward_config_for", lambda key_dim, value_dim: config)


def cotangents(rng, B, T, H, K, V):
    return (
        jnp.asarray(rng.normal(size=(B, T, H, V)), jnp.float32),
        jnp.asarray(rng.normal(size=(B, H, K, V)), jnp.float32),
    )


# (n_h, T, K, V, gated, initial_state, resets)
FP32_CASES = [
    (1, 70, 20, 36, False, True, False),
    (1, 65, 16, 16, True, True, True),
    (2, 63, 20, 12, True, True, True),
    (2, 100, 32, 20, False, False, True),
    (3, 65, 16, 36, True, True, False),
    (4, 40, 8, 20, True, True, True),
    (4, 20, 20, 8, False, True, False),
]


@pytest.mark.parametrize("n,T,K,V,gated,h0,resets", FP32_CASES)
def test_fp32_grads_match_chunked(rng, n, T, K, V, gated, h0, resets):
    B, H = 2, 2
    p = random_problem(rng, B=B, T=T, H=H, K=K, V=V, n_h=n, gated=gated, initial_state=h0)
    starts = jnp.asarray(random_resets(rng, B, T)) if resets else None
    cot_o, cot_s = cotangents(rng, B, T, H, K, V)
    args = inputs(p, jnp.float32)
    scale = float(rng.uniform(0.2, 1.0))
    got = grads(dp_pallas.forward, args, starts, cot_o, cot_s, n, scale)
    want = grads(chunked.forward, args, starts, cot_o, cot_s, n, scale)
    assert got.keys() == want.keys()
    for name in got:
        assert np.isfinite(got[name]).all(), name
        assert rel_rmse(want[name], got[name]) < FP32_TOL, (name, rel_rmse(want[name], got[name]))


def test_fp32_grads_match_reference(rng):
    """Against JAX autodiff of the token-by-token reference (independent of the chunked form)."""
    B, T, H, K, V, n = 1, 70, 2, 12, 20, 3
    p = random_problem(rng, B=B, T=T, H=H, K=K, V=V, n_h=n, gated=True, initial_state=True)
    starts = jnp.asarray(random_resets(rng, B, T))
    cot_o, cot_s = cotangents(rng, B, T, H, K, V)
    args = inputs(p, jnp.float32)
    got = grads(dp_pallas.forward, args, starts, cot_o, cot_s, n, 0.5)
    want = grads(reference.forward, args, starts, cot_o, cot_s, n, 0.5)
    for name in NAMES:
        assert rel_rmse(want[name], got[name]) < FP32_TOL, (name, rel_rmse(want[name], got[name]))


@pytest.mark.parametrize(
    "n,T,gated,h0,resets,split",
    [
        (1, 256, False, True, False, 4),
        (2, 260, True, True, True, 5),
        (3, 200, True, False, True, 4),
    ],
)
def test_sequence_split_grads_match_chunked(rng, monkeypatch, n, T, gated, h0, resets, split):
    """``state_split`` in the forward's and the backward's state passes (pieces of whole token
    chunks walked in parallel, joined by each piece's transfer map), through the custom_vjp."""
    fwd_config, bwd_config = dp_pallas.config_for, dp_pallas.backward_config_for
    monkeypatch.setattr(
        dp_pallas,
        "config_for",
        lambda K, V: dataclasses.replace(fwd_config(K, V), state_split=split),
    )
    monkeypatch.setattr(
        dp_pallas,
        "backward_config_for",
        lambda K, V: dataclasses.replace(bwd_config(K, V), state_split=split),
    )
    assert split_pieces(-(-T // 64), split) > 1
    B, H, K, V = 2, 2, 20, 36
    p = random_problem(rng, B=B, T=T, H=H, K=K, V=V, n_h=n, gated=gated, initial_state=h0)
    starts = jnp.asarray(random_resets(rng, B, T)) if resets else None
    cot_o, cot_s = cotangents(rng, B, T, H, K, V)
    args = inputs(p, jnp.float32)
    got = grads(dp_pallas.forward, args, starts, cot_o, cot_s, n, 0.4)
    want = grads(chunked.forward, args, starts, cot_o, cot_s, n, 0.4)
    assert got.keys() == want.keys()
    for name in got:
        assert np.isfinite(got[name]).all(), name
        assert rel_rmse(want[name], got[name]) < FP32_TOL, (name, rel_rmse(want[name], got[name]))


# head dims above 128 (padded K, V up to 256, K != V): (n_h, T, K, V, gated, initial_state,
# resets, B, H, oracle, BackwardConfig fields or None for ``backward_config_for``). Tiles of the
# wide-head config: state adjoint 4 x 2 / 4 x 1 / 2 x 2 / 1 x 2 (K x V), output adjoint 4 / 2 / 1
# key tiles (grid axis, partial gate terms summed) x 4 / 2 value tiles (in-kernel), with dv_out
# from the output adjoint (one key tile); the 128-wide defaults (2 x 2; output_dv needs one key
# tile, so dv_out stays its own kernel); the recompute stage with small tiles (8 x 4).
SMALL_TILES = dict(
    save_states=False,
    adjoint_block_k=32,
    adjoint_block_v=64,
    output_block_k=32,
    output_block_v=32,
)
WIDE_CASES = [
    (2, 70, 256, 256, True, True, True, 1, 1, "chunked", None),
    (1, 64, 256, 128, False, True, False, 1, 2, "chunked", None),
    (3, 40, 100, 200, True, False, True, 1, 1, "reference", None),
    (
        2,
        50,
        64,
        256,
        True,
        True,
        False,
        2,
        1,
        "reference",
        {**kernel_backward.WIDE_HEAD, "output_dv": True},
    ),
    (2, 64, 256, 256, True, True, True, 1, 1, "reference", {"output_dv": True}),
    (1, 40, 200, 256, True, False, True, 1, 1, "reference", SMALL_TILES),
]


@pytest.mark.parametrize("n,T,K,V,gated,h0,resets,B,H,oracle,fields", WIDE_CASES)
def test_wide_heads_use_the_kernel_backward(
    rng, monkeypatch, n, T, K, V, gated, h0, resets, B, H, oracle, fields
):
    """Wide heads: the custom_vjp runs the (tiled) backward kernels, never the fallback, and the
    fp32 gradients (final-state cotangent included) match the chunked path or the reference."""
    assert dp_pallas.kernel_backward_unsupported(K, V) is None

    def no_fallback(*args):
        raise AssertionError(f"fallback taken for K={K}, V={V}")

    monkeypatch.setattr(dp_pallas, "_fallback_bwd", no_fallback)
    if fields is not None:
        config = kernel_backward.BackwardConfig(**fields)
        use_backward_config(monkeypatch, config)
    p = random_problem(rng, B=B, T=T, H=H, K=K, V=V, n_h=n, gated=gated, initial_state=h0)
    starts = jnp.asarray(random_resets(rng, B, T)) if resets else None
    cot_o, cot_s = cotangents(rng, B, T, H, K, V)
    args = inputs(p, jnp.float32)
    scale = float(rng.uniform(0.2, 1.0))
    want_impl = chunked.forward if oracle == "chunked" else reference.forward
    got = grads(dp_pallas.forward, args, starts, cot_o, cot_s, n, scale, jit=True)
    want = grads(want_impl, args, starts, cot_o, cot_s, n, scale, jit=True)
    assert got.keys() == want.keys()
    for name in got:
        err = rel_rmse(want[name], got[name])
        assert np.isfinite(got[name]).all() and err < FP32_TOL, (name, err)


def test_backward_support_reasons():
    """Every head dim the forward serves has kernel gradients; what is left says why."""
    for K, V in [(16, 16), (128, 128), (256, 256), (256, 128), (100, 200), (64, 256), (256, 16)]:
        assert dp_pallas.kernel_backward_unsupported(K, V) is None, (K, V)
        assert dp_pallas.kernel_backward_supports(K, V)
    fused = kernel_backward.BackwardConfig(wy_fused=True)
    assert kernel_backward.unsupported(128, 128, fused) is None
    assert "wy_fused" in kernel_backward.unsupported(256, 128, fused)
    assert "<= 256" in kernel_backward.unsupported(300, 64, kernel_backward.BackwardConfig())
    merged = kernel_backward.BackwardConfig(merged_adjoint=True)
    assert kernel_backward.unsupported(128, 100, merged) is None
    assert "merged_adjoint=True" in kernel_backward.unsupported(100, 200, merged)
    auto = kernel_backward.BackwardConfig()  # merged_adjoint=None: where the heads fit
    assert auto.merges_adjoints(128, 128, 2) and not auto.merges_adjoints(64, 256, 2)
    assert not kernel_backward.BackwardConfig(output_dv=True).merges_adjoints(64, 64, 2)
    # the merged adjoint forms h_mid's terms at n_h = 2 and reads h_mid above; the others read it
    assert not auto.reads_mid_states(128, 128, 2) and auto.reads_mid_states(128, 128, 3)
    assert kernel_backward.BackwardConfig(merged_mid_states=True).reads_mid_states(64, 64, 2)
    assert not kernel_backward.BackwardConfig(merged_mid_states=False).reads_mid_states(64, 64, 4)
    assert auto.reads_mid_states(64, 256, 2) and not auto.reads_mid_states(128, 128, 1)
    # chunk_grads=None: at n_h = 1 where the heads fit and merged_adjoint is left automatic
    assert auto.runs_chunk_grads(128, 128, 1) and not auto.merges_adjoints(128, 128, 1)
    assert not kernel_backward.BackwardConfig(merged_adjoint=False).runs_chunk_grads(128, 128, 1)
    assert not auto.runs_chunk_grads(128, 128, 2) and not auto.runs_chunk_grads(64, 256, 1)
    assert kernel_backward.BackwardConfig(merged_adjoint=True).merges_adjoints(64, 64, 1)
    with pytest.raises(ValueError, match="merged_adjoint=False"):
        kernel_backward.BackwardConfig(merged_adjoint=True, wy_fused=True)
    grads_kernel = kernel_backward.BackwardConfig(chunk_grads=True, merged_adjoint=True)
    assert kernel_backward.unsupported(128, 100, grads_kernel) is None
    assert "chunk_grads=True" in kernel_backward.unsupported(100, 200, grads_kernel)
    assert not grads_kernel.merges_adjoints(128, 128, 3)  # the WY adjoint is inside it too
    for other in (dict(output_dv=True), dict(wy_fused=True)):
        with pytest.raises(ValueError, match="chunk_grads=False"):
            kernel_backward.BackwardConfig(chunk_grads=True, **other)
    with pytest.raises(ValueError, match="wy_fused"):
        q = jnp.zeros((1, 64, 1, 16))
        v = jnp.zeros((1, 64, 1, 200))
        kernel_backward.stages(
            q, q, v, q[..., 0], None, v, None, num_householder=1, scale=1.0, config=fused
        )


@pytest.mark.parametrize("n,gated", [(2, True), (3, False)])
def test_bf16_grads_spec_tolerances(rng, n, gated):
    """SPEC §9: bf16 kernels vs the fp32 chunked path on the same (rounded) inputs."""
    B, T, H, K, V = 1, 100, 2, 32, 32
    p = random_problem(rng, B=B, T=T, H=H, K=K, V=V, n_h=n, gated=gated, initial_state=True)
    starts = jnp.asarray(random_resets(rng, B, T))
    cot_o, cot_s = cotangents(rng, B, T, H, K, V)
    low = inputs(p, jnp.bfloat16)
    got = grads(dp_pallas.forward, low, starts, cot_o, cot_s, n, K**-0.5)
    rounded = [None if a is None else a.astype(jnp.float32) for a in low]
    want = grads(chunked.forward, rounded, starts, cot_o, cot_s, n, K**-0.5)
    for name in got:
        err = rel_rmse(want[name], got[name])
        assert np.isfinite(got[name]).all() and err < LOW_TOL[name], (name, err)


# (field, the baseline value, the 16-bit value) of the BackwardConfig choices that trade accuracy
# for speed: the intermediates dk_out, dW, dkp stored in bf16 (and dW K^T in 16 bits); every
# product of the WY adjoint, and of the reverse state pass's chain, with 16-bit operands; the
# reverse pass's dv_out scores rounded to 16 bits
SIXTEEN_BIT_CHOICES = {
    "grad_dtype": ("float32", "input"),
    "wy_dots": ("tf32", "input"),
    "state_dots": ("split", "input"),
    "state_dv_out_dots": ("split", "input"),
}
# ... and those that reorder the arithmetic too (fp32 inputs: equal to rounding, not bitwise):
# W = A diag(beta gam) K formed first and rounded to 16 bits for the reverse state pass
# ... and dv_out formed in the reverse pass (fp32 there, the input dtype between kernels), and
# the output and state adjoints merged (the output's dk kept in fp32 instead of rounded).
# Each entry: (the more precise fields, the cheaper fields), both changes to the default.
# The reverse pass with the fewest products per step: Kᵀy in TF32, the fused dv_out's scores in
# 16 bits, the read term behind its branch (formed on one sub-chunk in n_h)
FEWEST_STATE_PRODUCTS = {
    "state_dots": "tf32",
    "state_dv_out_dots": "input",
    "state_read_masked": False,
}
ACCURACY_CHOICES = {
    field: ({field: precise}, {field: cheaper})
    for field, (precise, cheaper) in SIXTEEN_BIT_CHOICES.items()
} | {
    "state_stored_w": ({"state_stored_w": False}, {"state_stored_w": True}),
    "state_fused_dv_out": ({"state_fused_dv_out": False}, {"state_fused_dv_out": True}),
    "merged_adjoint": ({"merged_adjoint": False}, {"merged_adjoint": True}),
    "chunk_grads": ({"chunk_grads": False}, {"chunk_grads": True}),
    # h_mid stored by the forward, or its terms formed
    "merged_mid_states": ({"merged_mid_states": True}, {"merged_mid_states": False}),
    "state_dots/tf32": ({"state_dots": "split"}, {"state_dots": "tf32"}),
    "fewest_state_products": (
        {"state_dots": "split", "state_dv_out_dots": "split"},
        FEWEST_STATE_PRODUCTS,
    ),
}
# (n_h, gated, K, V): the choices checked on that shape (K=200: the tiled adjoints)
ACCURACY_CASES = {
    (1, False, 32, 32): ["grad_dtype"],
    (2, True, 32, 32): ["grad_dtype", "wy_dots", "state_dots", "state_stored_w", "merged_adjoint"]
    + ["chunk_grads", "merged_mid_states", "state_dots/tf32", "fewest_state_products"],
    (3, False, 32, 32): ["grad_dtype"],
    (4, True, 32, 32): ["grad_dtype", "wy_dots", "state_stored_w", "chunk_grads"]
    + ["merged_mid_states"],
    (2, True, 200, 136): ["grad_dtype"],
    (3, False, 64, 64): ["wy_dots", "state_dots", "state_stored_w", "state_fused_dv_out"]
    + ["merged_mid_states", "state_dots/tf32", "fewest_state_products"],
    (1, False, 64, 64): ["state_dots", "state_stored_w", "state_dots/tf32", "state_dv_out_dots"]
    + ["fewest_state_products"],
    (1, True, 32, 32): ["state_fused_dv_out"],
    (4, False, 64, 64): ["merged_adjoint"],
    (1, True, 64, 64): ["chunk_grads"],
    (3, False, 100, 60): ["chunk_grads"],
    (3, True, 32, 32): ["state_dv_out_dots"],
}


@pytest.mark.parametrize("n,gated,K,V", list(ACCURACY_CASES))
def test_16_bit_choices_keep_spec_tolerances(rng, monkeypatch, n, gated, K, V):
    """Each choice of ``ACCURACY_CHOICES`` stays within SPEC §9 of the fp32 chunked path, and at
    most a little further from it than its more precise baseline (one problem per shape of
    ``ACCURACY_CASES``: the reference and each configuration computed once)."""
    B, T, H = 1, 130, 2
    p = random_problem(rng, B=B, T=T, H=H, K=K, V=V, n_h=n, gated=gated, initial_state=True)
    starts = jnp.asarray(random_resets(rng, B, T))
    cot_o, cot_s = cotangents(rng, B, T, H, K, V)
    low = inputs(p, jnp.bfloat16)
    rounded = [None if a is None else a.astype(jnp.float32) for a in low]
    want = grads(chunked.forward, rounded, starts, cot_o, cot_s, n, K**-0.5, jit=True)
    default = kernel_backward.config_for(K, V)
    errors_of = {}

    def errors(fields):
        config = dataclasses.replace(default, **fields)
        if config not in errors_of:
            use_backward_config(monkeypatch, config)
            got = grads(dp_pallas.forward, low, starts, cot_o, cot_s, n, K**-0.5, jit=True)
            errors_of[config] = {name: rel_rmse(want[name], got[name]) for name in got}
            for name, err in errors_of[config].items():
                assert np.isfinite(got[name]).all() and err < LOW_TOL[name], (fields, name, err)
        return errors_of[config]

    for label in ACCURACY_CASES[n, gated, K, V]:
        precise, cheaper = (errors(fields) for fields in ACCURACY_CHOICES[label])
        for name, err in cheaper.items():
            assert err <= 2.0 * precise[name] + 2e-3, (label, name, err, precise[name])


def test_16_bit_choices_leave_fp32_inputs_alone(rng, monkeypatch):
    """fp32 inputs keep fp32 intermediates and products under every 16-bit choice of
    ``SIXTEEN_BIT_CHOICES``: identical gradients."""
    B, T, H, K, V, n = 1, 70, 2, 16, 16, 2
    p = random_problem(rng, B=B, T=T, H=H, K=K, V=V, n_h=n, gated=True, initial_state=True)
    cot_o, cot_s = cotangents(rng, B, T, H, K, V)
    args = inputs(p, jnp.float32)
    out = []
    for which in (0, 1, 2):  # every field at its precise value, at its 16-bit one; TF32 chain
        fields = {field: values[min(which, 1)] for field, values in SIXTEEN_BIT_CHOICES.items()}
        config = kernel_backward.BackwardConfig(**fields)
        if which == 2:
            config = dataclasses.replace(config, state_dots="tf32")
        use_backward_config(monkeypatch, config)
        out.append(grads(dp_pallas.forward, args, None, cot_o, cot_s, n, 0.25, jit=True))
    for name in out[0]:
        np.testing.assert_array_equal(out[0][name], out[1][name], err_msg=name)
        np.testing.assert_array_equal(out[0][name], out[2][name], err_msg=name)
    with pytest.raises(ValueError, match="grad_dtype must be 'float32' or 'input', got 'bf16'"):
        kernel_backward.BackwardConfig(grad_dtype="bf16")
    with pytest.raises(ValueError, match="wy_dots must be 'tf32', 'split' or 'input', got 'fp8'"):
        kernel_backward.BackwardConfig(wy_dots="fp8")
    with pytest.raises(ValueError, match="state_dots must be one of .*, got .fp8."):
        kernel_backward.BackwardConfig(state_dots="fp8")
    with pytest.raises(ValueError, match="state_dv_out_dots must be one of .*, got .tf32."):
        kernel_backward.BackwardConfig(state_dv_out_dots="tf32")
    with pytest.raises(ValueError, match="wy_chunks must be at least 1, got 0"):
        kernel_backward.BackwardConfig(wy_chunks=0)
    with pytest.raises(ValueError, match="state_loop must be one of .*, got .chunk."):
        kernel_backward.BackwardConfig(state_loop="chunk")


BRANCH_SUB_LOOP = dict(state_loop="sub", state_read_masked=False)
TOKEN_LOOP = dict(state_loop="token")
STORED_W = dict(state_stored_w=True)
DV_OUT_KERNEL = dict(state_fused_dv_out=False)


@pytest.mark.parametrize(
    "variant,n,split,tol",
    [(BRANCH_SUB_LOOP, 1, 1, 1e-6), (BRANCH_SUB_LOOP, 2, 1, 1e-6), (BRANCH_SUB_LOOP, 2, 3, 1e-6)]
    + [(BRANCH_SUB_LOOP, 3, 2, 1e-6), (BRANCH_SUB_LOOP, 4, 1, 1e-6)]
    + [(TOKEN_LOOP, 1, 1, 1e-6), (TOKEN_LOOP, 2, 2, 1e-6), (TOKEN_LOOP, 2, 1, 1e-6)]
    + [(STORED_W, 1, 1, 1e-5), (STORED_W, 2, 2, 1e-5), (STORED_W, 3, 1, 1e-5)]
    + [(DV_OUT_KERNEL, 1, 1, 1e-5), (DV_OUT_KERNEL, 2, 3, 1e-5), (DV_OUT_KERNEL, 3, 1, 1e-5)]
    + [
        (dict(DV_OUT_KERNEL, **BRANCH_SUB_LOOP), 2, 1, 1e-5),
        (dict(DV_OUT_KERNEL, **TOKEN_LOOP), 2, 2, 1e-5),
    ]
    + [(dict(DV_OUT_KERNEL, **STORED_W), 4, 1, 1e-5)],
)
def test_reverse_pass_options_match_the_default(rng, monkeypatch, variant, n, split, tol):
    """On fp32 inputs the reverse state pass's options give the default's gradients, also under
    the sequence split: the read term behind ``lax.cond`` (``state_read_masked=False``) or
    formed on every sub-chunk (``True``; the default ``None`` masks it at these few programs),
    ``state_loop="token"`` (one step per token chunk; the default ``"auto"`` is the sub-chunk
    loop), ``state_stored_w`` (``W^T dv_new`` from the forward's ``W``) and
    ``state_fused_dv_out=False`` (stage 1's ``dv_out`` kernel instead of ``dv_out`` formed in
    the pass, the default), alone and with the other options."""
    B, T, H, K, V = 1, 200, 2, 16, 24
    p = random_problem(rng, B=B, T=T, H=H, K=K, V=V, n_h=n, gated=True, initial_state=True)
    starts = jnp.asarray(random_resets(rng, B, T))
    cot_o, cot_s = cotangents(rng, B, T, H, K, V)
    args = inputs(p, jnp.float32)
    out = []
    for fields in ({}, variant):
        config = kernel_backward.BackwardConfig(state_split=split, **fields)
        use_backward_config(monkeypatch, config)
        out.append(grads(dp_pallas.forward, args, starts, cot_o, cot_s, n, 0.3, jit=True))
    for name in out[0]:
        assert np.isfinite(out[1][name]).all(), name
        assert rel_rmse(out[0][name], out[1][name]) < tol, name


def test_reverse_pass_launch_plan():
    """The reverse pass's automatic choices (``state_loop="auto"``, ``state_read_masked=None``):
    the sub-chunk loop; up to one wave (132 programs) the read term masked with the deepest
    pipeline asked for, beyond it the read term behind its branch and at most 2 stages (two
    programs per SM; only the branch is capped); explicit choices are kept (the token loop
    falls back as in the forward)."""
    chunk, token = 37_120, 20_480  # K = 128, BV = 32, bf16
    assert launch_plan("auto", None, 3, 128, 2, chunk, token) == ("sub", True, 3, chunk + token)
    assert launch_plan("auto", None, 3, 256, 2, chunk, token) == ("sub", False, 2, chunk)
    assert launch_plan("sub", True, 3, 256, 2, chunk, token) == ("sub", True, 3, chunk + token)
    assert launch_plan("sub", False, 3, 128, 2, chunk, token) == ("sub", False, 3, chunk)
    assert launch_plan("token", None, 3, 128, 2, chunk, token)[0::3] == ("token", 2 * chunk + token)
    assert launch_plan("token", None, 3, 128, 3, chunk, token)[0] == "sub"
    fused = launch_plan("auto", None, 3, 256, 2, chunk, token, reads_every_chunk=True)
    assert fused == ("sub", False, 2, chunk + token)  # Q, dO loaded on every sub-chunk


def test_reverse_pass_products_by_n_h():
    """``BackwardConfig.state_products``: by default the fewest products per step from n_h =
    ``FEWEST_PRODUCTS_MIN_NH`` (the read term behind its branch, ``Kᵀy`` in TF32, the fused
    ``dv_out``'s scores in 16 bits) where the pass forms ``dv_out`` itself, else the split
    products with the read term left to ``launch_plan``; explicit choices are kept at every
    n_h."""
    config = kernel_backward.BackwardConfig()
    fewest = dict(read_masked=False, dots="tf32", dv_out_dots="input")
    precise = dict(read_masked=None, dots="split", dv_out_dots="split")
    assert kernel_backward.FEWEST_PRODUCTS_MIN_NH == 3
    for n in (1, 2):
        assert config.state_products(n) == precise, n
    for n in (3, 4):
        assert config.state_products(n) == fewest, n
    wide_key = kernel_backward.config_for(256, 64)  # dv_out from its own kernel
    assert not wide_key.state_fused_dv_out
    assert wide_key.state_products(3) == precise
    explicit = kernel_backward.BackwardConfig(
        state_read_masked=True, state_dots="input", state_dv_out_dots="split"
    )
    for n in (1, 3):
        assert explicit.state_products(n) == dict(
            read_masked=True, dots="input", dv_out_dots="split"
        )


def test_through_product_is_exact(rng):
    """``common.through_product``: a tile as fp32 through a product with the identity, exactly
    (16-bit tiles in 16-bit products, fp32 tiles in IEEE fp32)."""
    for dtype, mode in ((jnp.bfloat16, DotMode.INPUT), (jnp.float32, DotMode.IEEE)):
        tile = jnp.asarray(rng.normal(size=(64, 32)) * 1e3, dtype)
        out = through_product(tile, mode, dtype=dtype, interpret=True)
        assert out.dtype == jnp.float32
        np.testing.assert_array_equal(np.asarray(out), np.asarray(tile.astype(jnp.float32)))


def test_fused_dv_out_with_decay_needs_the_token_gate():
    """``state_pass_backward(dv_out=None)`` forms ``dv_out`` itself; with decay it needs the
    token log-gate and says so."""
    from pallas_kernels.backward_state_pass import state_pass_backward

    B, T, H, K, n = 1, 64, 1, 16, 1
    z = lambda *shape: jnp.zeros(shape, jnp.float32)
    with pytest.raises(ValueError, match="dv_out=None with decay .* needs gate_tokens"):
        state_pass_backward(
            z(B, H, T * n, 64),
            z(B, T * n, H, K),
            z(B, T * n, H),
            None,
            z(B, T, H, K),
            z(B, T, H, K),
            z(B, H, K, K),
            z(B, H, T * n),
            z(B, H, T * n),
            z(B, H, T),
            num_householder=n,
            scale=0.25,
            interpret=True,
        )


def test_stored_w_without_the_forwards_w_is_an_error(rng):
    """``state_stored_w`` reads the forward's ``W``: residuals without it raise a clear error."""
    B, T, H, K, V, n = 1, 64, 2, 16, 16, 2
    p = random_problem(rng, B=B, T=T, H=H, K=K, V=V, n_h=n, gated=False, initial_state=False)
    q, k, v, beta, g, _ = inputs(p, jnp.float32)
    o, _, res = kernels.forward(q, k, v, beta, g, None, None, num_householder=n, scale=0.25)
    config = kernel_backward.BackwardConfig(state_stored_w=True)
    with pytest.raises(ValueError, match="state_stored_w needs the forward's W .* save_w=True"):
        kernel_backward.backward(
            q, k, v, beta, res, o, None, num_householder=n, scale=0.25, config=config
        )


def test_segment_ids_and_cu_seqlens(rng):
    """Packed documents through the public API: gradients equal the chunked path's."""
    T, H, K, V, n = 70, 2, 16, 12, 2
    p = random_problem(rng, B=1, T=T, H=H, K=K, V=V, n_h=n, gated=True)
    args = inputs(p, jnp.float32)[:5]
    cot = jnp.asarray(rng.normal(size=(1, T, H, V)), jnp.float32)
    cu = jnp.asarray([0, 30, 31, 70])
    seg = jnp.asarray(random_segments(rng, 1, T))

    def g(impl, **kw):
        loss = lambda *a: jnp.sum(dpjax.delta_product(*a, impl=impl, **kw)[0] * cot)
        return jax.grad(loss, (0, 1, 2, 3, 4))(*args)

    for kw in (dict(cu_seqlens=cu), dict(segment_ids=seg)):
        for a, b in zip(g("pallas", **kw), g("chunked", **kw), strict=True):
            assert rel_rmse(b, a) < FP32_TOL, kw


def test_dead_gates_have_zero_gradient(rng):
    """Gates with exp(g) == 0 act as resets; their gradient is exactly 0, all others finite."""
    B, T, H, K, V, n = 1, 80, 2, 16, 16, 2
    p = random_problem(rng, B=B, T=T, H=H, K=K, V=V, n_h=n, gated=True, initial_state=True)
    p["g"][:, 10] = -np.inf
    p["g"][:, 50] = -1e4
    cot_o, cot_s = cotangents(rng, B, T, H, K, V)
    args = inputs(p, jnp.float32)
    got = grads(dp_pallas.forward, args, None, cot_o, cot_s, n, 0.3)
    want = grads(chunked.forward, args, None, cot_o, cot_s, n, 0.3)
    assert np.all(got["dg"][:, [10, 50]] == 0)
    for name in NAMES:
        assert np.isfinite(got[name]).all()
        assert rel_rmse(want[name], got[name]) < FP32_TOL, name


def _il_chunks(x, n_chunks, D):
    """Pallas ``[B, H, N*64, Dp]`` -> chunk layout ``[B, H, N, 64, D]``."""
    B, H = x.shape[:2]
    return x.reshape(B, H, n_chunks, CHUNK, -1)[..., :D]


def _rows_chunks(x, n_chunks, D):
    """Pallas ``[B, N*64, H, Dp]`` -> chunk layout ``[B, H, N, 64, D]``."""
    x = jnp.moveaxis(x, 2, 1)
    return _il_chunks(x, n_chunks, D)


TWO_ADJOINTS = dict(merged_adjoint=False, state_fused_dv_out=False)


@pytest.mark.parametrize(
    "save_states,fields",
    [
        (True, {}),
        (False, {}),
        (True, TWO_ADJOINTS),
        (False, TWO_ADJOINTS),
        (True, dict(wy_fused=True, state_fused_dv_out=False)),
        (True, dict(chunk_grads=True)),
        (False, dict(chunk_grads=True)),
        (True, dict(merged_mid_states=False)),
        (False, dict(merged_mid_states=False)),
        (True, dict(merged_loop=True)),
        (True, dict(wy_chunks=4)),  # 6 interleaved chunks: 2 per program
    ],
    ids=[
        "default",
        "recompute",
        "two-adjoints",
        "two-adjoints-recompute",
        "wy-fused",
        "chunk-grads",
        "chunk-grads-recompute",
        "merged-formed-mid",
        "merged-formed-mid-recompute",
        "merged-loop",
        "wy-loop",
    ],
)
def test_each_stage_matches_its_plain_jax_twin(rng, save_states, fields):
    """Every kernel stage's outputs against ``chunked_backward``'s stage functions (fp32), with
    the forward's saved states or recomputed ones: the default (``dv_out`` formed in the reverse
    pass, the output and state adjoints merged into one kernel, which forms no ``dk_out`` of its
    own), the ``dv_out`` kernel with the two adjoint kernels, stages 3 + 4 fused, and stages 1,
    3 and 4 as one kernel (no ``dk_out``, ``dW``, ``dkp`` of its own), and the merged adjoint
    without the start states of the sub-chunks ``i > 0`` (``h_mid``; the default at n_h = 2) or
    walking the sub-chunks in a loop, and the WY adjoint walking several chunks per program."""
    config = kernel_backward.BackwardConfig(**fields)
    fused = config.wy_fused or config.runs_chunk_grads(20, 12, 3)
    merged = config.merges_adjoints(20, 12, 3) or config.runs_chunk_grads(20, 12, 3)
    B, T, H, K, V, n = 1, 70, 2, 20, 12, 3
    scale = 0.4
    p = random_problem(rng, B=B, T=T, H=H, K=K, V=V, n_h=n, gated=True, initial_state=True)
    starts = jnp.asarray(random_resets(rng, B, T))
    q, k, v, beta, g, h0 = inputs(p, jnp.float32)
    do = jnp.asarray(rng.normal(size=(B, T, H, V)), jnp.float32)
    dht = jnp.asarray(rng.normal(size=(B, H, K, V)), jnp.float32)

    _, _, res = kernels.forward(
        q, k, v, beta, g, h0, starts, num_householder=n, scale=scale, save_states=save_states
    )
    assert (res.v_new is not None) == save_states and (res.h_mid is not None) == save_states
    out = kernel_backward.stages(
        q,
        k,
        v,
        beta,
        res,
        do,
        dht,
        num_householder=n,
        scale=scale,
        interpret=True,
        config=config,
    )

    # the plain-JAX twin on chunk-layout inputs
    NT = -(-T // CHUNK)
    pad = NT * CHUNK - T
    NI = NT * n
    f32 = jnp.float32
    gc, rc = chunked.dead_gates_as_resets(g, starts, (B, T, H), f32)
    q_c, do_c = chunked.to_chunks(q, pad, NT, f32), chunked.to_chunks(do, pad, NT, f32)
    k_c = chunked.to_chunks(k, pad * n, NI, f32)
    _, _, cres = chunked._primal(
        q_c,
        k_c,
        chunked.to_chunks(v, pad * n, NI, f32),
        chunked.to_chunks(beta, pad * n, NI, f32),
        chunked.to_chunks(gc, pad, NT, f32),
        h0,
        chunked.to_chunks(rc, pad, NT, bool),
        n,
        scale,
    )
    rec = chunked_backward.recompute(cres, n)
    dq, dk_out, dvn_out, _, _ = chunked_backward.output_backward(
        q_c, k_c, rec.v_new, rec.h, do_c, rec.decay_tok, scale, n
    )
    st = chunked_backward.state_pass_backward(
        q_c, do_c, k_c, rec.w, rec.v_new, rec.h, dvn_out, dht, rec.decay_il, rec.decay_tok, scale, n
    )
    wy = chunked_backward.wy_backward(
        cres.a, k_c, cres.v, cres.beta, rec.decay_il, st.dw, st.dv_new
    )
    dG_il = chunked_backward.gate_grad(wy.p_pair, wy.p_from_start, st.p_to_end, st.p_carry)
    check = lambda want, got, what: (
        rel_rmse(np.asarray(want), np.asarray(got)) < FP32_TOL or pytest.fail(what)
    )
    # saved or recomputed forward intermediates: v_new, the interleaved chunk-start states
    check(rec.v_new, _il_chunks(out["vnew"], NI, V), "v_new")
    states = [
        chunked_backward.rebuild_chunk_states(
            rec.h[:, :, J],
            *(
                group_by_token_chunk(x, n)[J]
                for x in (k_c, rec.v_new, rec.decay_il.to_end, rec.decay_il.carry)
            ),
        )
        for J in range(NT)
    ]
    want_states = jnp.stack([s for per_j in states for s in per_j], axis=2)
    if config.reads_mid_states(K, V, n):
        h_il = kernel_backward.interleaved_states(res.h, out["h_mid"], n)[..., :K, :V]
        check(want_states, h_il, "h_il")
    else:  # the merged adjoint forms dW and its gate terms without the states h_mid
        assert out["h_mid"] is None
        check(want_states[:, :, ::n], res.h[..., :K, :V], "h")
    # stage 1: output adjoint, including the output's dv_new part
    if save_states and config.state_fused_dv_out:  # formed inside the reverse pass
        assert out["dv_out"] is None
    else:
        check(dvn_out, _il_chunks(out["dv_out"], NI, V), "dv_out")
    check(dq, _rows_chunks(out["dq"], NT, K), "dq")
    if merged:
        assert out["dk_out"] is None
    else:
        check(dk_out, _rows_chunks(out["dk_out"], NI, K), "dk_out")
    # stage 2: reverse state pass
    check(st.dv_new, _il_chunks(out["dvnew"], NI, V), "dv_new")
    check(st.dh0, out["dh0"][:, :, :K, :V], "dh0")
    # stage 3: the state update's adjoint (dW, dk so far, its gate terms)
    if not fused:
        check(st.dw, _il_chunks(out["dw"], NI, K), "dw")
        check(dk_out + st.dk, _rows_chunks(out["dkp"], NI, K), "dkp")
        zero = jnp.zeros_like(st.p_to_end)
        dG_st = chunked_backward.gate_grad(zero[..., None], zero, st.p_to_end, st.p_carry)
        check(dG_st, _il_chunks(out["dG_st"][..., None], NI, 1)[..., 0], "dG_st")
    # stage 4: WY adjoint (dk complete), dbeta, dv, interleaved gate terms
    check(dk_out + st.dk + wy.dk, _rows_chunks(out["dk"], NI, K), "dk")
    check(wy.dv, _rows_chunks(out["dv"], NI, V), "dv")
    check(wy.dbeta, _rows_chunks(out["dbeta"][..., None], NI, 1)[..., 0], "dbeta")
    check(dG_il, _il_chunks(out["dG_il"][..., None], NI, 1)[..., 0], "dG_il")


def test_forward_keeps_mid_states_only_where_the_backward_reads_them(rng):
    """The custom_vjp forward stores ``h_mid`` only for a backward that reads it (the default:
    n_h >= 3), and a backward configured to read it refuses residuals without it."""
    for n, kept in [(1, False), (2, False), (3, True)]:
        p = random_problem(rng, B=1, T=70, H=1, K=16, V=16, n_h=n, gated=False)
        q, k, v, beta, g, h0 = inputs(p, jnp.bfloat16)
        _, saved = dp_pallas._pallas_fwd(q, k, v, beta, g, h0, None, n, 0.25)
        assert (saved[-1].h_mid is not None) == kept, n
    p = random_problem(rng, B=1, T=70, H=1, K=16, V=16, n_h=2, gated=False)
    q, k, v, beta, g, h0 = inputs(p, jnp.bfloat16)
    args = (q, k, v, beta, g, h0, None)
    _, _, res = kernels.forward(
        *args, num_householder=2, scale=0.25, save_states=True, save_mid_states=False
    )
    reads_mid = kernel_backward.BackwardConfig(merged_mid_states=True)
    with pytest.raises(ValueError, match="save_mid_states=True"):
        kernel_backward.stages(
            q, k, v, beta, res, q, None, num_householder=2, scale=0.25, config=reads_mid
        )


def test_poisoned_buffers_are_all_written(rng):
    """With every backward kernel output starting as NaN, all gradients come back finite (wide
    heads: ``test_gpu_poisoned_backward``)."""
    B, T, H, K, V, n = 1, 70, 2, 20, 12, 3
    p = random_problem(rng, B=B, T=T, H=H, K=K, V=V, n_h=n, gated=True, initial_state=True)
    q, k, v, beta, g, h0 = inputs(p, jnp.bfloat16)
    starts = jnp.asarray(random_resets(rng, B, T))
    o, final, res = kernels.forward(q, k, v, beta, g, h0, starts, num_householder=n, scale=0.3)
    out = kernel_backward.backward(
        q, k, v, beta, res, o, final, num_householder=n, scale=0.3, poison=True
    )
    for name, x in zip(NAMES, out, strict=True):
        assert bool(jnp.isfinite(x.astype(jnp.float32)).all()), name


# ---------------------------------------------------------------------------------------------
# GPU: compiled kernels at real sizes, bf16, against the chunked path in fp32 on the GPU

GPU_CASES = [
    # B, T, H, K, V, n_h, gated, h0+resets
    (2, 2048, 8, 128, 128, 1, False, False),
    (2, 2048, 8, 128, 128, 2, True, True),
    (2, 2048, 8, 128, 128, 3, False, True),
    (2, 1500, 4, 100, 60, 3, True, True),
    (1, 1024, 16, 64, 64, 4, True, False),
    # wide heads (tiled backward kernels, backward.config_for)
    (1, 777, 4, 256, 256, 2, True, True),
    (1, 1024, 4, 100, 200, 3, False, True),
    (1, 1024, 4, 256, 64, 1, True, True),
]


# BackwardConfig fields changed from the default: every shape with the defaults, the first three
# also with fp32 intermediates, with the reverse pass's read term behind its branch, with the WY
# adjoint's products with an fp32 value in TF32, with the reverse pass on a stored W and with
# the previous kernels for dv_out and the output and state adjoints (the wide heads' path), and with
# stages 1, 3 and 4 as one kernel (chunk_grads)
BACKWARD_VARIANTS = {
    "default": {},
    "grad_dtype=float32": {"grad_dtype": "float32"},
    "state_read_masked=False": {"state_read_masked": False},
    "wy_dots=tf32": {"wy_dots": "tf32"},
    "state_stored_w=True": {"state_stored_w": True},
    "merged_adjoint=False,state_fused_dv_out=False": TWO_ADJOINTS,
    "chunk_grads=True": {"chunk_grads": True},
    "merged_mid_states=True": {"merged_mid_states": True},  # h_mid stored at n_h = 2 too
    "merged_mid_states=False": {"merged_mid_states": False},  # formed at n_h = 3 too
    "merged_loop=True": {"merged_loop": True},  # at n_h = 3
    "state_dots=tf32": {"state_dots": "tf32"},
    "state_dv_out_dots=input": {"state_dv_out_dots": "input"},
    "wy_chunks=4,wy_stages=2": {"wy_chunks": 4, "wy_stages": 2},
    "fewest_state_products": FEWEST_STATE_PRODUCTS,
}
GPU_VARIANTS = [
    (*case, variant)
    for variant in BACKWARD_VARIANTS
    for case in (GPU_CASES if variant == "default" else GPU_CASES[:3])
]


@pytest.mark.gpu
@pytest.mark.parametrize("B,T,H,K,V,n,gated,extras,variant", GPU_VARIANTS)
def test_gpu_bf16_grads(rng, monkeypatch, B, T, H, K, V, n, gated, extras, variant):
    """bf16 kernels vs the fp32 chunked path at real sizes, with the default backward
    configuration and (first three shapes) the variants of ``GPU_VARIANTS``."""
    from test_pallas_forward import record

    if BACKWARD_VARIANTS[variant]:
        config = dataclasses.replace(
            dp_pallas.backward_config_for(K, V), **BACKWARD_VARIANTS[variant]
        )
        use_backward_config(monkeypatch, config)

    p = random_problem(rng, B=B, T=T, H=H, K=K, V=V, n_h=n, gated=gated, initial_state=extras)
    starts = jnp.asarray(random_resets(rng, B, T, first=False)) if extras else None
    cot_o, cot_s = cotangents(rng, B, T, H, K, V)
    low = inputs(p, jnp.bfloat16)
    argnums = tuple(i for i, a in enumerate(low) if a is not None)

    def grad_fn(impl):
        def loss(*a):
            o, final = impl(*a, starts, num_householder=n, scale=K**-0.5)
            return jnp.sum(o.astype(jnp.float32) * cot_o) + jnp.sum(final * cot_s)

        return jax.jit(jax.grad(loss, argnums))

    got = grad_fn(dp_pallas.forward)(*low)
    rounded = [None if a is None else a.astype(jnp.float32) for a in low]
    want = grad_fn(chunked.forward)(*rounded)
    errs = {}
    for i, a, b in zip(argnums, got, want, strict=True):
        a = np.asarray(a.astype(jnp.float32))
        assert np.isfinite(a).all(), NAMES[i]
        errs[NAMES[i]] = rel_rmse(np.asarray(b), a)
    record(case=[B, T, H, K, V, n, gated, extras, "bf16"], backward=True, variant=variant, **errs)
    for name, err in errs.items():
        assert err < LOW_TOL[name], (name, err)


@pytest.mark.gpu
@pytest.mark.parametrize("K,V", [(128, 128), (256, 256), (200, 100)])
def test_gpu_poisoned_backward(rng, K, V):
    B, T, H, n = 2, 1000, 4, 2
    p = random_problem(rng, B=B, T=T, H=H, K=K, V=V, n_h=n, gated=True, initial_state=True)
    q, k, v, beta, g, h0 = inputs(p, jnp.bfloat16)
    starts = jnp.asarray(random_resets(rng, B, T))

    @jax.jit
    def run(q, k, v, beta, g, h0, starts):
        o, final, res = kernels.forward(
            q, k, v, beta, g, h0, starts, num_householder=n, scale=0.1, poison=True
        )
        return kernel_backward.backward(
            q, k, v, beta, res, o, final, num_householder=n, scale=0.1, poison=True
        )

    for name, x in zip(NAMES, run(q, k, v, beta, g, h0, starts), strict=True):
        assert bool(jnp.isfinite(x.astype(jnp.float32)).all()), name
