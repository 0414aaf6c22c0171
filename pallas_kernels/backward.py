"""The DeltaProduct backward composed from the backward kernel stages (plain arrays).

Mirror of ``dpjax.ops.chunked_backward.backward`` (same stage split; this module knows nothing of
``dpjax``). From the forward's residuals (``A``, the log-gates, the token-chunk start states
``h`` and, when the forward ran with ``save_states``, ``v_new`` and the other interleaved
chunk-start states ``h_mid``) and the padded inputs::

    0. backward_recompute      without saved states: v_new, h_mid, dv_out; else dv_out alone
                               (with ``state_fused_dv_out``, the default, the reverse state
                               pass forms dv_out; with ``output_dv``, the output adjoint)
    1. backward_output         dq (complete), the output's dk, token gate terms dG_tok
    2. backward_state_pass     reverse scan: complete dv_new, chunk-end state gradients dh_il, dh0
    3. backward_state_adjoint  dW, dk so far (output + state update), its gate terms
    4. backward_wy             dk, dv (complete), dbeta, interleaved gate terms dG_il
    5. (JAX) dg = reverse local cumsum of dG_tok + that of dG_il at sub-step 0 of each token

Up to padded K, V = 128 the default (``merged_adjoint=None``) runs 1 and 3 as one kernel per
token chunk after the reverse pass (``backward_chunk_adjoint``: the token chunk's ``h``, ``K``,
``v_new`` read once, no ``dk_out`` round trip), so the default backward at ``n_h >= 2`` is three
kernels: the reverse pass, the merged adjoint, the WY adjoint. At ``n_h = 1`` the default
(``chunk_grads=None``; ``True`` at any ``n_h``) runs 1, 3 and 4 as one kernel
(``backward_chunk_grads``: no ``dW``, ``dkp`` round trip either), so the backward is two
kernels. ``BackwardConfig(wy_fused=True)`` runs 3 and 4 as the previous single kernel instead.
At ``n_h = 2`` the merged adjoint forms the second sub-chunk's ``dW`` and gate terms from
``h[J]`` and the first sub-chunk, so that the forward stores only the token-chunk start states
(``BackwardConfig.merged_mid_states``, ``reads_mid_states``); above, it reads ``h_mid``.

Head dims: padded K, V up to 256, as the forward (``unsupported`` says what is not served: the
fused kernel above 128). Up to 128 every stage holds its ``[Kp, Vp]`` / ``[64, Kp]`` values
whole (the H100-tuned ``BackwardConfig()``). Wider heads (``config_for``) tile them: the output
adjoint over keys (grid axis; its token gate terms are per-key-tile partials summed in JAX) and
over values (in-kernel sums through ref slices), the state adjoint over ``[bk, bv]`` state tiles
(in-kernel loops), the WY adjoint in narrower column tiles; the reverse state pass, ``dv_out``
and the recompute stage already tile V by a grid axis (narrower tiles and 8 warps for K = 256).

Memory: besides the residuals, the backward holds ``dv_new`` (``[B, H, L, Vp]``, input dtype),
the chunk-end state gradients ``dh_il`` (``[B, H, L/64, Kp, Vp]``, input dtype) and stage 3's
``dW``, ``dkp`` (``[B, L, H, Kp]``-sized, the input dtype by default, fp32 with
``BackwardConfig(grad_dtype="float32")``); where ``dv_out`` or the output's ``dk`` run
through memory (the non-default paths above) also those; without saved states also ``v_new``
and ``h_mid``. Nothing per token is ``K x V``.

The per-row gate vectors of the reverse scan (``gam``, ``fdec`` and the token ``gam``) are
computed here in JAX from the log-gates (``-inf`` = reset), exactly as the forward kernels do
inside.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import partial

import jax
import jax.numpy as jnp

from pallas_kernels.backward_chunk_adjoint import MAX_DIM as MAX_MERGED_DIM
from pallas_kernels.backward_chunk_adjoint import chunk_adjoint
from pallas_kernels.backward_chunk_grads import MAX_DIM as MAX_CHUNK_GRADS_DIM
from pallas_kernels.backward_chunk_grads import chunk_grads
from pallas_kernels.backward_output import output_backward
from pallas_kernels.backward_recompute import dv_out as dv_out_only
from pallas_kernels.backward_recompute import recompute
from pallas_kernels.backward_state_adjoint import state_adjoint
from pallas_kernels.backward_state_pass import DV_OUT_DOTS, STATE_DOTS, state_pass_backward
from pallas_kernels.backward_wy import wy_backward, wy_backward_fused
from pallas_kernels.common import (
    AUTO_SPLIT,
    CHUNK,
    STATE_LOOPS,
    default_interpret,
    pad_to,
    padded_length,
)
from pallas_kernels.forward import Residuals, pad_inputs, pad_state, padded_dims


@dataclass(frozen=True)
class BackwardConfig:
    """Tile sizes and Triton launch parameters of the backward stages (defaults: the fastest
    variants of ``experiments/bench_op.py --bwd-tune`` on an H100 at K = V = 128, n_h = 1, 2;
    docs/BENCHMARKS.md), and whether the forward
    keeps ``v_new`` and every chunk-start state for it (``save_states``, read by
    ``dpjax.ops.pallas``; without them the recompute stage runs first). The tiles (``*_block_*``)
    are clipped to the padded head dims, so up to 128 the defaults are one tile per stage;
    ``config_for`` gives the wide-head configuration."""

    save_states: bool = True

    recompute_block_v: int = 64
    recompute_warps: int = 8
    recompute_stages: int = 2
    state_block_v: int = 32
    state_warps: int = 4
    state_stages: int = 3
    state_split: int = AUTO_SPLIT  # sequence split of the reverse state pass (as the forward's)
    # its loop: "sub" (one step per interleaved chunk), "token" (one step per token chunk,
    # sub-chunks unrolled, no branch) or "auto" ("sub"); and its read term: formed on every
    # sub-chunk and kept on the first (True), behind a branch (False) or None: behind the branch
    # from n_h = FEWEST_PRODUCTS_MIN_NH with state_fused_dv_out (state_products), else masked up
    # to one wave of programs (state_pass_backward's launch_plan, which also caps the branch's
    # pipeline at 2 stages beyond one wave)
    state_loop: str = "auto"
    state_read_masked: bool | None = None
    # its chain's products (state_pass_backward): "split" (TF32 and split 16-bit halves), "tf32"
    # (TF32 both: three dependent products per step instead of four), "input" (16-bit operands,
    # one product each; not a default: on long ungated sequences the rounding accumulates towards
    # SPEC §9's bounds, docs/DESIGN_DECISIONS.md) or "auto": "tf32" from n_h =
    # FEWEST_PRODUCTS_MIN_NH with state_fused_dv_out (state_products), else "split"
    state_dots: str = "auto"
    # the fused dv_out's scores^T dO (state_fused_dv_out): the fp32 scores as two 16-bit halves
    # ("split"), rounded to the input dtype ("input": one product instead of two per step, as
    # FLA's backward) or "auto": "input" from n_h = FEWEST_PRODUCTS_MIN_NH (state_products),
    # else "split"
    state_dv_out_dots: str = "auto"
    # the reverse state pass subtracts W^T dv_new with W = A diag(beta gam) K in the input dtype
    # (two dependent products per step instead of three; state_pass_backward): the forward's
    # prepare kernel forms W and keeps it in the residuals (forward(save_w=True), Residuals.w)
    state_stored_w: bool = False
    # the reverse state pass forms dv_out itself from the Q, dO it reads for the read term (no
    # stage-1 dv_out kernel, no [L, Vp] round trip; state_pass_backward with dv_out=None); only
    # where the forward kept its states (else the recompute stage forms dv_out)
    state_fused_dv_out: bool = True
    output_warps: int = 4
    output_stages: int = 1
    output_block_k: int = 128  # key tile per program (a grid axis above it)
    output_block_v: int = 128  # value tile of its in-kernel sums over V
    output_dv: bool = False  # the output adjoint computes dv_out (else its own small kernel;
    # only where the key dim fits one program, Kp <= output_block_k)
    # stages 1 and 3 as one kernel per token chunk (backward_chunk_adjoint: h, K, V_new read once,
    # the output's dk kept in registers): True, False (the two kernels) or None: merged where
    # the padded head dims fit it (K, V <= 128)
    merged_adjoint: bool | None = None
    # the merged adjoint reads the forward's stored start states of the sub-chunks i > 0 (h_mid):
    # True; False: forms their dW and gate terms from h[J] and the earlier sub-chunks, so the
    # forward stores no h_mid, (n_h - 1)/n_h of its states, at O(n_h^2) extra [64, 64] products;
    # None: forms them up to n_h = FORMED_MID_MAX (on an H100 forward + backward at n_h = 2 was
    # 1 % faster, at n_h = 3 9 % slower)
    merged_mid_states: bool | None = None
    merged_warps: int = 4
    merged_stages: int = 1
    # the merged adjoint walks the sub-chunks i >= 1 in a loop (lax.fori_loop) instead of
    # unrolled, where it reads h_mid and n_h > 2 (fewer live values: by offline ptxas at n_h = 3
    # a 1.0 KB stack frame against 2.1 KB; not yet timed on a GPU)
    merged_loop: bool = False
    # stages 1, 3 and 4 as one kernel per token chunk (backward_chunk_grads: also the WY adjoint,
    # so dW and dkp never leave registers; padded K, V <= 128): True (overrides merged_adjoint),
    # False, or None: at n_h = 1 where the heads fit and merged_adjoint is None (on an H100 it is
    # faster there, and 1.1-1.7x slower than the merged adjoint + WY at n_h = 2, 3: one program
    # walks a token chunk's n_h sub-chunks one after the other; docs/DESIGN_DECISIONS.md)
    chunk_grads: bool | None = None
    chunk_grads_warps: int = 4
    chunk_grads_stages: int = 1
    chunk_grads_block: int = 64  # key tile of its [64, Kp] values
    dv_block_v: int = 128
    dv_warps: int = 4
    dv_stages: int = 2
    adjoint_warps: int = 4
    adjoint_stages: int = 1
    adjoint_block_k: int = 128  # state tile of the state adjoint (in-kernel loops over tiles)
    adjoint_block_v: int = 128
    wy_warps: int = 4
    wy_stages: int = 1
    wy_block: int = 128  # column tile of the WY kernel's [64, K|V] operands
    # interleaved chunks per WY program, walked in a loop so that Triton copies the next chunk's
    # tiles ahead (with wy_stages > 1); 1: one chunk per program, nothing to pipeline (ncu: the
    # kernel waits on its loads); not yet timed on a GPU
    wy_chunks: int = 1
    # operands of the WY adjoint's products with an fp32 value (A, dA, D): "tf32", "split" (two
    # 16-bit products each) or "input" (rounded to the 16-bit input dtype, as FLA's backward)
    wy_dots: str = "input"
    wy_fused: bool = False  # stages 3 + 4 as the previous single kernel (for comparison)
    fused_warps: int = 8  # launch parameters of that kernel
    # dtype of the [L, Kp] intermediates dk_out, dW, dkp between stages 1, 3 and 4: "float32", or
    # "input" (16-bit inputs: half their traffic, and P = dW K^T in 16 bits; fp32 inputs: fp32)
    grad_dtype: str = "input"

    def __post_init__(self):
        if self.grad_dtype not in ("float32", "input"):
            raise ValueError(
                f"BackwardConfig.grad_dtype must be 'float32' or 'input', got {self.grad_dtype!r}"
            )
        if self.state_loop not in STATE_LOOPS:
            raise ValueError(
                f"BackwardConfig.state_loop must be one of {STATE_LOOPS}, got {self.state_loop!r}"
            )
        for field, choices in (("state_dots", STATE_DOTS), ("state_dv_out_dots", DV_OUT_DOTS)):
            if getattr(self, field) not in (*choices, "auto"):
                raise ValueError(
                    f"BackwardConfig.{field} must be one of {(*choices, 'auto')}, got "
                    f"{getattr(self, field)!r}"
                )
        if self.merged_adjoint and (self.output_dv or self.wy_fused):
            raise ValueError(
                "BackwardConfig.merged_adjoint runs the output adjoint after the reverse pass: "
                "it cannot also form dv_out (output_dv) or feed the fused stage 3 + 4 kernel "
                "(wy_fused); set merged_adjoint=False for those"
            )
        if self.chunk_grads and (self.output_dv or self.wy_fused):
            raise ValueError(
                "BackwardConfig.chunk_grads runs the output adjoint after the reverse pass and "
                "the WY adjoint itself: it cannot also form dv_out (output_dv) or run with the "
                "fused stage 3 + 4 kernel (wy_fused); set chunk_grads=False for those"
            )
        if self.wy_chunks < 1:
            raise ValueError(f"BackwardConfig.wy_chunks must be at least 1, got {self.wy_chunks}")
        if self.wy_dots not in ("tf32", "split", "input"):
            raise ValueError(
                f"BackwardConfig.wy_dots must be 'tf32', 'split' or 'input', got {self.wy_dots!r}"
            )

    def runs_chunk_grads(self, key_dim: int, value_dim: int, num_householder: int) -> bool:
        """Whether stages 1, 3 and 4 run as one kernel for these (unpadded) head dims and
        ``n_h``."""
        if self.chunk_grads is None:
            fits = max(padded_dims(key_dim, value_dim)) <= MAX_CHUNK_GRADS_DIM
            automatic = self.merged_adjoint is None and not (self.output_dv or self.wy_fused)
            return fits and automatic and num_householder == 1
        return self.chunk_grads

    def merges_adjoints(self, key_dim: int, value_dim: int, num_householder: int) -> bool:
        """Whether stages 1 and 3 (only) run as one kernel for these (unpadded) head dims and
        ``n_h``."""
        if self.runs_chunk_grads(key_dim, value_dim, num_householder):
            return False
        if self.merged_adjoint is None:
            fits = max(padded_dims(key_dim, value_dim)) <= MAX_MERGED_DIM
            return fits and not (self.output_dv or self.wy_fused)
        return self.merged_adjoint

    def reads_mid_states(self, key_dim: int, value_dim: int, num_householder: int) -> bool:
        """Whether the backward reads the start states of the interleaved chunks that do not
        start a token chunk (``h_mid``; the forward stores them only then)."""
        if num_householder == 1:
            return False
        if not self.merges_adjoints(key_dim, value_dim, num_householder):
            return True
        if self.merged_mid_states is None:
            return num_householder > FORMED_MID_MAX
        return self.merged_mid_states

    def state_products(self, num_householder: int) -> dict:
        """The reverse state pass's ``read_masked``, ``dots`` and ``dv_out_dots`` for ``n_h``
        (the ``"auto"`` and ``None`` choices resolved; ``read_masked`` may stay ``None`` for
        ``launch_plan``'s rule by the number of programs): from n_h = FEWEST_PRODUCTS_MIN_NH
        the fewest products per step (on an H100 at n_h = 3, B=4, T=4096, H=8, K=V=128:
        forward + backward 1.856 -> 1.801 ms; docs/BENCHMARKS.md, ninth session), where the pass
        forms ``dv_out`` itself (``state_fused_dv_out``: it then loads ``Q``, ``dO`` on every
        sub-chunk, so the read term's branch costs no pipelining; not with ``WIDE_KEY``)."""
        fewest = num_householder >= FEWEST_PRODUCTS_MIN_NH and self.state_fused_dv_out
        read_masked = self.state_read_masked
        if read_masked is None and fewest:
            read_masked = False
        dots = self.state_dots
        if dots == "auto":
            dots = "tf32" if fewest else "split"
        dv_out_dots = self.state_dv_out_dots
        if dv_out_dots == "auto":
            dv_out_dots = "input" if fewest else "split"
        return dict(read_masked=read_masked, dots=dots, dv_out_dots=dv_out_dots)

    def intermediate_dtype(self, input_dtype) -> jnp.dtype:
        """The dtype of ``dk_out``, ``dW`` and ``dkp`` for inputs of ``input_dtype``."""
        return jnp.dtype(jnp.float32 if self.grad_dtype == "float32" else input_dtype)


# Wide heads (padded K or V above 128): tiles and launch parameters chosen offline with ptxas for
# sm_90 (pip Triton 3.6; docs/BENCHMARKS.md "night", docs/DESIGN_DECISIONS.md): state-adjoint
# and output-adjoint tiles of 64 keys (output: 64 values per in-kernel step; a key-tile grid
# axis), 8 warps, WY column tiles of 32 at 8 warps. Padded K above 128 (the reverse state pass
# holds dE [Kp, BV] and K [64, Kp] per step): BV = 16, 8 warps, 2 pipeline stages (3 stages
# needed 280 KB of shared memory at n_h = 1); the recompute stage (no saved states): BV = 32.
WIDE_HEAD = dict(
    output_block_k=64,
    output_block_v=64,
    output_warps=8,
    adjoint_block_k=64,
    adjoint_block_v=128,
    adjoint_warps=8,
    wy_block=32,
    wy_warps=8,
)
WIDE_KEY = dict(
    state_block_v=16,
    state_warps=8,
    state_stages=2,
    recompute_block_v=32,
    state_fused_dv_out=False,
)


def config_for(key_dim: int, value_dim: int) -> BackwardConfig:
    """The backward configuration for these head dims: ``BackwardConfig()`` (H100-tuned at
    K = V = 128) when the padded K and V are at most 128, else with ``WIDE_HEAD`` (and, for
    padded K above 128, ``WIDE_KEY``) applied."""
    Kp, Vp = padded_dims(key_dim, value_dim)
    config = BackwardConfig()
    if max(Kp, Vp) > 128:
        config = replace(config, **WIDE_HEAD)
    if Kp > 128:
        config = replace(config, **WIDE_KEY)
    return config


MAX_DIM = 256  # padded head dims the backward kernels serve (as the forward's)
FORMED_MID_MAX = 2  # up to this n_h the merged adjoint forms h_mid's terms (merged_mid_states)
# from this n_h the reverse state pass takes the fewest products per step by default
# (BackwardConfig.state_products; timed at n_h = 3 only, on an H100)
FEWEST_PRODUCTS_MIN_NH = 3
MAX_FUSED_DIM = 128  # the previous fused stage 3 + 4 kernel holds whole [Kp, Vp] state tiles


def unsupported(key_dim: int, value_dim: int, config: BackwardConfig) -> str | None:
    """``None`` when the backward kernels serve these head dims with ``config``, else why not."""
    Kp, Vp = padded_dims(key_dim, value_dim)
    if max(Kp, Vp) > MAX_DIM:
        return f"backward kernels need padded K, V <= {MAX_DIM}, got Kp={Kp}, Vp={Vp}"
    if config.chunk_grads and max(Kp, Vp) > MAX_CHUNK_GRADS_DIM:
        return (
            f"the per-chunk gradient kernel (chunk_grads=True) holds whole heads: padded K, V "
            f"<= {MAX_CHUNK_GRADS_DIM}, got Kp={Kp}, Vp={Vp}"
        )
    if config.merged_adjoint and not config.chunk_grads and max(Kp, Vp) > MAX_MERGED_DIM:
        return (
            f"the merged output + state adjoint (merged_adjoint=True) holds whole heads: padded "
            f"K, V <= {MAX_MERGED_DIM}, got Kp={Kp}, Vp={Vp}"
        )
    if config.wy_fused and max(Kp, Vp) > MAX_FUSED_DIM:
        return (
            f"the fused stage 3 + 4 kernel (wy_fused) holds whole [Kp, Vp] state tiles: padded "
            f"K, V <= {MAX_FUSED_DIM}, got Kp={Kp}, Vp={Vp}"
        )
    return None


def chunk_gate_vectors(gate: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``(gam, fdec)`` ``[..., N*64]`` fp32 from a log-gate ``[..., N*64]`` (``-inf`` = reset):
    ``gam_r = [seg_r == 0] exp(G_r)``, ``fdec_r = [seg_r == seg_end] exp(G_end - G_r)`` per
    64-row chunk (as ``prepare.py`` computes them)."""
    shape = gate.shape
    x = gate.reshape(*shape[:-1], shape[-1] // CHUNK, CHUNK)
    reset = x == -jnp.inf
    g_cum = jnp.cumsum(jnp.where(reset, 0.0, x), axis=-1)
    seg = jnp.cumsum(reset.astype(jnp.int32), axis=-1)
    gam = jnp.where(seg == 0, jnp.exp(g_cum), 0.0)
    fdec = jnp.where(seg == seg[..., -1:], jnp.exp(g_cum[..., -1:] - g_cum), 0.0)
    return gam.reshape(shape), fdec.reshape(shape)


def reverse_local_cumsum(x: jax.Array) -> jax.Array:
    """Suffix sums inside each 64-row chunk of the last axis (``[..., N*64]``)."""
    shape = x.shape
    x = x.reshape(*shape[:-1], shape[-1] // CHUNK, CHUNK)
    total = jnp.sum(x, axis=-1, keepdims=True)
    return (total - jnp.cumsum(x, axis=-1) + x).reshape(shape)


def stage_kernels(
    config: BackwardConfig,
    *,
    num_householder: int,
    scale: float,
    interpret: bool,
    poison: bool = False,
) -> dict[str, Callable]:
    """The backward kernels with their launch parameters bound (one place for the mapping
    from ``config`` to each stage; ``stages`` and the benchmark both call through it)."""
    common = dict(interpret=interpret, poison=poison)
    op = dict(num_householder=num_householder, scale=scale)
    return {
        "recompute": partial(
            recompute,
            **op,
            block_v=config.recompute_block_v,
            num_warps=config.recompute_warps,
            num_stages=config.recompute_stages,
            **common,
        ),
        "dv_out": partial(
            dv_out_only,
            **op,
            block_v=config.dv_block_v,
            num_warps=config.dv_warps,
            num_stages=config.dv_stages,
            **common,
        ),
        "state_pass": partial(
            state_pass_backward,
            split=config.state_split,
            loop=config.state_loop,
            **config.state_products(num_householder),
            **op,
            block_v=config.state_block_v,
            num_warps=config.state_warps,
            num_stages=config.state_stages,
            **common,
        ),
        "output": partial(
            output_backward,
            **op,
            block_k=config.output_block_k,
            block_v=config.output_block_v,
            num_warps=config.output_warps,
            num_stages=config.output_stages,
            **common,
        ),
        "state_adjoint": partial(
            state_adjoint,
            num_householder=num_householder,
            block_k=config.adjoint_block_k,
            block_v=config.adjoint_block_v,
            num_warps=config.adjoint_warps,
            num_stages=config.adjoint_stages,
            **common,
        ),
        "wy": partial(
            wy_backward,
            block=config.wy_block,
            dots=config.wy_dots,
            chunks=config.wy_chunks,
            num_warps=config.wy_warps,
            num_stages=config.wy_stages,
            **common,
        ),
        "merged": partial(
            chunk_adjoint,
            **op,
            num_warps=config.merged_warps,
            num_stages=config.merged_stages,
            loop=config.merged_loop,
            **common,
        ),
        "chunk_grads": partial(
            chunk_grads,
            **op,
            wy_dots=config.wy_dots,
            low_grads=config.grad_dtype == "input",
            block=config.chunk_grads_block,
            num_warps=config.chunk_grads_warps,
            num_stages=config.chunk_grads_stages,
            **common,
        ),
        "wy_fused": partial(
            wy_backward_fused, num_warps=config.fused_warps, num_stages=1, **common
        ),
    }


def interleaved_states(h: jax.Array, h_mid: jax.Array | None, n: int) -> jax.Array:
    """Every interleaved chunk-start state ``[B, H, NT*n, Kp, Vp]`` from the token-chunk starts
    ``h [B, H, NT, Kp, Vp]`` and ``h_mid [B, H, NT*(n-1), Kp, Vp]`` (a copy; only the fused
    stage 3 + 4 kernel needs it)."""
    if n == 1:
        return h
    B, H, NT, Kp, Vp = h.shape
    mid = h_mid.reshape(B, H, NT, n - 1, Kp, Vp)
    return jnp.concatenate([h[:, :, :, None], mid], axis=3).reshape(B, H, NT * n, Kp, Vp)


def gate_vectors(res: Residuals) -> tuple[jax.Array | None, jax.Array | None, jax.Array | None]:
    """``(gam, fdec, gam_tok)`` per-chunk decay vectors of the saved log-gates (Nones ungated)."""
    if res.gate_substeps is None:
        return None, None, None
    gam, fdec = chunk_gate_vectors(res.gate_substeps)
    return gam, fdec, chunk_gate_vectors(res.gate_tokens)[0]


def stages(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    beta: jax.Array,
    res: Residuals,
    do: jax.Array,
    dht: jax.Array | None,
    *,
    num_householder: int,
    scale: float,
    config: BackwardConfig | None = None,
    interpret: bool | None = None,
    poison: bool = False,
) -> dict[str, jax.Array | None]:
    """Run the backward kernels; returns every stage output (padded layouts, as each stage
    module documents): ``vnew, h_mid, dv_out`` (0, or the saved residuals), ``dq, dk_out, dG_tok``
    (1), ``dvnew, dh_il, dh0`` (2), ``dw, dkp, dG_st`` (3; None with ``wy_fused`` or
    ``chunk_grads``), ``dk, dv, dbeta, dG_il`` (4). Arguments as ``backward``."""
    if interpret is None:
        interpret = default_interpret()
    B, T, H, K = q.shape
    V = v.shape[-1]
    n = num_householder
    if config is None:
        config = config_for(K, V)
    reason = unsupported(K, V, config)
    if reason is not None:
        raise ValueError(reason)
    Kp, Vp = padded_dims(K, V)
    qp, kp, vp, bp = pad_inputs(q, k, v, beta, n)
    dop = pad_to(pad_to(do.astype(q.dtype), 3, Vp), 1, padded_length(T))
    dhtp = jnp.zeros((B, H, Kp, Vp), jnp.float32) if dht is None else pad_state(dht, Kp, Vp)
    gate_tok, gate_sub = res.gate_tokens, res.gate_substeps
    gam, fdec, gam_tok = gate_vectors(res)
    kern = stage_kernels(config, num_householder=n, scale=scale, interpret=interpret, poison=poison)
    grad_dtype = config.intermediate_dtype(q.dtype)
    output = partial(kern["output"], dk_dtype=grad_dtype)
    grads_kernel = config.runs_chunk_grads(K, V, n)
    merged = config.merges_adjoints(K, V, n)
    mid_states = config.reads_mid_states(K, V, n)
    dq = dk_out = dG_tok = None
    if res.v_new is None:  # the forward kept no states: recompute them
        vnew, h_mid, dv_out = kern["recompute"](
            res.a, kp, vp, bp, res.h, qp, dop, gam, fdec, gate_tok, mid_states=mid_states
        )
    elif mid_states and res.h_mid is None:
        raise ValueError(
            "this BackwardConfig reads the forward's interleaved chunk-start states (h_mid): run "
            "pallas_kernels.forward.forward with save_mid_states=True"
        )
    elif config.output_dv and not config.state_fused_dv_out and Kp <= config.output_block_k:
        vnew, h_mid = res.v_new, res.h_mid if mid_states else None
        dq, dk_out, dG_tok, dv_out = output(qp, dop, res.h, kp, vnew, gate_tok, with_dv_out=True)
    else:  # dv_out by its own kernel, or (None) formed in the reverse pass
        vnew, h_mid = res.v_new, res.h_mid if mid_states else None
        dv_out = None if config.state_fused_dv_out else kern["dv_out"](kp, qp, dop, gate_tok)
    if dq is None and not (merged or grads_kernel):
        dq, dk_out, dG_tok = output(qp, dop, res.h, kp, vnew, gate_tok)
    if config.state_stored_w and res.w is None:
        raise ValueError(
            "BackwardConfig.state_stored_w needs the forward's W in the residuals: run "
            "pallas_kernels.forward.forward with save_w=True"
        )
    w = res.w if config.state_stored_w else None
    dvnew, dh_il, dh0 = kern["state_pass"](
        res.a, kp, bp, dv_out, qp, dop, dhtp, gam, fdec, gam_tok, w=w, gate_tokens=gate_tok
    )
    if grads_kernel:  # stages 1, 3, 4 in one kernel (dk_out, dW, dkp stay inside it)
        dq, dk, dv, dbeta, dG_tok, dG_il = kern["chunk_grads"](
            qp, dop, res.h, h_mid, dh_il, kp, vnew, dvnew, res.a, vp, bp, gate_tok, gate_sub
        )
        dw = dkp = dG_st = None
    elif config.wy_fused:
        h_il = interleaved_states(res.h, h_mid, n)
        dk, dv, dbeta, dG_il = kern["wy_fused"](
            res.a, kp, vp, bp, h_il, dh_il, vnew, dvnew, dk_out, gate_sub
        )
        dw = dkp = dG_st = None
    else:
        if merged:  # stages 1 + 3 in one kernel (dk_out stays inside it)
            dq, dkp, dw, dG_tok, dG_st = kern["merged"](
                qp,
                dop,
                res.h,
                h_mid,
                dh_il,
                kp,
                vnew,
                dvnew,
                gate_tok,
                gam,
                fdec,
                out_dtype=grad_dtype,
            )
        else:
            dw, dkp, dG_st = kern["state_adjoint"](
                res.h, h_mid, dh_il, vnew, dvnew, dk_out, kp, gam, fdec, out_dtype=grad_dtype
            )
        dk, dv, dbeta, dG_il = kern["wy"](res.a, kp, vp, bp, dw, dvnew, dkp, gate_sub, dG_st)
    return dict(
        vnew=vnew,
        h_mid=h_mid,
        dv_out=dv_out,
        dvnew=dvnew,
        dh_il=dh_il,
        dh0=dh0,
        dq=dq,
        dk_out=dk_out,
        dG_tok=dG_tok,
        dw=dw,
        dkp=dkp,
        dG_st=dG_st,
        dk=dk,
        dv=dv,
        dbeta=dbeta,
        dG_il=dG_il,
    )


def backward(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    beta: jax.Array,
    res: Residuals,
    do: jax.Array,
    dht: jax.Array | None,
    *,
    num_householder: int,
    scale: float,
    config: BackwardConfig | None = None,
    interpret: bool | None = None,
    poison: bool = False,
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array, jax.Array | None, jax.Array]:
    """Gradients of ``pallas_kernels.forward.forward`` from its residuals.

    Args:
      q, k, v, beta: the forward's (unpadded) inputs, shapes as in ``forward``.
      res: the forward's ``Residuals``.
      do: ``[B, T, H, V]`` output cotangent; dht: ``[B, H, K, V]`` final-state cotangent or None.
      config: tiles and launch parameters (None: ``config_for(K, V)``); ``unsupported`` says
        which combinations of head dims and configuration the kernels do not serve (ValueError).

    Returns:
      ``(dq [B, T, H, K] q.dtype, dk [B, L, H, K], dv [B, L, H, V] (q.dtype),
      dbeta [B, L, H] fp32, dg [B, T, H] fp32 or None (no log-gates), dh0 [B, H, K, V] fp32)``.
      ``dg`` is 0 at resets (the state there does not depend on the gate).
    """
    B, T, H, K = q.shape
    V = v.shape[-1]
    n = num_householder
    Tp = padded_length(T)
    out = stages(
        q,
        k,
        v,
        beta,
        res,
        do,
        dht,
        num_householder=n,
        scale=scale,
        config=config,
        interpret=interpret,
        poison=poison,
    )
    gate_tok = res.gate_tokens
    dg = None
    if res.gate_substeps is not None:
        dg_il = reverse_local_cumsum(out["dG_il"]).reshape(B, H, Tp, n)[..., 0]
        dg = reverse_local_cumsum(out["dG_tok"]) + dg_il
        dg = jnp.where(gate_tok == -jnp.inf, 0.0, dg)
        dg = jnp.moveaxis(dg, 1, 2)[:, :T]
    L = T * n
    return (
        out["dq"][:, :T, :, :K],
        out["dk"][:, :L, :, :K],
        out["dv"][:, :L, :, :V],
        out["dbeta"][:, :L],
        dg,
        out["dh0"][:, :, :K, :V],
    )
