"""The training loop: mesh, sharded init, optimizer, jitted steps, evaluation, checkpoints, logs.

Task-agnostic: a task passes

* ``build_model``: a zero-argument callable returning the NNX model (deterministic, e.g. seeded
  ``nnx.Rngs``); it runs eagerly on every process and its parameters are then placed on the
  mesh;
* ``train_data``: a ``grain.IterDataset`` of host batches ``{"input_ids", "labels", ...}``
  (int32 ``[B, T]``; this process's rows);
* ``eval_sets``: name -> ``{"input_ids", "labels"[, "loss_mask"]}`` numpy arrays;
* ``config``: the JSON config stored with every checkpoint (``{"model": ..., "model_factory":
  ...}`` makes ``checkpoint.restore_from_dir`` work from the directory alone).

Example::

    cfg = TrainConfig(total_steps=1000, out_dir="runs/s3", eval_every=100,
                      optimizer=OptimizerConfig(lr=1e-3))
    result = train(cfg, build_model=lambda: DeltaProductLM(mcfg, rngs=nnx.Rngs(0)),
                   train_data=data.train, eval_sets={"val": data.val, "test": data.test},
                   config={"model": mcfg.to_dict()})
    result.final["test"].curve.accuracy   # accuracy vs length
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import grain
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from dpjax.eval.accuracy import AccuracyCurve
from dpjax.train import mesh as mesh_lib
from dpjax.train.checkpoint import Checkpointer, abstract_like, cast_floating
from dpjax.train.gemm import GEMM_CHOICES, gemm_compiler_options
from dpjax.train.logging import MetricsLogger, Progress
from dpjax.train.optimizer import OptimizerConfig, make_optimizer
from dpjax.train.step import TokenFn, logits_token_fn, make_eval_step, make_train_step

__all__ = [
    "EvalResult",
    "TrainConfig",
    "TrainResult",
    "evaluate",
    "init_train_state",
    "make_steps",
    "op_batch_parallel",
    "train",
]

PARAM_DTYPES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16"}


@dataclass(frozen=True)
class TrainConfig:
    """Run settings (everything except the model, the data and the task).

    Attributes:
      total_steps: optimizer steps of the full run (the LR schedule spans them).
      out_dir: run directory (``metrics.jsonl``, ``tb/``, ``checkpoints/``); ``None`` = no files.
      param_dtype: cast floating parameters (and so the Adam moments) to ``"float32"`` or
        ``"bfloat16"`` after init; ``None`` keeps the dtypes the model creates (the paper's state
        tracking runs the whole model in bf16: set the model config's dtypes instead).
      log_every: steps between train-metric log lines.
      eval_every: steps between evaluations of every eval set (``None`` = only at the end).
      checkpoint_every: steps between checkpoints (``None`` = only at the end; needs out_dir).
      keep_checkpoints: how many step directories to keep.
      resume: continue from the latest checkpoint in ``out_dir/checkpoints`` if there is one.
      stop_at: stop after this step as if interrupted (checkpointing first); the schedule still
        spans ``total_steps``. ``None`` = run to the end.
      time_limit: seconds of wall time (from the call of ``train``) after which the run stops at
        the next log point as if interrupted: evaluation, checkpoint, ``TrainResult.time_limited``;
        ``resume`` continues it. Every process takes process 0's decision. ``None`` = no limit.
      early_stop_metric / early_stop_target: stop when an evaluation gives
        ``metric >= target`` (e.g. ``"test/sequence_accuracy"``, 0.99).
      eval_batch_size: rows per eval batch (rounded up to a multiple of the device count).
      fsdp: size of the mesh's ``fsdp`` axis (1 = data parallel).
      accum_steps: gradient accumulation: each batch is split into this many micro-batches.
      progress: show a tqdm bar; tensorboard: also write TensorBoard events.
      gemm: GEMM emitter of the dense layers on a GPU: ``"auto"`` (cuBLAS where a dense
        kernel has a side not a multiple of 8, else XLA's choice), ``"xla"``, ``"cublas"``
        (``dpjax.train.gemm``).
      optimizer: AdamW and schedule settings.
    """

    total_steps: int
    out_dir: str | None = None
    param_dtype: str | None = None
    log_every: int = 10
    eval_every: int | None = None
    checkpoint_every: int | None = None
    keep_checkpoints: int = 2
    resume: bool = False
    stop_at: int | None = None
    time_limit: float | None = None
    early_stop_metric: str | None = None
    early_stop_target: float | None = None
    eval_batch_size: int = 256
    fsdp: int = 1
    accum_steps: int = 1
    progress: bool = True
    tensorboard: bool = True
    gemm: str = "auto"
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)

    def __post_init__(self):
        if self.total_steps < 1:
            raise ValueError(f"total_steps must be >= 1, got {self.total_steps}")
        if self.param_dtype is not None:
            if self.param_dtype not in PARAM_DTYPES:
                raise ValueError(
                    f"param_dtype must be None or one of {sorted(PARAM_DTYPES)}, got "
                    f"{self.param_dtype!r}"
                )
            object.__setattr__(self, "param_dtype", PARAM_DTYPES[self.param_dtype])
        if self.accum_steps < 1:
            raise ValueError(f"accum_steps must be >= 1, got {self.accum_steps}")
        if self.gemm not in GEMM_CHOICES:
            raise ValueError(f"gemm must be one of {GEMM_CHOICES}, got {self.gemm!r}")
        for name in ("log_every", "eval_every", "checkpoint_every", "eval_batch_size"):
            v = getattr(self, name)
            if v is not None and v < 1:
                raise ValueError(f"{name} must be >= 1 (or None), got {v}")
        if self.time_limit is not None and not self.time_limit > 0:
            raise ValueError(f"time_limit must be > 0 seconds (or None), got {self.time_limit}")
        if (self.early_stop_metric is None) != (self.early_stop_target is None):
            raise ValueError(
                "early_stop_metric and early_stop_target go together, got "
                f"{self.early_stop_metric!r} and {self.early_stop_target!r}"
            )

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["optimizer"] = self.optimizer.to_dict()
        return d


@dataclass
class EvalResult:
    """Metrics of one eval set: weighted means over its sequences and the accuracy curve."""

    loss: float
    token_accuracy: float
    sequence_accuracy: float
    num_sequences: int
    curve: AccuracyCurve

    def scalars(self, prefix: str) -> dict[str, float]:
        return {
            f"{prefix}/loss": self.loss,
            f"{prefix}/token_accuracy": self.token_accuracy,
            f"{prefix}/sequence_accuracy": self.sequence_accuracy,
        }


@dataclass
class TrainResult:
    """What a run returns.

    Attributes:
      model: the trained model (``nnx.merge`` of the final state).
      state: the final train state.
      step: the last completed step.
      train_losses: step -> training loss of that step (this process's run only).
      evals: ``(step, {name: EvalResult})`` for every evaluation of this run.
      final: the last evaluation (``{}`` if there are no eval sets).
      stopped_early: the early-stop target was reached.
      time_limited: the run stopped at ``TrainConfig.time_limit`` before its last step.
      seconds: wall time of this run.
      throughput: ``{"tokens_per_s", "steps_per_s", "mfu", "measured_steps"}`` over this run's
        training steps (the first step, which compiles, and eval/checkpoint time excluded);
        ``mfu`` is None without ``flops_per_token``/``peak_flops``; None if nothing was measured.
    """

    model: nnx.Module
    state: dict
    step: int
    train_losses: dict[int, float]
    evals: list[tuple[int, dict[str, EvalResult]]]
    final: dict[str, EvalResult]
    stopped_early: bool
    seconds: float
    throughput: dict[str, float | None] | None = None
    time_limited: bool = False


class _Throughput:
    """Tokens/s and MFU over training windows; time outside ``window()`` spans is excluded."""

    def __init__(self, flops_per_token: float | None, peak_flops: float | None, devices: int):
        self.fpt, self.peak, self.devices = flops_per_token, peak_flops, devices
        self.mark: float | None = None
        self.tokens = self.steps = 0
        self.seconds = 0.0
        self._win_tokens = self._win_steps = 0

    def restart(self) -> None:
        """Start timing now (after compilation, evaluation or checkpointing)."""
        self.mark = time.perf_counter()
        self._win_tokens = self._win_steps = 0

    def add(self, tokens: int) -> None:
        if self.mark is not None:
            self._win_tokens += tokens
            self._win_steps += 1

    def close_window(self) -> dict[str, float]:
        """Call after the window's results were fetched (device idle); returns window metrics."""
        if self.mark is None or not self._win_steps:
            return {}
        dt = max(time.perf_counter() - self.mark, 1e-9)
        self.tokens += self._win_tokens
        self.steps += self._win_steps
        self.seconds += dt
        out = {"perf/tokens_per_s": self._win_tokens / dt, "perf/steps_per_s": self._win_steps / dt}
        if self.fpt and self.peak:
            out["perf/mfu"] = out["perf/tokens_per_s"] * self.fpt / (self.peak * self.devices)
        self.restart()
        return out

    def summary(self) -> dict[str, float | None] | None:
        if not self.steps:
            return None
        tps = self.tokens / self.seconds
        mfu = tps * self.fpt / (self.peak * self.devices) if self.fpt and self.peak else None
        return {
            "tokens_per_s": tps,
            "steps_per_s": self.steps / self.seconds,
            "mfu": mfu,
            "measured_steps": self.steps,
        }


def init_train_state(
    build_model: Callable[[], nnx.Module],
    cfg: TrainConfig,
    mesh: jax.sharding.Mesh,
    rules: mesh_lib.Rules,
):
    """Create the sharded train state and everything needed to step it.

    Returns:
      ``(graphdef, state, state_shardings, tx, schedule)``; ``state`` is
      ``{"step", "params", "rest", "opt_state"}`` with parameters in ``cfg.param_dtype``.
    """
    with nnx.use_eager_sharding(False):
        abstract = nnx.eval_shape(build_model)
    graphdef, abs_params, abs_rest = nnx.split(abstract, nnx.Param, ...)
    p_sh = mesh_lib.state_shardings(abs_params, mesh, rules)
    r_sh = mesh_lib.state_shardings(abs_rest, mesh, rules)
    tx, schedule = make_optimizer(cfg.optimizer, cfg.total_steps, abs_params)
    dtype = cfg.param_dtype

    # Eager, not one jit: XLA compiles every random initialiser of a jitted init as its own
    # fusion (24 s for the 392M preset on a CPU; XLA's slow-compile alarm on the GPU host), while
    # eager calls reuse one small executable per distinct parameter shape.
    with nnx.use_eager_sharding(False):
        model = build_model()
    _, params, rest = nnx.split(model, nnx.Param, ...)
    if dtype is not None:
        params = cast_floating(params, dtype)
    params, rest = place(params, p_sh), place(rest, r_sh)
    abs_opt = jax.eval_shape(tx.init, params)
    rep = mesh_lib.replicated(mesh)
    o_sh = _opt_shardings(tx, abs_opt, p_sh, rep)
    opt_state = jax.jit(tx.init, out_shardings=o_sh)(params)
    state = {
        "step": jax.device_put(jnp.zeros((), jnp.int32), rep),
        "params": params,
        "rest": rest,
        "opt_state": opt_state,
    }
    shardings = {"step": rep, "params": p_sh, "rest": r_sh, "opt_state": o_sh}
    return graphdef, state, shardings, tx, schedule


def make_steps(
    graphdef: nnx.GraphDef,
    tx: optax.GradientTransformation,
    shardings: dict,
    mesh: jax.sharding.Mesh,
    schedule: optax.Schedule | None,
    token_fn: TokenFn = logits_token_fn,
    accum_steps: int = 1,
    compiler_options: dict[str, Any] | None = None,
):
    """``(train_step, eval_step)`` for the state ``init_train_state`` made (batches sharded over
    the mesh's data axes), both compiled with ``compiler_options`` (e.g.
    ``dpjax.train.gemm.gemm_compiler_options``); see ``dpjax.train.step``."""
    batch_sh = mesh_lib.batch_sharding(mesh)
    train_step = make_train_step(
        graphdef,
        tx,
        state_shardings=shardings,
        batch_sharding=batch_sh,
        schedule=schedule,
        token_fn=token_fn,
        accum_steps=accum_steps,
        compiler_options=compiler_options,
    )
    eval_step = make_eval_step(
        graphdef,
        params_shardings=shardings["params"],
        rest_shardings=shardings["rest"],
        batch_sharding=batch_sh,
        token_fn=token_fn,
        compiler_options=compiler_options,
    )
    return train_step, eval_step


def place(tree, shardings):
    """Put a tree of arrays that every process holds in full onto ``shardings`` (global arrays;
    each process keeps only its addressable shards)."""

    def one(x, sharding):
        if sharding.is_fully_addressable:
            return jax.device_put(x, sharding)
        host = np.asarray(x)
        return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])

    return jax.tree.map(one, tree, shardings)


def _opt_shardings(tx, abs_opt, param_shardings, replicated):
    import optax

    return optax.tree_map_params(
        tx,
        lambda _, s: s,
        abs_opt,
        param_shardings,
        transform_non_params=lambda _: replicated,
        is_leaf=lambda x: isinstance(x, jax.sharding.NamedSharding),
    )


def evaluate(
    eval_step: Callable,
    params,
    rest,
    arrays: Mapping[str, np.ndarray],
    *,
    batch_size: int,
    mesh: jax.sharding.Mesh,
    train_length: int | None = None,
) -> EvalResult:
    """Run ``eval_step`` over ``arrays`` (``{"input_ids", "labels"[, ...]}`` ``[N, T]``).

    Rows are padded to whole batches with weight 0, so every batch has the same static shape.
    Every process passes the same (global) arrays and feeds its own slice of each batch.
    """
    n = len(arrays["labels"])
    if n == 0:
        raise ValueError("evaluate: empty eval set")
    n_dev = mesh.size
    batch_size = max(n_dev, math.ceil(min(batch_size, n) / n_dev) * n_dev)
    n_proc, proc = jax.process_count(), jax.process_index()
    local = slice(proc * batch_size // n_proc, (proc + 1) * batch_size // n_proc)
    totals: dict[str, Any] = {}
    for start in range(0, n, batch_size):
        rows = {k: v[start : start + batch_size] for k, v in arrays.items()}
        m = len(rows["labels"])
        weights = np.zeros(batch_size, np.float32)
        weights[:m] = 1.0
        if m < batch_size:
            rows = {
                k: np.concatenate([v, np.repeat(v[-1:], batch_size - m, axis=0)])
                for k, v in rows.items()
            }
        rows["__weights"] = weights
        batch = mesh_lib.shard_batch({k: v[local] for k, v in rows.items()}, mesh)
        w = batch.pop("__weights")
        out = eval_step(params, rest, batch, w)
        totals = out if not totals else jax.tree.map(jnp.add, totals, out)
    t = jax.device_get(totals)
    count = float(t["sequence_count"])
    tokens = max(float(t["token_count"]), 1.0)
    curve = AccuracyCurve.from_counts(t["prefix_correct"], count, train_length)
    return EvalResult(
        loss=float(t["loss_sum"]) / tokens,
        token_accuracy=float(t["correct_sum"]) / tokens,
        sequence_accuracy=curve.sequence_accuracy,
        num_sequences=int(round(count)),
        curve=curve,
    )


def train(
    cfg: TrainConfig,
    *,
    build_model: Callable[[], nnx.Module],
    train_data: grain.IterDataset,
    eval_sets: Mapping[str, Mapping[str, np.ndarray]] | None = None,
    config: Mapping[str, Any] | None = None,
    train_length: int | None = None,
    mesh: jax.sharding.Mesh | None = None,
    rules: mesh_lib.Rules | None = None,
    token_fn: TokenFn = logits_token_fn,
    flops_per_token: float | None = None,
    peak_flops: float | None = None,
    portable_data_state: bool = False,
) -> TrainResult:
    """Train ``build_model()`` on ``train_data``; see the module docstring.

    Args:
      cfg: run settings.
      build_model: zero-argument model constructor.
      train_data: Grain dataset of host batches.
      eval_sets: name -> arrays, evaluated every ``cfg.eval_every`` steps and at the end.
      config: JSON-able dict saved with checkpoints (``"run"`` is added from ``cfg``).
      train_length: marked on accuracy curves.
      mesh, rules: default ``make_mesh(cfg.fsdp)`` and ``default_rules(fsdp=cfg.fsdp > 1)``.
      token_fn: ``(model, batch) -> (ce fp32 [B, T], pred int32 [B, T])`` for train and eval
        steps (``dpjax.train.step.logits_token_fn`` by default).
      flops_per_token, peak_flops: model FLOPs per trained token and the peak FLOP/s of one
        device, for the MFU in the logs (``perf/mfu``) and ``TrainResult.throughput``.
      portable_data_state: the data iterator's state means the same for any process count
        (``dpjax.train.lm_data``), so a checkpoint resumes with another number of processes.
    """
    t0 = time.time()
    eval_sets = dict(eval_sets or {})
    if cfg.early_stop_metric is not None:
        set_name = cfg.early_stop_metric.split("/")[0]
        if set_name not in eval_sets:
            raise ValueError(
                f"early_stop_metric {cfg.early_stop_metric!r} names eval set {set_name!r}, but "
                f"the eval sets are {sorted(eval_sets)}"
            )
    mesh = mesh or mesh_lib.make_mesh(cfg.fsdp)
    rules = rules or mesh_lib.default_rules(fsdp=cfg.fsdp > 1)
    is_main = jax.process_index() == 0
    config = dict(config or {}, run=cfg.to_dict())

    graphdef, state, shardings, tx, schedule = init_train_state(build_model, cfg, mesh, rules)
    compiler_options = gemm_compiler_options(cfg.gemm, state["params"])
    if compiler_options and is_main:
        print(f"dense-layer GEMMs: cuBLAS (gemm={cfg.gemm!r}; XLA options {compiler_options})")
    train_step, eval_step = make_steps(
        graphdef,
        tx,
        shardings,
        mesh,
        schedule,
        token_fn,
        accum_steps=cfg.accum_steps,
        compiler_options=compiler_options,
    )
    perf = _Throughput(flops_per_token, peak_flops, mesh.size)
    data_iter = iter(train_data)

    ckpt = None
    if cfg.out_dir is not None:
        ckpt = Checkpointer(
            os.path.join(cfg.out_dir, "checkpoints"), max_to_keep=cfg.keep_checkpoints
        )
    start = 0
    bar_total = cfg.total_steps if cfg.stop_at is None else min(cfg.stop_at, cfg.total_steps)
    logger = MetricsLogger(cfg.out_dir, tensorboard=cfg.tensorboard, enabled=is_main)
    if cfg.resume and ckpt is not None and ckpt.latest_step() is not None:
        state = ckpt.restore(abstract_like(state), data_iter, portable_data=portable_data_state)
        start = int(jax.device_get(state["step"]))
    progress = Progress(bar_total, initial=start, enabled=cfg.progress and is_main)
    if start:
        progress.write(f"resumed from step {start} ({ckpt.directory})")

    def run_evals(step: int) -> dict[str, EvalResult]:
        res = {
            name: evaluate(
                eval_step,
                state["params"],
                state["rest"],
                arrays,
                batch_size=cfg.eval_batch_size,
                mesh=mesh,
                train_length=train_length,
            )
            for name, arrays in eval_sets.items()
        }
        flat = _flat_scalars(res)
        logger.write(step, flat)
        if flat:
            progress.write(f"step {step}: " + ", ".join(f"{k}={v:.4f}" for k, v in flat.items()))
        return res

    def save(step: int) -> None:
        if ckpt is not None and ckpt.latest_step() != step:
            ckpt.save(step, state, data_iter, config)

    train_losses: dict[int, float] = {}
    evals: list[tuple[int, dict[str, EvalResult]]] = []
    pending: list[tuple[int, dict]] = []
    stopped_early = time_limited = False
    step = start

    def flush() -> None:
        if not pending:
            return
        fetched = jax.device_get(pending)
        for s, m in fetched:
            train_losses[s] = float(m["loss"])
        window = {f"train/{k}": float(np.mean([m[k] for _, m in fetched])) for k in fetched[-1][1]}
        window["train/lr"] = float(fetched[-1][1].get("lr", np.nan))
        window.update(perf.close_window())
        logger.write(fetched[-1][0], window)
        progress.update(0, {"loss": window["train/loss"], "acc": window["train/token_accuracy"]})
        pending.clear()

    stack = contextlib.ExitStack()
    try:
        stack.enter_context(op_batch_parallel(mesh))  # Pallas kernels run under shard_map
        while step < bar_total:
            try:
                host_batch = next(data_iter)
            except StopIteration:
                progress.write(f"training data exhausted after step {step}")
                break
            state, metrics = train_step(state, mesh_lib.shard_batch(host_batch, mesh))
            step += 1
            perf.add(int(np.size(host_batch["input_ids"])) * jax.process_count())
            pending.append((step, metrics))
            progress.update(1)
            if perf.mark is None:  # the first step compiled: time from here on
                jax.block_until_ready(metrics)
                perf.restart()
            if step % cfg.log_every == 0:
                flush()
                if _out_of_time(cfg.time_limit, t0) and step < bar_total:
                    time_limited = True
                    progress.write(f"time limit of {cfg.time_limit:.0f} s reached at step {step}")
                    break
            if cfg.eval_every and step % cfg.eval_every == 0 and eval_sets:
                flush()
                evals.append((step, run_evals(step)))
                perf.restart()
                if _reached(cfg, evals[-1][1]):
                    stopped_early = True
                    progress.write(
                        f"early stop at step {step}: {cfg.early_stop_metric} >= "
                        f"{cfg.early_stop_target}"
                    )
                    break
            if cfg.checkpoint_every and step % cfg.checkpoint_every == 0:
                flush()
                save(step)
                perf.restart()
        flush()
        if eval_sets and (not evals or evals[-1][0] != step):
            evals.append((step, run_evals(step)))
            stopped_early = stopped_early or _reached(cfg, evals[-1][1])
        save(step)
    finally:
        stack.close()
        progress.close()
        logger.close()
        if ckpt is not None:
            ckpt.wait()
            ckpt.close()
    model = nnx.merge(graphdef, state["params"], state["rest"])
    return TrainResult(
        model=model,
        state=state,
        step=step,
        train_losses=train_losses,
        evals=evals,
        final=evals[-1][1] if evals else {},
        stopped_early=stopped_early,
        time_limited=time_limited,
        seconds=time.time() - t0,
        throughput=perf.summary(),
    )


def _out_of_time(limit: float | None, t0: float) -> bool:
    """Whether ``limit`` seconds have passed since ``t0``, as process 0 sees it (the same answer
    on every process, so that all of them stop at the same step)."""
    if limit is None:
        return False
    late = np.asarray(time.time() - t0 > limit)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        late = multihost_utils.broadcast_one_to_all(late)
    return bool(late)


def op_batch_parallel(mesh: jax.sharding.Mesh) -> contextlib.AbstractContextManager:
    """Context under which the op's Pallas kernels run per device (``jax.shard_map`` over the
    batch axes, ``dpjax.ops.sharded``): a ``pallas_call`` is not partitioned by XLA. Steps must
    be traced (first called) inside it. The pure-JAX implementations are unaffected."""
    try:
        from dpjax.ops import sharded
    except ImportError:  # pragma: no cover - older checkouts without the wrapper
        return contextlib.nullcontext()
    return sharded.batch_parallel(mesh, mesh_lib.BATCH_AXES)


def _flat_scalars(results: Mapping[str, EvalResult]) -> dict[str, float]:
    """``{"<set>/<metric>": value}`` over every eval set's scalars."""
    return {k: v for name, r in results.items() for k, v in r.scalars(name).items()}


def _reached(cfg: TrainConfig, results: Mapping[str, EvalResult]) -> bool:
    if cfg.early_stop_metric is None:
        return False
    flat = _flat_scalars(results)
    if cfg.early_stop_metric not in flat:
        raise ValueError(
            f"early_stop_metric {cfg.early_stop_metric!r} is not an eval metric; "
            f"available: {sorted(flat)}"
        )
    return flat[cfg.early_stop_metric] >= cfg.early_stop_target
