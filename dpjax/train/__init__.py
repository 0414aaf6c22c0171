"""Reusable training: mesh + sharding rules (``mesh``), Optax AdamW (``optimizer``), jitted
train/eval steps (``step``), Orbax checkpoints (``checkpoint``), progress and metrics
(``logging``), and the loop tying them together (``loop``).

Nothing here knows about a particular task: a task provides a model builder, a Grain training
dataset of ``{"input_ids", "labels"[, "loss_mask", "segment_ids"]}`` batches and evaluation
arrays.
"""
