"""Logical axis names carried by every parameter of ``dpjax.nn`` (the one place they are defined).

Every parameter is an ``nnx.Param`` whose ``out_sharding`` metadata is a tuple of these names
(or ``None`` = replicated along that dimension), one per array dimension. The training code maps
the names to mesh axes, e.g. with ``nnx.logical_axis_rules(axis_rules(heads="model", ...))``
around model construction, or by translating ``nnx.get_partition_spec(nnx.state(model))``.

==========  ===============================================  ================================
name        what the dimension indexes                        typical mesh axis
==========  ===============================================  ================================
``vocab``   vocabulary (embedding rows, lm_head columns)      tensor-parallel axis, or None
``embed``   model width ``hidden_size`` (residual stream)      FSDP axis, or None
``heads``   fused head features (``H*d``, ``n_h*H*d``, conv    tensor-parallel axis
            channels): q/k/v/g projection outputs, o_proj in
``mlp``     SwiGLU intermediate features                      tensor-parallel axis
==========  ===============================================  ================================

Per parameter (shapes for ``Linear`` kernels are ``[in, out]``):

* token embedding ``[vocab, D]``: (vocab, embed); untied ``lm_head`` ``[D, vocab]``: (embed, vocab)
* mixer ``q/k/v/g_proj``: (embed, heads); ``o_proj``: (heads, embed); ``b_proj``, ``a_proj``:
  (embed, None) (they output ``n_h*H`` / ``H`` scalars, too small to shard)
* short convs: kernel ``[W, C]`` (None, heads), bias ``[C]`` (heads,)
* MLP ``gate_proj``/``up_proj``: (embed, mlp); ``down_proj``: (mlp, embed)
* every norm weight, ``A_log``, ``dt_bias``: (None,)
* attention ``q/k/v_proj``: (embed, heads) (biases (heads,)); ``o_proj``: (heads, embed)

Without a mesh, parameters are created unsharded and the names are metadata only (flax's eager
sharding needs a mesh); under ``jax.set_mesh(mesh)`` they are sharded eagerly, so every name must
then resolve to a mesh axis or ``None`` through the active ``nnx.logical_axis_rules``.
"""

from __future__ import annotations

VOCAB = "vocab"
EMBED = "embed"
HEADS = "heads"
MLP = "mlp"

LOGICAL_AXES: tuple[str, ...] = (VOCAB, EMBED, HEADS, MLP)

Names = tuple[str | None, ...]

EMBEDDING: Names = (VOCAB, EMBED)
LM_HEAD: Names = (EMBED, VOCAB)
IN_PROJ: Names = (EMBED, HEADS)  # q/k/v/g projections (mixer and attention)
OUT_PROJ: Names = (HEADS, EMBED)  # o_proj (mixer and attention)
SCALAR_PROJ: Names = (EMBED, None)  # beta and forget-gate projections
HEADS_BIAS: Names = (HEADS,)  # attention q/k/v biases, conv biases
CONV_KERNEL: Names = (None, HEADS)
MLP_IN: Names = (EMBED, MLP)
MLP_OUT: Names = (MLP, EMBED)
VECTOR: Names = (None,)  # norm weights, A_log, dt_bias


def axis_rules(**mapping: str | None) -> tuple[tuple[str, str | None], ...]:
    """Logical-to-mesh rules for every name in ``LOGICAL_AXES`` (unlisted names -> ``None``).

    Example: ``nnx.logical_axis_rules(axis_rules(heads="model", mlp="model", vocab="model"))``.
    Raises ``ValueError`` for a name that is not one of ``LOGICAL_AXES``.
    """
    unknown = sorted(set(mapping) - set(LOGICAL_AXES))
    if unknown:
        raise ValueError(f"axis_rules: unknown logical axis names {unknown}; known: {LOGICAL_AXES}")
    return tuple((name, mapping.get(name)) for name in LOGICAL_AXES)
