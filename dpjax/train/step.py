"""Jitted train and eval steps on an explicit train state.

The train state is a plain pytree (a dict) that Orbax saves as is::

    {"step": int32 [], "params": nnx.State (nnx.Param), "rest": nnx.State (other variables),
     "opt_state": optax state}

A step merges ``graphdef`` with the state (``nnx.merge``), runs the model on a batch
``{"input_ids": int32 [B, T], "labels": int32 [B, T], optional "loss_mask": [B, T],
"segment_ids": int32 [B, T], "attention_mask": [B, T]}``, and differentiates the mean token
cross-entropy over ``loss_mask`` positions (all positions by default) with ``jax.value_and_grad``
(optionally accumulated over micro-batches), then applies the Optax update. Shardings are
explicit (``in_shardings``/``out_shardings``). Labels are compared with the output at the same
position (no shift here: a task that predicts the next token shifts its labels itself).

Metrics (per step, fp32 scalars): ``loss``, ``token_accuracy`` (fraction of masked positions
predicted right), ``sequence_accuracy`` (fraction of sequences right at every masked position),
``grad_norm`` and ``lr``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import NamedSharding

from dpjax.eval.accuracy import prefix_correct

__all__ = [
    "ce_and_predictions",
    "forward",
    "logits_token_fn",
    "make_eval_step",
    "make_train_step",
    "token_loss_and_metrics",
    "token_stats",
]

TrainState = dict[str, Any]
Batch = Mapping[str, jax.Array]
TokenFn = Callable[[nnx.Module, Batch], tuple[jax.Array, jax.Array]]


def forward(model: nnx.Module, batch: Batch) -> jax.Array:
    """Logits fp32 ``[B, T, vocab]`` of ``model(input_ids, segment_ids=, attention_mask=)``."""
    kwargs = {k: batch[k] for k in ("segment_ids", "attention_mask") if k in batch}
    return model(batch["input_ids"], **kwargs).astype(jnp.float32)


def ce_and_predictions(logits: jax.Array, labels: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Per-token cross-entropy fp32 ``[B, T]`` and argmax predictions int32 ``[B, T]``."""
    ce = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels)
    return ce, jnp.argmax(logits, axis=-1).astype(jnp.int32)


def logits_token_fn(model: nnx.Module, batch: Batch) -> tuple[jax.Array, jax.Array]:
    """Default ``token_fn``: full logits, then per-token CE and predictions (``[B, T]`` each).

    A ``token_fn(model, batch) -> (ce fp32 [B, T], pred int32 [B, T])`` replaces it to change
    how the per-token loss is computed (rematerialisation, a blockwise output head that never
    holds all logits, ...); masking, reductions and metrics stay here.
    """
    return ce_and_predictions(forward(model, batch), batch["labels"])


def token_stats(ce: jax.Array, pred: jax.Array, batch: Batch) -> dict[str, jax.Array]:
    """Per-sequence sums over masked positions: CE, correct tokens, counted tokens, plus the
    prefix correctness ``[B, T]`` (positions with ``loss_mask == 0`` count as correct)."""
    labels = batch["labels"]
    mask = _mask(batch)
    correct = (pred == labels).astype(jnp.float32)
    return {
        "ce": (ce * mask).sum(-1),
        "correct": (correct * mask).sum(-1),
        "tokens": mask.sum(-1),
        "prefix": prefix_correct(pred, labels, mask),
    }


def _mask(batch: Batch) -> jax.Array:
    mask = batch.get("loss_mask")
    shape = batch["labels"].shape
    return jnp.ones(shape, jnp.float32) if mask is None else mask.astype(jnp.float32)


def token_loss_and_metrics(logits: jax.Array, batch: Batch) -> tuple[jax.Array, dict]:
    """Mean token CE over the mask (fp32) and accuracy metrics for one batch of logits."""
    s = token_stats(*ce_and_predictions(logits, batch["labels"]), batch)
    n_tok = jnp.maximum(s["tokens"].sum(), 1.0)
    metrics = {
        "loss": s["ce"].sum() / n_tok,
        "token_accuracy": s["correct"].sum() / n_tok,
        "sequence_accuracy": s["prefix"][:, -1].astype(jnp.float32).mean(),
    }
    return metrics["loss"], metrics


def make_train_step(
    graphdef: nnx.GraphDef,
    tx: optax.GradientTransformation,
    *,
    state_shardings: TrainState,
    batch_sharding: NamedSharding,
    schedule: optax.Schedule | None = None,
    token_fn: TokenFn = logits_token_fn,
    accum_steps: int = 1,
    donate: bool = True,
    compiler_options: dict[str, Any] | None = None,
) -> Callable[[TrainState, Batch], tuple[TrainState, dict]]:
    """``step(state, batch) -> (new_state, metrics)``, jitted with explicit shardings.

    Args:
      graphdef: the model's graph (``nnx.split(model, nnx.Param, ...)[0]``).
      tx: the Optax transformation whose state is ``state["opt_state"]``.
      state_shardings: a ``NamedSharding`` per leaf of the train state.
      batch_sharding: sharding of every batch array (batch dim over the data axes).
      schedule: reported as ``metrics["lr"]`` when given.
      token_fn: ``(model, batch) -> (ce fp32 [B, T], pred int32 [B, T])``.
      accum_steps: split the batch into this many micro-batches (rows ``j, j+A, j+2A, ...``
        form micro-batch ``j``, so each stays spread over all devices) and accumulate fp32
        gradients with ``lax.scan``; the loss is still the mean over the whole batch.
      donate: donate the input state buffers.
      compiler_options: XLA compile options of the jitted step (``dpjax.train.gemm``).
    """
    if accum_steps < 1:
        raise ValueError(f"accum_steps must be >= 1, got {accum_steps}")

    mesh = batch_sharding.mesh
    replicated = NamedSharding(mesh, jax.sharding.PartitionSpec())

    def step(state: TrainState, batch: Batch):
        params, rest = state["params"], state["rest"]
        n_tok = jnp.maximum(_mask(batch).sum(), 1.0)
        full = gather_parameters(params, replicated)

        def loss_of(p, micro):
            model = nnx.merge(graphdef, p, rest)
            s = token_stats(*token_fn(model, micro), micro)
            sums = {
                "ce": s["ce"].sum(),
                "correct": s["correct"].sum(),
                "seq_ok": s["prefix"][:, -1].astype(jnp.float32).sum(),
            }
            return sums["ce"] / n_tok, sums

        grad_fn = jax.value_and_grad(loss_of, has_aux=True)
        if accum_steps == 1:
            (_, sums), grads = grad_fn(full, batch)
        else:
            micro = jax.tree.map(lambda x: _split_micro(x, accum_steps), batch)

            def body(carry, mb):
                g_acc, s_acc = carry
                (_, s), g = grad_fn(full, mb)
                g_acc = jax.tree.map(lambda a, b: a + b.astype(jnp.float32), g_acc, g)
                return (g_acc, jax.tree.map(jnp.add, s_acc, s)), None

            zeros_g = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
            zeros_s = {k: jnp.zeros((), jnp.float32) for k in ("ce", "correct", "seq_ok")}
            (grads, sums), _ = jax.lax.scan(body, (zeros_g, zeros_s), micro)
            grads = jax.tree.map(lambda g, p: g.astype(p.dtype), grads, params)
        updates, opt_state = tx.update(grads, state["opt_state"], params)
        new_params = optax.apply_updates(params, updates)
        n_seq = batch["labels"].shape[0]
        metrics = {
            "loss": sums["ce"] / n_tok,
            "token_accuracy": sums["correct"] / n_tok,
            "sequence_accuracy": sums["seq_ok"] / n_seq,
            "grad_norm": optax.tree.norm(grads),
        }
        if schedule is not None:
            metrics["lr"] = jnp.asarray(schedule(state["step"]), jnp.float32)
        new_state = dict(state, step=state["step"] + 1, params=new_params, opt_state=opt_state)
        return new_state, metrics

    return jax.jit(
        step,
        in_shardings=(state_shardings, batch_sharding),
        out_shardings=(state_shardings, replicated),
        donate_argnums=(0,) if donate else (),
        compiler_options=compiler_options,
    )


def gather_parameters(params: nnx.State, replicated: NamedSharding) -> nnx.State:
    """The parameters replicated on every device for the step's compute (one all-gather per
    parameter where they are stored sharded, e.g. over the ``fsdp`` axis; a no-op otherwise).

    Left to propagate from FSDP-sharded weights, XLA splits the activations' model dimension
    over the ``fsdp`` axis instead of their batch: the step all-reduces ``[B, T, ·]`` partial
    sums inside every layer and repeats work across an ``fsdp`` group (tiny preset, 16 x 256
    tokens on 8 CPU devices: 45 MB of collectives per step against data parallelism's 2.2 MB
    at fsdp 2, 1.37x the FLOPs per device at fsdp 8; DP2-392M on two H200s at fsdp 2 ran at
    0.46x the data-parallel speed). Gathered, the compute is the data-parallel one (same
    FLOPs, parameter-sized collectives: ``tests/test_lm_parts.py``). The parameters and their
    gradients are whole on each device during the step; storage, optimizer state and update
    stay sharded.
    """
    return jax.lax.with_sharding_constraint(params, jax.tree.map(lambda _: replicated, params))


def _split_micro(x: jax.Array, accum: int) -> jax.Array:
    """``[B, ...] -> [accum, B // accum, ...]``; micro-batch ``j`` holds rows ``j::accum``."""
    if x.shape[0] % accum:
        raise ValueError(f"batch size {x.shape[0]} is not divisible by accum_steps={accum}")
    return x.reshape(x.shape[0] // accum, accum, *x.shape[1:]).swapaxes(0, 1)


def make_eval_step(
    graphdef: nnx.GraphDef,
    *,
    params_shardings: nnx.State,
    rest_shardings: nnx.State,
    batch_sharding: NamedSharding,
    token_fn: TokenFn = logits_token_fn,
    compiler_options: dict[str, Any] | None = None,
) -> Callable[[nnx.State, nnx.State, Batch, jax.Array], dict]:
    """``eval_step(params, rest, batch, weights [B]) -> sums`` (weights 0 mark padding rows).

    Returns fp32 sums over the batch (add them over batches, then divide):
    ``loss_sum`` and ``correct_sum`` (over weighted masked tokens), ``token_count``,
    ``sequence_count`` (sum of weights) and ``prefix_correct`` ``[T]``: weighted number of
    sequences correct at every position ``<= t`` (``dpjax.eval.accuracy``).
    ``compiler_options``: XLA compile options of the jitted step (``dpjax.train.gemm``).
    """

    mesh = batch_sharding.mesh
    replicated = NamedSharding(mesh, jax.sharding.PartitionSpec())

    def eval_step(params, rest, batch, weights):
        model = nnx.merge(graphdef, gather_parameters(params, replicated), rest)
        s = token_stats(*token_fn(model, batch), batch)
        w = weights.astype(jnp.float32)
        return {
            "loss_sum": (s["ce"] * w).sum(),
            "correct_sum": (s["correct"] * w).sum(),
            "token_count": (s["tokens"] * w).sum(),
            "sequence_count": w.sum(),
            "prefix_correct": (s["prefix"].astype(jnp.float32) * w[:, None]).sum(0),
        }

    weights_sharding = NamedSharding(mesh, jax.sharding.PartitionSpec(batch_sharding.spec[0]))
    return jax.jit(
        eval_step,
        in_shardings=(params_shardings, rest_shardings, batch_sharding, weights_sharding),
        out_shardings=replicated,
        compiler_options=compiler_options,
    )
