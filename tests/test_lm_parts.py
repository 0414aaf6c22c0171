"""Language-model pieces: FLOP/parameter counts, process-invariant batches, the blockwise
remat head, the op under shard_map, distributed settings, evaluation outputs, CLI flags and
errors."""

import argparse
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from experiment_modules import load_experiment
from flax import nnx

from dpjax.data.text import prepare_text_shards
from dpjax.eval import lm_eval, lm_eval_state, per_position
from dpjax.nn import DeltaProductLM, get_preset
from dpjax.nn.sequence import SequenceInfo
from dpjax.ops import chunked, delta_product, sharded
from dpjax.train import distributed, flops, lm_data, lm_step
from dpjax.train import mesh as mesh_lib


def small_config(**kw):
    base = dict(
        vocab_size=259, hidden_size=32, num_hidden_layers=2, num_heads=2, head_dim=8, impl="chunked"
    )
    return get_preset("tiny", **dict(base, **kw))


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    out = tmp_path_factory.mktemp("shards")
    prepare_text_shards("stdlib", out, 32, limit_files=30, val_fraction=0.2, progress=False)
    return str(out)


def _load_cli():
    return load_experiment("language_model")


# ---------------------------------------------------------------------------------------------
# FLOPs and parameters


@pytest.mark.parametrize("name", ["tiny", "tiny-hybrid", "dp2-392m"])
def test_param_count_matches_the_model(name):
    cfg = get_preset(name, use_forget_gate=True, use_output_gate=True, conv_bias=True)
    with nnx.use_eager_sharding(False):
        model = nnx.eval_shape(lambda: DeltaProductLM(cfg, rngs=nnx.Rngs(0)))
    actual = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    count = flops.param_count(cfg)
    assert count.total == actual
    assert count.embedding == cfg.vocab_size * cfg.hidden_size
    assert count.matmul < count.total


def test_flops_per_token():
    cfg = get_preset("dp2-392m")
    f = flops.flops_per_token(cfg, 4096)
    six_n = 6 * flops.param_count(cfg).matmul
    # the recurrence adds 3 * 24 layers * 8 heads * (2*4 + 2) * 128^2 (+ convs) on top of 6N
    rnn = 3 * 24 * 8 * 10 * 128 * 128
    assert six_n + rnn < f < six_n + rnn * 1.1
    hybrid = get_preset("tiny-hybrid")
    assert flops.flops_per_token(hybrid, 1024) > flops.flops_per_token(hybrid, 128)
    assert flops.device_peak_flops(jax.devices("cpu")[0]) is None
    with pytest.raises(ValueError, match="seq_len"):
        flops.flops_per_token(cfg, 0)


# ---------------------------------------------------------------------------------------------
# data


def test_batches_do_not_depend_on_the_process_count(shards):
    one = iter(lm_data.lm_dataset(shards, global_batch=8, seed=3, process_index=0, process_count=1))
    two = [
        iter(lm_data.lm_dataset(shards, global_batch=8, seed=3, process_index=p, process_count=2))
        for p in range(2)
    ]
    for _ in range(3):
        full = next(one)
        halves = [next(it) for it in two]
        for key in ("input_ids", "labels", "loss_mask"):
            np.testing.assert_array_equal(full[key], np.concatenate([h[key] for h in halves]))
    assert set(full) == {"input_ids", "labels", "loss_mask"}
    assert full["input_ids"].shape == (8, 32) and full["input_ids"].dtype == np.int32
    assert two[0].get_state() == one.get_state()  # one position, the same for any count
    with_seg = next(
        iter(
            lm_data.lm_dataset(
                shards, global_batch=4, segment_resets=True, process_index=0, process_count=1
            )
        )
    )
    assert "segment_ids" in with_seg
    val = lm_data.eval_arrays(shards, "validation", max_rows=5)
    assert val["labels"].shape == (5, 32)
    with pytest.raises(ValueError, match="multiple of the process count"):
        lm_data.lm_dataset(shards, global_batch=3, process_index=0, process_count=2)
    with pytest.raises(ValueError, match="fewer than one global batch"):
        lm_data.lm_dataset(shards, global_batch=10**7, process_index=0, process_count=1)


# ---------------------------------------------------------------------------------------------
# blockwise head + remat


def test_lm_token_fn_matches_logits_and_gradients():
    cfg = small_config(num_hidden_layers=1)
    model = DeltaProductLM(cfg, rngs=nnx.Rngs(0))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    ids = jax.random.randint(jax.random.key(1), (2, 40), 0, 259)
    seg = jnp.asarray(np.repeat([[1] * 25 + [2] * 15], 2, axis=0))
    batch = {"input_ids": ids, "labels": jnp.roll(ids, -1, 1), "segment_ids": seg}

    def ref(p):
        m = nnx.merge(graphdef, p, rest)
        logits = m(ids, segment_ids=seg)
        return optax.softmax_cross_entropy_with_integer_labels(logits, batch["labels"]).mean()

    l0, g0 = jax.jit(jax.value_and_grad(ref))(params)
    for remat in ("none", "block"):
        fn = lm_step.lm_token_fn(remat, block=16)  # 40 positions: 3 blocks, the last padded

        def loss(p, fn=fn):
            ce, pred = fn(nnx.merge(graphdef, p, rest), batch)
            assert ce.shape == pred.shape == (2, 40)
            return ce.mean()

        l1, g1 = jax.jit(jax.value_and_grad(loss))(params)
        np.testing.assert_allclose(l1, l0, rtol=1e-5)
        for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g0), strict=True):
            np.testing.assert_allclose(a, b, rtol=2e-4, atol=1e-6)
    with pytest.raises(ValueError, match="remat"):
        lm_step.lm_token_fn("everything")


# ---------------------------------------------------------------------------------------------
# the op under shard_map


def _op_inputs(B=8, T=24, H=2, K=8, V=4, n=2, seed=0):
    ks = jax.random.split(jax.random.key(seed), 4)
    q = jax.random.normal(ks[0], (B, T, H, K))
    k = jax.random.normal(ks[1], (B, T * n, H, K))
    k = k / jnp.linalg.norm(k, axis=-1, keepdims=True)
    v = jax.random.normal(ks[2], (B, T * n, H, V))
    beta = 2 * jax.nn.sigmoid(jax.random.normal(ks[3], (B, T * n, H)))
    resets = jnp.zeros((B, T), bool).at[:, 9].set(True)
    return q, k, v, beta, resets


def test_shard_forward_matches_unsharded_forward_and_gradient():
    if jax.device_count() < 8:
        pytest.skip("needs 8 (simulated) devices")
    mesh = mesh_lib.make_mesh(fsdp=2)
    q, k, v, beta, resets = _op_inputs()
    kw = dict(num_householder=2, scale=0.3)
    f = sharded.shard_forward(chunked.forward, mesh, mesh_lib.BATCH_AXES)

    def loss(fwd):
        def fn(q):
            o, s = fwd(q, k, v, beta, None, None, resets, **kw)
            return (o * jnp.cos(o)).sum() + (s * s).sum()  # every output element matters

        return jax.jit(jax.value_and_grad(fn))

    l0, g0 = loss(chunked.forward)(q)
    l1, g1 = loss(f)(q)
    np.testing.assert_allclose(l1, l0, rtol=1e-6)
    np.testing.assert_allclose(g1, g0, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="does not divide"):
        f(q[:3], k[:3], v[:3], beta[:3], None, None, None, **kw)


def test_pallas_forward_under_shard_map_matches_chunked():
    if jax.device_count() < 8:
        pytest.skip("needs 8 (simulated) devices")
    from dpjax.ops import pallas

    mesh = mesh_lib.make_mesh(fsdp=2)
    q, k, v, beta, resets = _op_inputs(T=16)
    kw = dict(num_householder=2, scale=0.3)
    f = sharded.shard_forward(pallas.forward, mesh, mesh_lib.BATCH_AXES)
    o0, _ = chunked.forward(q, k, v, beta, None, None, resets, **kw)
    o1, _ = jax.jit(lambda *a: f(*a, **kw))(q, k, v, beta, None, None, resets)
    np.testing.assert_allclose(o1, o0, rtol=2e-4, atol=2e-5)


def test_wrap_forward_only_inside_the_context():
    mesh = mesh_lib.make_mesh(devices=jax.devices()[:1])
    assert sharded.wrap_forward("pallas", chunked.forward) is chunked.forward
    with sharded.batch_parallel(mesh) as setting:
        assert setting.size == 1 and sharded.active() is setting
        assert sharded.wrap_forward("chunked", chunked.forward) is chunked.forward
        assert sharded.wrap_forward("pallas", chunked.forward) is not chunked.forward
    assert sharded.active() is None
    with pytest.raises(ValueError, match="mesh axes"), sharded.batch_parallel(mesh, ("model",)):
        pass
    assert sharded.hook_installed()  # dpjax.delta_product calls wrap_forward


# ---------------------------------------------------------------------------------------------
# distributed settings


def test_distributed_settings(monkeypatch):
    for name in (
        "JAX_COORDINATOR_ADDRESS",
        "JAX_NUM_PROCESSES",
        "JAX_PROCESS_ID",
        "SLURM_NTASKS",
        "OMPI_COMM_WORLD_SIZE",
    ):
        monkeypatch.delenv(name, raising=False)
    assert distributed.initialize() is False  # single process: nothing to start
    assert distributed.initialize(num_processes=1) is False
    with pytest.raises(ValueError, match="coordinator"):
        distributed.initialize(num_processes=2, process_id=0)
    with pytest.raises(ValueError, match="process_id"):
        distributed.initialize("127.0.0.1:1234", 2, 5)
    with pytest.raises(ValueError, match="num_processes"):
        distributed.initialize("127.0.0.1:1234", None, 0)
    monkeypatch.setenv("JAX_NUM_PROCESSES", "two")
    with pytest.raises(ValueError, match="JAX_NUM_PROCESSES"):
        distributed.settings_from_env()
    monkeypatch.setenv("JAX_NUM_PROCESSES", "2")
    monkeypatch.setenv("JAX_PROCESS_ID", "1")
    monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "10.0.0.1:99")
    assert distributed.settings_from_env() == ("10.0.0.1:99", 2, 1)


# ---------------------------------------------------------------------------------------------
# evaluation


def test_mixer_inputs_reproduce_the_mixer():
    cfg = small_config(use_forget_gate=True, use_output_gate=True, num_householder=3)
    model = DeltaProductLM(cfg, rngs=nnx.Rngs(2))
    ids = jax.random.randint(jax.random.key(0), (2, 20), 0, 259)
    seg = jnp.asarray([[1] * 12 + [2] * 8, [1] * 20])
    mask = jnp.asarray([[1] * 20, [0] * 3 + [1] * 17])
    seq = SequenceInfo.build(ids, seg, mask)
    x = jax.random.normal(jax.random.key(1), (2, 20, cfg.hidden_size))
    mixer = model.layers[1].mixer

    @jax.jit
    def both(x):
        inp = lm_eval_state.mixer_inputs(mixer, x, seq)
        o, _ = delta_product(
            inp["q"],
            inp["k"],
            inp["v"],
            inp["beta"],
            inp["g"],
            num_householder=3,
            segment_ids=inp["segment_ids"],
            impl="chunked",
        )
        return inp, mixer._output(o, x), mixer(x, seq)

    inp, recomputed, direct = both(x)
    assert inp["k"].shape == (2, 60, 2, 8) and inp["g"].shape == (2, 20, 2)
    np.testing.assert_allclose(recomputed, direct, rtol=1e-5, atol=1e-6)
    captured = jax.eval_shape(lambda i: lm_eval_state.capture_mixer_inputs(model, i), ids)
    assert sorted(captured) == [0, 1]
    hybrid = DeltaProductLM(get_preset("tiny-hybrid", impl="chunked"), rngs=nnx.Rngs(0))
    capture = jax.eval_shape(lambda i: lm_eval_state.capture_mixer_inputs(hybrid, i), ids % 256)
    assert sorted(capture) == [0, 2]


def test_evaluation_outputs(shards, tmp_path):
    model = DeltaProductLM(small_config(), rngs=nnx.Rngs(0))
    ppl = lm_eval.perplexity(model, shards, batch_size=4, max_rows=10)
    assert ppl["rows"] == 10 and ppl["tokens"] > 0 and np.isfinite(ppl["loss"])
    assert abs(ppl["perplexity"] - np.exp(ppl["loss"])) < 1e-3 * ppl["perplexity"]

    seqs = per_position.long_sequences(shards, length=96, max_sequences=3)
    assert seqs.shape == (3, 97) and seqs.dtype == np.int32
    res = per_position.per_position_loss(model, seqs, batch_size=2, train_length=32)
    assert res.token_loss.shape == (96,) and np.isfinite(res.token_loss).all()
    assert res.running_perplexity.shape == (96,) and res.num_sequences == 3
    res.save_json(tmp_path / "pp.json")
    back = per_position.PerPositionLoss.load_json(tmp_path / "pp.json")
    np.testing.assert_allclose(back.token_loss, res.token_loss)
    assert back.train_length == 32
    per_position.plot_per_position({"a": res, "b": back}, tmp_path / "pp.png")
    assert (tmp_path / "pp.png").stat().st_size > 1000

    ranks = lm_eval_state.state_rank_by_layer(
        model, seqs[0, :64], every=4, bos_id=256, train_length=32
    )
    assert ranks.ranks.shape == (2, 16, 2) and ranks.layers == [0, 1]
    assert np.isfinite(ranks.ranks).all() and (ranks.ranks >= 0).all()
    assert (ranks.ranks <= 8 + 1e-4).all()  # at most min(d_k, d_v) = 8
    ranks.save_json(tmp_path / "sr.json")
    assert len(json.loads((tmp_path / "sr.json").read_text())["ranks"]["0"]) == 2  # [H][P]
    ranks.plot(tmp_path / "sr.png")
    assert (tmp_path / "sr.png").stat().st_size > 1000
    # a reset at every BOS: the state right after a BOS holds one token's worth
    ids = np.full(40, 65, np.int32)
    ids[[0, 20]] = 256
    reset_ranks = lm_eval_state.state_rank_by_layer(model, ids, segment_resets=True, bos_id=256)
    assert reset_ranks.bos_positions == [0, 20]
    assert (reset_ranks.ranks[:, 20] <= 2 + 1e-4).all()  # n_h = 2 rank-one updates

    with pytest.raises(ValueError, match="fewer than one sequence"):
        per_position.long_sequences(shards, length=10**7)
    with pytest.raises(ValueError, match="sequences"):
        per_position.per_position_loss(model, seqs[0])
    with pytest.raises(ValueError, match="bos_id"):
        per_position.per_position_loss(model, seqs, segment_resets=True)
    with pytest.raises(ValueError, match="one sequence"):
        lm_eval_state.state_rank_by_layer(model, seqs[:2])
    with pytest.raises(ValueError, match="not a prepared shard directory"):
        lm_eval.perplexity(model, tmp_path)


# ---------------------------------------------------------------------------------------------
# CLI


def test_help_lists_and_explains_every_flag():
    cli = _load_cli()
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    assert set(sub.choices) == {"prepare", "train", "eval", "generate"}
    for name, p in sub.choices.items():
        for action in p._actions:
            if action.option_strings and action.dest != "help":
                assert action.help and len(action.help) > 5, (name, action.dest)
    train_help = sub.choices["train"].format_help()
    for flag in (
        "--accum_steps",
        "--fsdp",
        "--remat",
        "--compute_dtype",
        "--param_dtype",
        "--coordinator",
        "--num_processes",
        "--process_id",
        "--resume",
        "--warmup_steps",
        "--min_lr",
        "--grad_clip",
        "--weight_decay",
        "--peak_tflops",
    ):
        assert flag in train_help, flag


def test_cli_bad_paths_give_clear_errors(tmp_path, capsys):
    cli = _load_cli()
    cases = [
        (["eval", "--run", str(tmp_path / "nope")], "no such directory"),
        (["generate", "--run", str(tmp_path)], "no checkpoint found"),
        (["train", "--data", str(tmp_path), "--steps", "1"], None),
    ]
    (tmp_path / "junk.txt").write_text("x")
    cases[2] = (cases[2][0], "not a prepared shard directory")
    for argv, message in cases:
        with pytest.raises(SystemExit) as err:
            cli.main(argv)
        assert err.value.code == 2
        assert message in capsys.readouterr().err
    args = cli.build_parser().parse_args(["train", "--batch_size", "6", "--accum_steps", "4"])
    with pytest.raises(ValueError, match="multiple of --accum_steps"):
        cli.train_config(args, str(tmp_path))
    args = cli.build_parser().parse_args(["train", "--model_config", str(tmp_path / "m.json")])
    with pytest.raises(ValueError, match="no such file"):
        cli.model_config(args, None, 32)


def _collective_bytes(hlo: str) -> int:
    """Bytes of the results of every collective in compiled HLO text."""
    import re

    width = {"f32": 4, "bf16": 2, "s32": 4, "u32": 4, "f16": 2, "pred": 1, "s8": 1, "u8": 1}
    total = 0
    for line in hlo.splitlines():
        m = re.search(
            r"= (.+?) (all-reduce|all-gather|reduce-scatter|all-to-all|collective-permute)"
            r"(-start)?\(",
            line,
        )
        for dt, dims in re.findall(r"(\w+)\[([\d,]*)\]", m.group(1)) if m else ():
            total += width.get(dt, 4) * int(np.prod([int(d) for d in dims.split(",") if d]))
    return total


def test_fsdp_step_computes_as_data_parallel():
    """FSDP-sharded weights are gathered for the step: per-device FLOPs equal data
    parallelism's and the collectives move parameters, not activations."""
    if jax.device_count() < 8:
        pytest.skip("needs 8 (simulated) devices")
    from dpjax.train.loop import TrainConfig, init_train_state, make_steps
    from dpjax.train.optimizer import OptimizerConfig

    mcfg = get_preset("tiny", impl="chunked", param_dtype="float32", max_position_embeddings=64)
    ids = np.random.default_rng(0).integers(0, mcfg.vocab_size, (16, 65), dtype=np.int32)
    stats = {}
    for fsdp in (1, 2):
        tcfg = TrainConfig(total_steps=10, optimizer=OptimizerConfig(lr=1e-3), fsdp=fsdp)
        mesh = mesh_lib.make_mesh(fsdp)
        graphdef, state, shardings, tx, schedule = init_train_state(
            lambda: DeltaProductLM(mcfg, rngs=nnx.Rngs(0)),
            tcfg,
            mesh,
            mesh_lib.default_rules(fsdp=fsdp > 1),
        )
        step, _ = make_steps(graphdef, tx, shardings, mesh, schedule, lm_step.lm_token_fn("block"))
        batch = mesh_lib.shard_batch({"input_ids": ids, "labels": np.roll(ids, -1, 1)}, mesh)
        compiled = step.lower(state, batch).compile()
        cost = compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, list) else cost
        stats[fsdp] = (cost["flops"], _collective_bytes(compiled.as_text()))
        param_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state["params"]))
    assert stats[2][0] <= 1.02 * stats[1][0], stats
    # data parallelism all-reduces the gradients; FSDP adds parameter-sized gathers/reductions
    assert stats[2][1] <= stats[1][1] + 2 * param_bytes, (stats, param_bytes)
