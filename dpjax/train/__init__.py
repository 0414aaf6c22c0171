"""Reusable training: mesh + sharding rules (``mesh``), Optax AdamW (``optimizer``), jitted
train/eval steps (``step``), Orbax checkpoints (``checkpoint``), progress and metrics
(``logging``), and the loop tying them together (``loop``).

Nothing here knows about a particular task: a task provides a model builder, a Grain training
dataset of ``{"input_ids", "labels"[, "loss_mask", "segment_ids"]}`` batches and evaluation
arrays.

Language-model helpers: ``lm_data`` (batches from packed text shards that do not depend on the
process count), ``lm_step`` (per-block remat and a blockwise output head as the step's
``token_fn``), ``flops`` (parameter counts, FLOPs per token, peak FLOP/s for MFU) and
``distributed`` (``jax.distributed.initialize`` from flags, env vars or Slurm).
"""
