"""The training loop on a tiny stand-in NNX model: loss falls, exact resume, restore from the
checkpoint directory alone, data parallelism over 8 simulated CPU devices matches 1 device."""

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dpjax.data.state_tracking import StateTrackingDataConfig, build
from dpjax.train import mesh as mesh_lib
from dpjax.train.checkpoint import read_config, restore_from_dir
from dpjax.train.loop import TrainConfig, train
from dpjax.train.optimizer import OptimizerConfig
from dpjax.train.step import logits_token_fn

DATA = StateTrackingDataConfig(
    group="Z3",
    k=8,
    k_test=16,
    train_samples=1024,
    test_samples=64,
    batch_size=32,
    epochs=2,
    seed=3,
    read_threads=1,
    prefetch=2,
)
MODEL = {"vocab_size": 10, "hidden_size": 16}


class TinyLM(nnx.Module):
    """Stand-in with DeltaProductLM's call signature: embedding, causal prefix mean, a
    tanh layer, RMS-style scale and an untied head; logical sharding names on every param."""

    def __init__(self, config: dict, *, rngs: nnx.Rngs):
        V, D = config["vocab_size"], config["hidden_size"]
        normal = nnx.initializers.normal(0.1)
        self.embed = nnx.Param(normal(rngs.params(), (V, D)), out_sharding=("vocab", "embed"))
        self.w = nnx.Param(
            nnx.initializers.lecun_normal()(rngs.params(), (2 * D, 4 * D)),
            out_sharding=("embed", "mlp"),
        )
        self.norm = nnx.Param(jnp.ones((4 * D,)), out_sharding=(None,))
        self.head = nnx.Param(normal(rngs.params(), (4 * D, V)), out_sharding=("mlp", "vocab"))

    def __call__(self, input_ids, segment_ids=None, attention_mask=None):
        x = jnp.take(self.embed[...], input_ids, axis=0)
        mean = jnp.cumsum(x, axis=1) / jnp.arange(1, x.shape[1] + 1)[None, :, None]
        h = jnp.tanh(jnp.concatenate([x, mean], -1) @ self.w[...]) * self.norm[...]
        return (h @ self.head[...]).astype(jnp.float32)


def build_tiny(config: dict) -> TinyLM:
    return TinyLM(config, rngs=nnx.Rngs(0))


def _run(out_dir=None, *, mesh=None, **overrides):
    data = build(DATA)
    cfg = TrainConfig(
        **dict(
            dict(
                total_steps=DATA.total_steps(),
                out_dir=out_dir,
                log_every=4,
                progress=False,
                tensorboard=True,
                optimizer=OptimizerConfig(lr=1e-2, warmup_steps=5),
            ),
            **overrides,
        )
    )
    return train(
        cfg,
        build_model=lambda: build_tiny(MODEL),
        train_data=data.train,
        eval_sets={"val": data.val, "test": data.test},
        config={
            "model": MODEL,
            "model_factory": "test_train_loop:build_tiny",
            "data": DATA.to_dict(),
        },
        train_length=DATA.k,
        mesh=mesh,
    )


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("full")
    return out, _run(str(out), eval_every=21, checkpoint_every=21)


def test_loss_falls_and_outputs_exist(full_run):
    out, res = full_run
    assert res.step == DATA.total_steps() == 63
    losses = [res.train_losses[s] for s in sorted(res.train_losses)]
    assert len(losses) == 63
    assert np.mean(losses[-5:]) < 0.6 * np.mean(losses[:5])
    assert [s for s, _ in res.evals] == [21, 42, 63]
    assert res.final["val"].token_accuracy > 0.4  # chance is 1/3 after BOS
    curve = res.final["test"].curve
    assert curve.accuracy.shape == (17,) and curve.num_sequences == 64
    assert res.final["test"].sequence_accuracy == curve.accuracy[-1]
    # logs: JSONL with train and eval metrics, TensorBoard events, the final checkpoint
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert any("train/loss" in r for r in records) and any("test/loss" in r for r in records)
    assert os.listdir(out / "tb")
    assert "63" in os.listdir(out / "checkpoints")


def test_resume_gives_identical_losses_and_data_order(full_run, tmp_path):
    _, ref = full_run
    first = _run(str(tmp_path), stop_at=24, checkpoint_every=12, eval_every=21)
    assert first.step == 24
    resumed = _run(str(tmp_path), resume=True, checkpoint_every=12, eval_every=21)
    assert min(resumed.train_losses) == 25 and resumed.step == 63
    for s in range(25, 64):
        assert resumed.train_losses[s] == ref.train_losses[s], s
    np.testing.assert_array_equal(
        resumed.final["test"].curve.accuracy, ref.final["test"].curve.accuracy
    )
    chex_equal = jax.tree.map(
        lambda a, b: np.array_equal(np.asarray(a), np.asarray(b)),
        resumed.state["params"],
        ref.state["params"],
    )
    assert all(jax.tree.leaves(chex_equal))


def test_time_limit_stops_at_a_log_point_and_resumes(full_run, tmp_path):
    _, ref = full_run
    first = _run(str(tmp_path), time_limit=1e-9, eval_every=21)
    assert first.time_limited and not ref.time_limited
    assert first.step == 4  # the first log point (log_every=4)
    assert "4" in os.listdir(tmp_path / "checkpoints")
    resumed = _run(str(tmp_path), resume=True, eval_every=21)
    assert resumed.step == 63 and not resumed.time_limited
    for s in range(5, 64):
        assert resumed.train_losses[s] == ref.train_losses[s], s
    with pytest.raises(ValueError, match="time_limit"):
        TrainConfig(total_steps=5, time_limit=0)


def test_restore_from_directory_alone(full_run):
    out, res = full_run
    config = read_config(out / "checkpoints")
    assert config["model"] == MODEL and config["run"]["total_steps"] == 63
    model, config, step = restore_from_dir(out / "checkpoints")  # via "model_factory"
    assert step == 63
    ids = jnp.asarray(build(DATA).test["input_ids"][:4])
    np.testing.assert_array_equal(np.asarray(model(ids)), np.asarray(res.model(ids)))
    model2, _, _ = restore_from_dir(out / "checkpoints", step=42, build_model=build_tiny)
    assert not np.array_equal(np.asarray(model2(ids)), np.asarray(res.model(ids)))


def test_data_parallel_8_devices_matches_1(full_run):
    if jax.device_count() < 8:
        pytest.skip("needs 8 (simulated) devices: JAX_NUM_CPU_DEVICES=8")
    _, res8 = full_run  # default mesh: all 8 devices
    one = _run(mesh=mesh_lib.make_mesh(devices=jax.devices()[:1]), eval_every=21)
    a = np.array([res8.train_losses[s] for s in range(1, 64)])
    b = np.array([one.train_losses[s] for s in range(1, 64)])
    np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-5)
    np.testing.assert_allclose(res8.final["val"].loss, one.final["val"].loss, rtol=1e-3)


def test_fsdp_mesh_shards_params_and_trains():
    if jax.device_count() < 8:
        pytest.skip("needs 8 (simulated) devices")
    res = _run(fsdp=2, total_steps=6)
    emb = res.state["params"]["embed"].get_value()
    assert emb.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp")
    assert np.isfinite(list(res.train_losses.values())).all()


def test_gradient_accumulation_matches_full_batch(full_run):
    _, ref = full_run
    res = _run(accum_steps=2, total_steps=63)
    a = np.array([ref.train_losses[s] for s in range(1, 64)])
    b = np.array([res.train_losses[s] for s in range(1, 64)])
    np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-4)
    tp = res.throughput
    assert tp["tokens_per_s"] > 0 and tp["measured_steps"] == 62 and tp["mfu"] is None


def test_custom_token_fn_and_mfu(full_run):
    def doubled(model, batch):
        ce, pred = logits_token_fn(model, batch)
        return 2.0 * ce, pred

    _, base = full_run  # the loss of step 1 comes before any update: same init, same batch
    res = train(
        TrainConfig(total_steps=2, progress=False, optimizer=OptimizerConfig(lr=1e-2)),
        build_model=lambda: build_tiny(MODEL),
        train_data=build(DATA).train,
        token_fn=doubled,
        flops_per_token=1e3,
        peak_flops=1e9,
    )
    np.testing.assert_allclose(res.train_losses[1], 2 * base.train_losses[1], rtol=1e-5)
    assert res.throughput["mfu"] > 0


def test_early_stopping(tmp_path):
    res = _run(eval_every=8, early_stop_metric="val/token_accuracy", early_stop_target=0.0)
    assert res.stopped_early and res.step == 8
    with pytest.raises(ValueError, match="eval set"):
        _run(early_stop_metric="nope/sequence_accuracy", early_stop_target=0.5)


def test_bf16_params():
    res = _run(param_dtype="bf16", total_steps=4)
    dtypes = {x.dtype for x in jax.tree.leaves(res.state["params"])}
    assert dtypes == {jnp.dtype(jnp.bfloat16)}
    mu = jax.tree.leaves(res.state["opt_state"])
    assert jnp.dtype(jnp.bfloat16) in {x.dtype for x in mu}
    assert np.isfinite(list(res.train_losses.values())).all()


def test_gemm_choice_reaches_both_compiled_steps(monkeypatch):
    """``TrainConfig.gemm`` becomes the compiler options of the train and eval steps: ``cublas``
    trains on the CPU (the option is a valid no-op there), and options from the choice reach
    XLA (an unknown option makes the compile fail)."""
    res = _run(gemm="cublas", total_steps=4)
    assert np.isfinite(list(res.train_losses.values())).all()
    import dpjax.train.loop as loop

    monkeypatch.setattr(loop, "gemm_compiler_options", lambda *a: {"xla_no_such_option": 1})
    with pytest.raises(Exception, match="xla_no_such_option"):
        _run(total_steps=4)


def test_config_validation():
    with pytest.raises(ValueError, match="total_steps"):
        TrainConfig(total_steps=0)
    with pytest.raises(ValueError, match="param_dtype"):
        TrainConfig(total_steps=1, param_dtype="fp8")
    with pytest.raises(ValueError, match="go together"):
        TrainConfig(total_steps=1, early_stop_metric="val/loss")
    assert dataclasses.asdict(TrainConfig(total_steps=3))["total_steps"] == 3
