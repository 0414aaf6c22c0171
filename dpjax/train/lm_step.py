"""The language model's forward for training: per-block rematerialisation and a blockwise
output head, so that neither activations of every layer nor ``[B, T, vocab]`` logits are kept.

``lm_token_fn(remat=..., block=...)`` returns a ``token_fn(model, batch) -> (ce, pred)`` for
``dpjax.train.step`` (``ce`` fp32 ``[B, T]`` per-token cross-entropy, ``pred`` int32 ``[B, T]``
argmax predictions), computing the same values as ``model(input_ids, ...)`` followed by a
softmax cross-entropy:

* ``remat="block"``: every block runs under ``nnx.remat`` (``jax.checkpoint``): its activations
  are recomputed in the backward pass, only the block inputs ``[B, T, D]`` are stored;
  ``"block_save_dots"`` keeps the outputs of the dense layers (remat name ``"dense"``,
  ``dpjax.nn.linear.mixed_matmul``) and of other matmuls without a batch dimension
  (``dots_with_no_batch_dims_saveable``) and recomputes the rest; ``"none"`` stores everything.
* the head: logits and their cross-entropy are made ``block`` positions at a time under
  ``jax.checkpoint`` inside a ``lax.map`` (peak memory ``[B, block, vocab]`` instead of
  ``[B, T, vocab]``; the backward recomputes each block's logits).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import jax
import jax.numpy as jnp
import optax
from flax import nnx

__all__ = ["REMAT_POLICIES", "hidden_states", "lm_token_fn"]

REMAT_POLICIES = {
    "none": None,
    "block": jax.checkpoint_policies.nothing_saveable,
    "block_save_dots": jax.checkpoint_policies.save_from_both_policies(
        jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
        jax.checkpoint_policies.save_only_these_names("dense"),
    ),
}


def hidden_states(model: nnx.Module, batch: Mapping[str, jax.Array], remat: str) -> jax.Array:
    """``DeltaProductLM.hidden_states`` with optional per-block remat: ``[B, T, D]``."""
    if remat not in REMAT_POLICIES:
        raise ValueError(f"remat: expected one of {sorted(REMAT_POLICIES)}, got {remat!r}")
    ids = batch["input_ids"]
    seq = model._sequence(ids, batch.get("segment_ids"), batch.get("attention_mask"))
    x = model.embeddings(ids)
    policy = REMAT_POLICIES[remat]
    for block in model.layers:
        if remat == "none":
            x = block(x, seq)
        else:
            x = nnx.remat(lambda blk, h: blk(h, seq), policy=policy)(block, x)
    return model.norm(x)


def lm_token_fn(
    remat: str = "none", block: int = 1024
) -> Callable[[nnx.Module, Mapping[str, jax.Array]], tuple[jax.Array, jax.Array]]:
    """``token_fn(model, batch) -> (ce fp32 [B, T], pred int32 [B, T])`` (see module doc)."""
    if remat not in REMAT_POLICIES:
        raise ValueError(f"remat: expected one of {sorted(REMAT_POLICIES)}, got {remat!r}")
    if block < 1:
        raise ValueError(f"block: expected >= 1, got {block}")

    def token_fn(model, batch):
        hidden = hidden_states(model, batch, remat)
        labels = batch["labels"]
        B, T, D = hidden.shape
        blk = min(block, T)
        pad = (-T) % blk
        h = jnp.pad(hidden, ((0, 0), (0, pad), (0, 0))).reshape(B, -1, blk, D)
        y = jnp.pad(labels, ((0, 0), (0, pad))).reshape(B, -1, blk)

        @jax.checkpoint
        def one(args):
            hb, yb = args
            logits = model.logits_from_hidden(hb)
            ce = optax.softmax_cross_entropy_with_integer_labels(logits, yb)
            return ce.astype(jnp.float32), jnp.argmax(logits, -1).astype(jnp.int32)

        ce, pred = jax.lax.map(one, (jnp.moveaxis(h, 1, 0), jnp.moveaxis(y, 1, 0)))
        unblock = lambda a: jnp.moveaxis(a, 0, 1).reshape(B, -1)[:, :T]
        return unblock(ce), unblock(pred)

    return token_fn
