"""Pieces of the training code: accuracy-vs-length curves on hand-made predictions, the loss and
metrics, the optimizer's schedule and weight-decay mask, mesh sharding rules."""

import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from dpjax.eval.accuracy import (
    AccuracyCurve,
    format_table,
    plot_curves,
    prefix_correct,
    prefix_correct_counts,
)
from dpjax.train import mesh as mesh_lib
from dpjax.train.compile_cache import enable_compilation_cache
from dpjax.train.logging import MetricsLogger, scalars
from dpjax.train.optimizer import OptimizerConfig, decay_mask, make_optimizer, make_schedule
from dpjax.train.step import token_loss_and_metrics

# ---------------------------------------------------------------------------------------------
# accuracy vs length

LABELS = np.array([[7, 1, 2, 3, 4], [7, 1, 2, 3, 4], [7, 1, 2, 3, 4], [7, 1, 2, 3, 4]])
PREDS = np.array(
    [
        [7, 1, 2, 3, 4],  # all correct
        [7, 1, 2, 0, 4],  # first error at t=3 (a later correct token does not count)
        [7, 0, 2, 3, 4],  # first error at t=1
        [7, 1, 2, 3, 0],  # first error at t=4
    ]
)


def test_curve_on_hand_made_predictions():
    curve = AccuracyCurve.from_predictions(PREDS, LABELS, train_length=2)
    np.testing.assert_allclose(curve.accuracy, [1.0, 0.75, 0.75, 0.5, 0.25])
    assert curve.sequence_accuracy == 0.25 and curve.num_sequences == 4
    assert curve.longest_length_above(0.7) == 2 and curve.longest_length_above(0.2) == 4
    assert curve.longest_length_above(1.01) == -1
    assert curve.at(100) == 0.25 and curve.at(1) == 0.75


def test_prefix_counts_numpy_and_jax_agree_and_respect_weights_and_mask():
    ok = prefix_correct(PREDS, LABELS)
    assert ok.dtype == bool and ok[1].tolist() == [True, True, True, False, False]
    w = np.array([1.0, 0.0, 1.0, 1.0])
    np_counts = prefix_correct_counts(PREDS, LABELS, w)
    jx_counts = jax.jit(prefix_correct_counts)(
        jnp.asarray(PREDS), jnp.asarray(LABELS), jnp.asarray(w)
    )
    np.testing.assert_allclose(np_counts, [3, 2, 2, 2, 1])
    np.testing.assert_allclose(np.asarray(jx_counts), np_counts)
    mask = np.ones_like(LABELS)
    mask[:, 1] = 0  # ignore position 1: sequence 2's only error
    np.testing.assert_allclose(prefix_correct_counts(PREDS, LABELS, None, mask), [4, 4, 4, 3, 2])


def test_curve_json_plot_and_table(tmp_path):
    a = AccuracyCurve.from_predictions(PREDS, LABELS, train_length=2)
    b = AccuracyCurve(np.array([1.0, 1.0, 0.2, 0.0, 0.0]), 10)
    a.save_json(tmp_path / "a.json")
    back = AccuracyCurve.load_json(tmp_path / "a.json")
    np.testing.assert_allclose(back.accuracy, a.accuracy)
    assert back.train_length == 2
    plot_curves({"a": a, "b": b}, tmp_path / "c.png")
    assert (tmp_path / "c.png").stat().st_size > 1000
    table = format_table({"a": a, "b": b}, [1, 2, 4])
    assert table.splitlines()[0] == "| model | acc@1 | acc@2 | acc@4 | len(acc≥0.99) |"
    assert "| a | 0.750 | 0.750 | 0.250 | 0 |" in table
    assert "| b | 1.000 | 0.200 | 0.000 | 1 |" in table
    plain = format_table({"a": a}, [1, 9], markdown=False)
    assert "-" in plain.splitlines()[1]  # length 9 is beyond the curve
    with pytest.raises(ValueError):
        AccuracyCurve.from_predictions(PREDS, LABELS[:, :3])


# ---------------------------------------------------------------------------------------------
# loss and metrics


def test_token_loss_and_metrics():
    labels = jnp.array([[1, 2, 0], [2, 2, 1]])
    logits = jax.nn.one_hot(jnp.array([[1, 2, 0], [2, 0, 1]]), 3) * 10.0
    loss, m = token_loss_and_metrics(logits, {"labels": labels})
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    np.testing.assert_allclose(loss, ce.mean(), rtol=1e-6)
    np.testing.assert_allclose(m["token_accuracy"], 5 / 6)
    np.testing.assert_allclose(m["sequence_accuracy"], 0.5)
    mask = jnp.array([[1, 1, 1], [1, 0, 1]])
    loss_m, m2 = token_loss_and_metrics(logits, {"labels": labels, "loss_mask": mask})
    np.testing.assert_allclose(loss_m, (ce * mask).sum() / 5, rtol=1e-6)
    np.testing.assert_allclose(m2["sequence_accuracy"], 1.0)


# ---------------------------------------------------------------------------------------------
# optimizer


def test_cosine_schedule_warmup_and_floor():
    s = make_schedule(OptimizerConfig(lr=1.0, warmup_steps=10, min_lr=0.1), 110)
    np.testing.assert_allclose(
        [s(0), s(5), s(10), s(60), s(110), s(500)], [0.0, 0.5, 1.0, 0.55, 0.1, 0.1], atol=1e-6
    )
    paper = make_schedule(OptimizerConfig(lr=1e-3), 4900)  # CosineAnnealingLR to 0, no warmup
    for t in (0, 1000, 2450, 4900):
        np.testing.assert_allclose(
            paper(t), 1e-3 * (1 + np.cos(np.pi * t / 4900)) / 2, rtol=1e-5, atol=1e-9
        )
    const = make_schedule(OptimizerConfig(lr=0.5, schedule="constant"), 10)
    assert float(const(0)) == float(const(9)) == 0.5
    assert float(make_schedule(OptimizerConfig(lr=1.0, warmup_steps=50), 4)(3)) > 0


class _Params(nnx.Module):
    def __init__(self):
        self.embeddings = nnx.Param(jnp.ones((5, 4)), out_sharding=("vocab", "embed"))
        self.q_proj = nnx.Param(jnp.ones((4, 4)), out_sharding=("embed", "heads"))
        self.q_bias = nnx.Param(jnp.ones((4,)), out_sharding=("heads",))
        self.attn_norm = nnx.Param(jnp.ones((4,)), out_sharding=(None,))
        self.A_log = nnx.Param(jnp.zeros((2,)), out_sharding=(None,))


def _params():
    with nnx.use_eager_sharding(False):
        return nnx.state(_Params(), nnx.Param)


def _mask(**kw):
    params = _params()
    m = decay_mask(params, OptimizerConfig(**kw))
    return {"/".join(map(str, k)): v.get_value() for k, v in nnx.to_flat_state(m)}


def test_weight_decay_mask():
    assert _mask() == {
        "A_log": False,
        "attn_norm": False,
        "embeddings": True,
        "q_bias": False,
        "q_proj": True,
    }
    assert _mask(decay_embeddings=False)["embeddings"] is False
    assert all(_mask(no_decay=()).values())  # the paper's state tracking: decay everything


def test_adamw_applies_decay_only_where_masked():
    params = _params()
    tx, _ = make_optimizer(OptimizerConfig(lr=0.1, weight_decay=0.5, grad_clip=1.0), 10, params)
    zeros = jax.tree.map(jnp.zeros_like, params)
    updates, _ = tx.update(zeros, tx.init(params), params)
    u = {"/".join(map(str, k)): v.get_value() for k, v in nnx.to_flat_state(updates)}
    np.testing.assert_allclose(u["q_proj"], -0.1 * 0.5 * np.ones((4, 4)), rtol=1e-6)
    np.testing.assert_allclose(u["attn_norm"], 0.0)


@pytest.mark.parametrize(
    "kw",
    [
        dict(schedule="linear"),
        dict(lr=0.0),
        dict(min_lr=1.0, lr=0.1),
        dict(grad_clip=0.0),
        dict(warmup_steps=-1),
    ],
)
def test_bad_optimizer_config(kw):
    with pytest.raises(ValueError):
        OptimizerConfig(**kw)


# ---------------------------------------------------------------------------------------------
# mesh and sharding rules


def test_spec_for_rules():
    mesh = mesh_lib.make_mesh(devices=jax.devices()[:1])
    assert mesh.axis_names == ("data", "fsdp") and mesh.shape["data"] == 1
    rules = mesh_lib.default_rules(fsdp=True)
    assert mesh_lib.spec_for(("vocab", "embed"), (13, 8), mesh, rules) == P(None, "fsdp")
    assert mesh_lib.spec_for(None, (3,), mesh, rules) == P()
    with pytest.raises(ValueError, match="no sharding rule"):
        mesh_lib.spec_for(("bogus",), (4,), mesh, rules)
    with pytest.raises(ValueError, match="do not match"):
        mesh_lib.spec_for(("embed",), (4, 4), mesh, rules)


def test_mesh_over_8_devices():
    if jax.device_count() < 8:
        pytest.skip("needs 8 (simulated) devices")
    mesh = mesh_lib.make_mesh(fsdp=2)
    assert dict(mesh.shape) == {"data": 4, "fsdp": 2}
    rules = mesh_lib.default_rules(fsdp=True)
    assert mesh_lib.spec_for(("embed", "mlp"), (8, 4), mesh, rules) == P("fsdp", None)
    assert mesh_lib.spec_for(("embed", "mlp"), (7, 4), mesh, rules) == P(None, None)  # 7 % 2
    batch = mesh_lib.shard_batch({"input_ids": np.zeros((16, 5), np.int32)}, mesh)
    assert batch["input_ids"].sharding.spec == P(("data", "fsdp"), None)
    with pytest.raises(ValueError, match="fsdp"):
        mesh_lib.make_mesh(fsdp=3)


def test_metrics_logger(tmp_path):
    log = MetricsLogger(tmp_path, tensorboard=False)
    log.write(3, {"a": np.float32(1.5), "b": jnp.array(2), "vec": np.zeros(3)})
    log.close()
    line = (tmp_path / "metrics.jsonl").read_text().strip()
    assert '"step": 3' in line and '"a": 1.5' in line and "vec" not in line
    assert scalars({"x": np.array([4.0])}) == {"x": 4.0}


def test_compilation_cache_stores_and_reuses_programs(tmp_path):
    # in a subprocess: the cache directory is process-global JAX configuration
    script = f"""
import jax, jax.numpy as jnp
from dpjax.train.compile_cache import enable_compilation_cache
enable_compilation_cache({str(tmp_path / "cache")!r}, min_compile_seconds=0.0)
f = jax.jit(lambda x: jnp.sin(x) @ x.T)
print(float(f(jnp.ones((8, 8))).sum()))
"""
    run = lambda: subprocess.run(  # noqa: E731
        [sys.executable, "-c", script], capture_output=True, text=True, check=True
    )
    first = run()
    entries = sorted(p.name for p in (tmp_path / "cache").iterdir())
    assert any("jit__lambda" in e for e in entries), entries
    second = run()
    assert second.stdout == first.stdout
    assert (
        sorted(p.name for p in (tmp_path / "cache").iterdir()) == entries
    )  # reused, not rewritten
    assert enable_compilation_cache(None) is None


def test_gemm_choice_reads_the_dense_kernels():
    """``auto`` picks cuBLAS only on a GPU and only for an unaligned dense kernel (the dp2-805m
    preset's hidden size 1468), ``cublas`` always, ``xla`` never; bad choices are named."""
    from dpjax.nn import DeltaProductLM
    from dpjax.nn.presets import get_preset
    from dpjax.train.gemm import CUBLAS_OPTIONS, gemm_compiler_options, unaligned_dense_kernels

    def abstract_params(name):
        model = nnx.eval_shape(lambda: DeltaProductLM(get_preset(name), rngs=nnx.Rngs(0)))
        return nnx.state(model, nnx.Param)

    odd, even = abstract_params("dp2-805m"), abstract_params("dp3-392m")
    found = dict(unaligned_dense_kernels(odd))
    assert found["['embeddings']['embedding'].value"] == (32000, 1468)
    assert any("mlp']['down_proj" in path for path in found)
    # dp3-392m's beta projection [1024, 18] is too narrow to count; its conv taps [4, C] too
    assert unaligned_dense_kernels(even) == []
    assert gemm_compiler_options("auto", odd, platform="gpu") == CUBLAS_OPTIONS
    assert gemm_compiler_options("auto", odd, platform="cpu") == {}
    assert gemm_compiler_options("auto", even, platform="gpu") == {}
    assert gemm_compiler_options("xla", odd, platform="gpu") == {}
    assert gemm_compiler_options("cublas", even) == CUBLAS_OPTIONS
    with pytest.raises(ValueError, match="gemm: expected one of .* got 'triton'"):
        gemm_compiler_options("triton", even)
    from dpjax.train.loop import TrainConfig

    with pytest.raises(ValueError, match="gemm must be one of"):
        TrainConfig(total_steps=1, gemm="tf32")


def test_cublas_options_compile_and_compute_the_same_everywhere(tmp_path):
    """The cuBLAS compiler options are valid XLA options on any backend (here the CPU) and do not
    change results; bench_gemm.py runs end to end with both emitters."""
    from dpjax.train.gemm import gemm_compiler_options

    x = jax.random.normal(jax.random.PRNGKey(0), (16, 24))
    w = jax.random.normal(jax.random.PRNGKey(1), (24, 8))
    options = gemm_compiler_options("cublas", None)
    cublas = jax.jit(lambda a, b: a @ b, compiler_options=options)
    np.testing.assert_array_equal(cublas(x, w), jax.jit(lambda a, b: a @ b)(x, w))
    sys.path.insert(0, str(__import__("pathlib").Path(__file__).parents[1] / "experiments"))
    import bench_gemm

    records = bench_gemm.main(
        ["--case", "64,24,40", "--repeats", "1", "--iters", "1", "--out", str(tmp_path)]
    )
    assert {(r["pass_"], r["emitter"]) for r in records} == {
        (p, e) for p in ("fwd", "fwd+bwd") for e in ("xla", "cublas")
    }
    assert len(records) == 8 and all(r["ms"] > 0 for r in records)
    assert (tmp_path / "bench_gemm.json").exists()
