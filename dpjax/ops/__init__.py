"""The DeltaProduct recurrence and its implementations.

``delta_product`` is the one public entry point. It validates its arguments, then dispatches to
an implementation; all of them compute the same function (SPEC §1.4, tested against a numpy
float64 recurrence):

* ``"reference"``: token-by-token ``lax.scan`` with an fp32 state. Exact, slow, any backend.
* ``"chunked"``: chunk-parallel WY/UT form in plain JAX (chunk 64), any backend, differentiable
  with memory ``O(T*(K+V) + (T/64)*K*V)`` per head.
* ``"pallas"``: Pallas (Triton backend) GPU kernels under ``jax.custom_vjp`` (interpret mode on
  CPU, for tests).
* ``"auto"`` (default): fail-closed; the fastest implementation whose ``supports(...)`` accepts
  the call: ``pallas`` on a CUDA GPU, else ``chunked``. Never the reference and never a wrong
  one. ``explain_impl(...)`` tells which implementation a call would use and why.

Example::

    import jax, jax.numpy as jnp, dpjax
    B, T, H, K, V, n_h = 2, 128, 4, 64, 64, 2
    ks = jax.random.split(jax.random.key(0), 4)
    q = jax.random.normal(ks[0], (B, T, H, K))
    k = dpjax.ops.l2norm(jax.random.normal(ks[1], (B, T * n_h, H, K)))
    v = jax.random.normal(ks[2], (B, T * n_h, H, V))
    beta = 2 * jax.nn.sigmoid(jax.random.normal(ks[3], (B, T * n_h, H)))   # in (0, 2)
    o, state = dpjax.delta_product(q, k, v, beta, output_final_state=True)
    # o: [B, T, H, V], state: [B, H, K, V] fp32
"""

from __future__ import annotations

import importlib
from types import ModuleType

import jax
import jax.numpy as jnp

from dpjax.ops import sharded
from dpjax.ops.decode import decode
from dpjax.ops.l2norm import l2norm
from dpjax.ops.validation import IMPLS, CallShape, validate
from dpjax.ops.varlen import DocumentRows, resets_from_cu_seqlens, resets_from_segment_ids

__all__ = ["delta_product", "decode", "explain_impl", "l2norm", "IMPLS"]

_MODULES = {
    "reference": "dpjax.ops.reference",
    "chunked": "dpjax.ops.chunked",
    "pallas": "dpjax.ops.pallas",
}
_AUTO_ORDER = ("pallas", "chunked")


def _load(name: str) -> ModuleType:
    return importlib.import_module(_MODULES[name])


def _reason_unsupported(name: str, shape: CallShape, dtype) -> str | None:
    try:
        module = _load(name)
    except ImportError as err:  # pragma: no cover - depends on the installation
        return f"cannot import {_MODULES[name]}: {err}"
    return module.supports(shape=shape, dtype=dtype)


def _auto_reasons(shape: CallShape, dtype) -> dict[str, str | None]:
    reasons: dict[str, str | None] = {}
    for name in _AUTO_ORDER:
        if name == "pallas" and jax.default_backend() != "gpu":
            reasons[name] = (
                f"auto uses Pallas kernels on GPU only (backend is {jax.default_backend()!r})"
            )
            continue
        reasons[name] = _reason_unsupported(name, shape, dtype)
    return reasons


def _reasons(impl: str, shape: CallShape, dtype) -> dict[str, str | None]:
    """``{candidate: None if supported else reason}``: the auto candidates, or ``impl`` alone."""
    if impl == "auto":
        return _auto_reasons(shape, dtype)
    return {impl: _reason_unsupported(impl, shape, dtype)}


def _select(impl: str, reasons: dict[str, str | None]) -> str:
    """The first supported candidate of ``_reasons(impl, ...)`` (ordered), else ``ValueError``."""
    for name, reason in reasons.items():
        if reason is None:
            return name
    if impl == "auto":
        raise ValueError(f"impl='auto': no implementation supports this call: {reasons}")
    raise ValueError(f"impl={impl!r} does not support this call: {reasons[impl]}")


def explain_impl(q, k, v, beta, g=None, **kwargs) -> tuple[str, dict[str, str | None]]:
    """Which implementation ``delta_product(q, k, v, beta, g, **kwargs)`` would run, and why.

    Returns ``(chosen_name, {candidate: None if supported else reason})``.
    """
    impl = kwargs.get("impl", "auto")
    shape = _validate_call(q, k, v, beta, g, **kwargs)
    reasons = _reasons(impl, shape, jnp.result_type(q))
    return _select(impl, reasons), reasons


def _validate_call(
    q,
    k,
    v,
    beta,
    g=None,
    *,
    num_householder=None,
    scale=None,
    initial_state=None,
    output_final_state=False,
    segment_ids=None,
    cu_seqlens=None,
    use_qk_l2norm=False,
    impl="auto",
) -> CallShape:
    del output_final_state, use_qk_l2norm
    return validate(
        q,
        k,
        v,
        beta,
        g,
        num_householder=num_householder,
        scale=scale,
        initial_state=initial_state,
        segment_ids=segment_ids,
        cu_seqlens=cu_seqlens,
        impl=impl,
    )


def delta_product(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    beta: jax.Array,
    g: jax.Array | None = None,
    *,
    num_householder: int | None = None,
    scale: float | None = None,
    initial_state: jax.Array | None = None,
    output_final_state: bool = False,
    segment_ids: jax.Array | None = None,
    cu_seqlens: jax.Array | None = None,
    use_qk_l2norm: bool = False,
    impl: str = "auto",
) -> tuple[jax.Array, jax.Array | None]:
    """(Gated) DeltaProduct: ``n_h`` generalised Householder steps per token (DeltaNet: n_h=1).

    Args:
      q: ``[B, T, H, K]`` queries (bf16/fp16/fp32).
      k: ``[B, T*n_h, H, K]`` keys; sub-step ``j`` of token ``t`` is row ``t*n_h + j``. Should be
        L2-normalised (or pass ``use_qk_l2norm=True``) for a stable recurrence.
      v: ``[B, T*n_h, H, V]`` values.
      beta: ``[B, T*n_h, H]`` step sizes in ``[0, 2]`` (``(1 - beta)`` is the Householder
        eigenvalue; ``beta > 1`` gives negative eigenvalues). Not clamped.
      g: optional ``[B, T, H]`` log-space forget gate (``<= 0``), applied once per token before its
        first sub-step.
      num_householder: ``n_h``; inferred from ``k.shape[1] // q.shape[1]`` when None.
      scale: query scale, default ``K ** -0.5``.
      initial_state: ``[N, H, K, V]`` state before the first token of each row (N = B), or of each
        document with ``cu_seqlens`` (N = number of documents). Any float dtype; used in fp32.
      output_final_state: also return the state after the last token (per row, or per document
        with ``cu_seqlens``), fp32.
      segment_ids: ``[B, T]`` int document ids; the state resets to zero where the id changes
        (``initial_state`` applies to the first document of each row; the final state is the
        last document's).
      cu_seqlens: ``[N+1]`` int offsets of documents packed into batch 1 (FLA convention).
      use_qk_l2norm: L2-normalise q and k (``x / sqrt(sum x^2 + 1e-6)``) inside the op.
      impl: ``"auto" | "pallas" | "chunked" | "reference"``.

    Returns:
      ``(o, final_state)``: ``o`` is ``[B, T, H, V]`` in ``q.dtype``; ``final_state`` is
      ``[N, H, K, V]`` fp32 when ``output_final_state`` else None.
    """
    shape = validate(
        q,
        k,
        v,
        beta,
        g,
        num_householder=num_householder,
        scale=scale,
        initial_state=initial_state,
        segment_ids=segment_ids,
        cu_seqlens=cu_seqlens,
        impl=impl,
    )
    name = _select(impl, _reasons(impl, shape, jnp.result_type(q)))
    # Inside ``sharded.batch_parallel(mesh, ...)`` kernels run per device under shard_map.
    forward = sharded.wrap_forward(name, _load(name).forward)
    scale = shape.key_dim**-0.5 if scale is None else float(scale)
    if use_qk_l2norm:
        q, k = l2norm(q), l2norm(k)
    acc = jnp.promote_types(jnp.result_type(q), jnp.float32)  # fp32 (fp64 under x64 checks)
    g = None if g is None else jnp.asarray(g, acc)
    h0 = None if initial_state is None else jnp.asarray(initial_state, acc)
    n = shape.num_householder
    run = lambda q, k, v, beta, g, h0, resets: forward(
        q, k, v, beta, g, h0, resets, num_householder=n, scale=scale
    )

    if cu_seqlens is not None and (initial_state is not None or output_final_state):
        docs = DocumentRows(cu_seqlens, shape.tokens)
        o_rows, final = run(
            docs.rows(q),
            docs.rows(k, n),
            docs.rows(v, n),
            docs.rows(beta, n),
            None if g is None else docs.rows(g),
            h0,
            None,
        )
        o = docs.unrows(o_rows)
    else:
        if cu_seqlens is not None:
            resets = resets_from_cu_seqlens(cu_seqlens, shape.tokens)
        elif segment_ids is not None:
            resets = resets_from_segment_ids(segment_ids)
        else:
            resets = None
        o, final = run(q, k, v, beta, g, h0, resets)
    return o, (final if output_final_state else None)
