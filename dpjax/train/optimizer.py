"""Optax AdamW with a weight-decay mask, a cosine schedule (warmup, floor) and gradient clipping.

Example (the paper's state-tracking optimiser: AdamW 1e-3, wd 1e-6 on every parameter, cosine to 0
over the run, no warmup, no clipping)::

    cfg = OptimizerConfig(lr=1e-3, weight_decay=1e-6, no_decay=(), decay_embeddings=True)
    tx, schedule = make_optimizer(cfg, total_steps=4900, params=abstract_params)
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import jax
import optax
from flax import nnx

__all__ = ["OptimizerConfig", "decay_mask", "make_optimizer", "make_schedule", "param_path"]

SCHEDULES = ("cosine", "constant")


@dataclass(frozen=True)
class OptimizerConfig:
    """AdamW and learning-rate schedule settings.

    Attributes:
      lr: peak learning rate.
      weight_decay: decoupled weight decay (AdamW), applied where ``decay_mask`` is True.
      b1, b2, eps: Adam moments and epsilon.
      schedule: ``"cosine"`` (linear warmup, then cosine from ``lr`` to ``min_lr`` at the last
        step) or ``"constant"`` (warmup, then ``lr``).
      warmup_steps: linear warmup from 0 (0 = none).
      min_lr: the schedule's floor.
      grad_clip: clip by global norm (``None`` = no clipping).
      no_decay: case-insensitive substrings of a parameter path (``"mixer/o_norm/scale"``) that
        exclude it from weight decay. Empty = decay everything (the paper's state tracking).
      decay_embeddings: decay the token embedding (a parameter whose first logical axis is
        ``vocab``, or whose path contains ``embed``).
    """

    lr: float = 1e-3
    weight_decay: float = 0.0
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    schedule: str = "cosine"
    warmup_steps: int = 0
    min_lr: float = 0.0
    grad_clip: float | None = None
    no_decay: tuple[str, ...] = ("norm", "bias", "a_log", "dt_bias")
    decay_embeddings: bool = True

    def __post_init__(self):
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        if self.lr <= 0 or self.min_lr < 0 or self.min_lr > self.lr:
            raise ValueError(
                f"need 0 <= min_lr <= lr and lr > 0, got lr={self.lr}, min_lr={self.min_lr}"
            )
        if self.warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {self.warmup_steps}")
        if self.grad_clip is not None and self.grad_clip <= 0:
            raise ValueError(f"grad_clip must be > 0 or None, got {self.grad_clip}")
        object.__setattr__(self, "no_decay", tuple(self.no_decay))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> OptimizerConfig:
        return cls(**d)


def make_schedule(cfg: OptimizerConfig, total_steps: int) -> optax.Schedule:
    """Learning rate as a function of the step (``0 .. total_steps``)."""
    if total_steps < 1:
        raise ValueError(f"total_steps must be >= 1, got {total_steps}")
    warmup = min(cfg.warmup_steps, total_steps - 1)  # leave at least one step of decay
    if cfg.schedule == "constant":
        if warmup == 0:
            return optax.constant_schedule(cfg.lr)
        return optax.join_schedules(
            [optax.linear_schedule(0.0, cfg.lr, warmup), optax.constant_schedule(cfg.lr)],
            [warmup],
        )
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0 if warmup else cfg.lr,
        peak_value=cfg.lr,
        warmup_steps=warmup,
        decay_steps=total_steps,
        end_value=cfg.min_lr,
    )


def param_path(path) -> str:
    """``"a/b/c"`` from a ``jax.tree_util`` key path (``.value`` attributes dropped)."""
    parts = []
    for key in path:
        if isinstance(key, jax.tree_util.GetAttrKey):
            if key.name == "value":
                continue
            parts.append(key.name)
        elif isinstance(key, jax.tree_util.DictKey):
            parts.append(str(key.key))
        elif isinstance(key, jax.tree_util.SequenceKey):
            parts.append(str(key.idx))
        else:
            parts.append(str(key))
    return "/".join(parts)


def decay_mask(params: nnx.State, cfg: OptimizerConfig) -> nnx.State:
    """Same tree as ``params`` with bool leaves: True = apply weight decay."""
    patterns = tuple(p.lower() for p in cfg.no_decay)

    def one(path, var):
        name = param_path(path).lower()
        names = var.get_metadata().get("out_sharding") if isinstance(var, nnx.Variable) else None
        is_embedding = (bool(names) and tuple(names)[0] == "vocab") or "embed" in name
        decay = not any(p in name for p in patterns)
        if is_embedding and not cfg.decay_embeddings:
            decay = False
        return var.replace(decay) if isinstance(var, nnx.Variable) else decay

    return jax.tree_util.tree_map_with_path(
        one, params, is_leaf=lambda x: isinstance(x, nnx.Variable)
    )


def make_optimizer(
    cfg: OptimizerConfig, total_steps: int, params: nnx.State
) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """AdamW (+ optional global-norm clipping) and its schedule.

    Args:
      cfg: settings.
      total_steps: length of the run (the cosine reaches ``min_lr`` there).
      params: the parameter tree (abstract is fine), for the weight-decay mask.
    """
    schedule = make_schedule(cfg, total_steps)
    adamw = optax.adamw(
        schedule,
        b1=cfg.b1,
        b2=cfg.b2,
        eps=cfg.eps,
        weight_decay=cfg.weight_decay,
        mask=decay_mask(params, cfg),
    )
    tx = (
        adamw
        if cfg.grad_clip is None
        else optax.chain(optax.clip_by_global_norm(cfg.grad_clip), adamw)
    )
    return tx, schedule
