"""Orbax checkpoints: model, optimizer, data iterator and JSON config in one step directory.

Layout of ``<ckpt_dir>/<step>/`` (Orbax V0 ``CheckpointManager``, async saves, keep-N):

* ``model``: ``{"params": nnx.State, "rest": nnx.State}`` (enough to evaluate or generate),
* ``train``: ``{"step": int32, "opt_state": optax state}``,
* ``data``: the Grain ``DatasetIterator`` state (per process), so a resumed run sees exactly the
  batches it would have seen,
* ``config``: JSON ``{"model": <model config dict>, "model_factory": "module:callable",
  "run": {...}, ...}``.

Restores go into abstract targets whose leaves carry concrete ``NamedSharding``s (not
``nnx.eval_shape``'s ``AbstractMesh`` ones: JAX_NOTES §0.11), so they work on any mesh.

Example::

    ckpt = Checkpointer(out_dir / "checkpoints", max_to_keep=2)
    ckpt.save(step, state, data_iter, config)          # async; ckpt.wait() before reading
    state = ckpt.restore(abstract_like(state), data_iter)          # resume
    model, config, step = restore_from_dir(out_dir / "checkpoints") # evaluate from the dir alone
"""

from __future__ import annotations

import functools
import glob
import importlib
import json
import os
from collections.abc import Callable, Mapping
from typing import Any

import grain
import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from flax import nnx
from jax.sharding import Mesh

from dpjax.train import mesh as mesh_lib

__all__ = [
    "Checkpointer",
    "abstract_like",
    "build_from_factory",
    "cast_floating",
    "read_config",
    "restore_from_dir",
]

DEFAULT_MODEL_FACTORY = "dpjax.train.checkpoint:build_delta_product_lm"


def abstract_like(tree):
    """``jax.ShapeDtypeStruct`` (with the leaf's sharding) for every array leaf of ``tree``."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)


def cast_floating(tree, dtype):
    """Cast floating-point leaves (arrays or ``ShapeDtypeStruct``) to ``dtype``."""
    dtype = jnp.dtype(dtype)

    def one(x):
        if not jnp.issubdtype(x.dtype, jnp.floating) or x.dtype == dtype:
            return x
        if isinstance(x, jax.ShapeDtypeStruct):
            return jax.ShapeDtypeStruct(x.shape, dtype, sharding=x.sharding)
        return x.astype(dtype)

    return jax.tree.map(one, tree)


class Checkpointer:
    """A thin wrapper over ``ocp.CheckpointManager`` for the train-state layout above.

    Args:
      directory: the checkpoint root (created if missing).
      max_to_keep: keep the newest N step directories (``None`` = all).
      async_save: write in the background (call ``wait()`` before reading / exiting).
    """

    def __init__(
        self, directory: str | os.PathLike, *, max_to_keep: int | None = 2, async_save: bool = True
    ):
        self.directory = os.path.abspath(os.fspath(directory))
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(
                max_to_keep=max_to_keep, enable_async_checkpointing=async_save, create=True
            ),
        )

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def save(
        self,
        step: int,
        state: Mapping[str, Any],
        data_iter: grain.DatasetIterator | None,
        config: Mapping[str, Any],
    ) -> bool:
        """Save the train state (``{"step", "params", "rest", "opt_state"}``) at ``step``."""
        items = {
            "model": ocp.args.StandardSave({"params": state["params"], "rest": state["rest"]}),
            "train": ocp.args.StandardSave(
                {"step": state["step"], "opt_state": state["opt_state"]}
            ),
            "config": ocp.args.JsonSave(dict(config)),
        }
        if data_iter is not None:
            items["data"] = grain.checkpoint.CheckpointSave(data_iter)
        return self.manager.save(int(step), args=ocp.args.Composite(**items), force=True)

    def restore(
        self,
        target: Mapping[str, Any],
        data_iter: grain.DatasetIterator | None = None,
        step: int | None = None,
        *,
        portable_data: bool = False,
    ) -> dict[str, Any]:
        """Restore the train state into ``target`` (abstract, with shardings) and, in place,
        the data iterator. Returns the train state dict.

        ``portable_data``: the iterator's state is the same in every process and means the same
        for any process count (``dpjax.train.lm_data``); a checkpoint written by another number
        of processes then restores process 0's state into every process (Grain alone would look
        for ``process_<i>-of-<n>.json`` of the current count and fail).
        """
        step = self._step(step)
        if data_iter is not None and portable_data:
            foreign = self._foreign_data_state(step)
            if foreign is not None:
                with open(foreign) as f:
                    data_iter.set_state(json.load(f))
                data_iter = None
        items = {
            "model": ocp.args.StandardRestore({"params": target["params"], "rest": target["rest"]}),
            "train": ocp.args.StandardRestore(
                {"step": target["step"], "opt_state": target["opt_state"]}
            ),
        }
        if data_iter is not None:
            items["data"] = grain.checkpoint.CheckpointRestore(data_iter)
        r = self.manager.restore(step, args=ocp.args.Composite(**items))
        return {
            "step": r["train"]["step"],
            "params": r["model"]["params"],
            "rest": r["model"]["rest"],
            "opt_state": r["train"]["opt_state"],
        }

    def _foreign_data_state(self, step: int) -> str | None:
        """Process 0's data-state file when none matches this run's process count."""
        data_dir = os.path.join(self.directory, str(step), "data")
        pi, pc = jax.process_index(), jax.process_count()
        if os.path.exists(os.path.join(data_dir, f"process_{pi}-of-{pc}.json")):
            return None
        found = sorted(glob.glob(os.path.join(data_dir, "process_0-of-*.json")))
        return found[0] if found else None

    def restore_model(self, params, rest, step: int | None = None) -> tuple[Any, Any]:
        """Restore only ``(params, rest)`` into abstract targets."""
        r = self.manager.restore(
            self._step(step),
            args=ocp.args.Composite(
                model=ocp.args.StandardRestore({"params": params, "rest": rest})
            ),
        )
        return r["model"]["params"], r["model"]["rest"]

    def config(self, step: int | None = None) -> dict:
        r = self.manager.restore(
            self._step(step), args=ocp.args.Composite(config=ocp.args.JsonRestore())
        )
        return dict(r["config"])

    def _step(self, step: int | None) -> int:
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        return int(step)

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()


def read_config(ckpt_dir: str | os.PathLike, step: int | None = None) -> dict:
    """The JSON config stored with a checkpoint (latest step by default)."""
    ckpt = Checkpointer(ckpt_dir, max_to_keep=None, async_save=False)
    try:
        return ckpt.config(step)
    finally:
        ckpt.close()


def build_delta_product_lm(model_config: Mapping[str, Any], seed: int = 0) -> nnx.Module:
    """Default factory: ``DeltaProductLM(DeltaProductConfig.from_dict(model_config))``."""
    from dpjax.nn import DeltaProductConfig, DeltaProductLM

    return DeltaProductLM(DeltaProductConfig.from_dict(dict(model_config)), rngs=nnx.Rngs(seed))


def build_from_factory(factory: str, model_config: Mapping[str, Any]) -> nnx.Module:
    """Call ``"package.module:callable"`` with the model config dict."""
    module_name, _, attr = factory.partition(":")
    if not module_name or not attr:
        raise ValueError(f"model_factory must look like 'package.module:callable', got {factory!r}")
    fn = getattr(importlib.import_module(module_name), attr)
    return fn(dict(model_config))


def restore_from_dir(
    ckpt_dir: str | os.PathLike,
    *,
    step: int | None = None,
    build_model: Callable[[Mapping[str, Any]], nnx.Module] | None = None,
    mesh: Mesh | None = None,
    rules: mesh_lib.Rules | None = None,
) -> tuple[nnx.Module, dict, int]:
    """Rebuild the model from a checkpoint directory alone.

    The model is rebuilt from the stored config (``config["model"]`` through
    ``config["model_factory"]``, or ``build_model(config["model"])``), its parameters restored
    onto ``mesh`` (default: all devices, replicated) in the dtype they were saved in.

    Returns:
      ``(model, config, step)``.
    """
    ckpt = Checkpointer(ckpt_dir, max_to_keep=None, async_save=False)
    try:
        step = ckpt._step(step)
        config = ckpt.config(step)
        if "model" not in config:
            raise ValueError(f"checkpoint config in {ckpt_dir} has no 'model' entry: {config}")
        factory = config.get("model_factory", DEFAULT_MODEL_FACTORY)
        make = build_model or functools.partial(build_from_factory, factory)

        def build():
            return make(config["model"])

        mesh = mesh or mesh_lib.make_mesh()
        rules = rules or mesh_lib.default_rules()
        with nnx.use_eager_sharding(False):
            abstract = nnx.eval_shape(build)
        graphdef, params, rest = nnx.split(abstract, nnx.Param, ...)
        param_dtype = config.get("run", {}).get("param_dtype")
        p_sh = mesh_lib.state_shardings(params, mesh, rules)
        r_sh = mesh_lib.state_shardings(rest, mesh, rules)

        def with_sharding(tree, shardings):
            return jax.tree.map(
                lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings
            )

        params_t = with_sharding(params, p_sh)
        if param_dtype:
            params_t = cast_floating(params_t, param_dtype)
        params, rest = ckpt.restore_model(params_t, with_sharding(rest, r_sh), step)
        return nnx.merge(graphdef, params, rest), config, step
    finally:
        ckpt.close()
