"""DeltaProductConfig, presets (parameter counts), JSON loading, initialisation schemes and
logical sharding names of dpjax.nn."""

from __future__ import annotations

import json
import math
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dpjax.nn import DeltaProductConfig, DeltaProductLM, intermediate_size, presets
from dpjax.nn.init import PAPER_MIXER_GAIN
from dpjax.nn.sharding_names import LOGICAL_AXES, axis_rules

# SPEC §4.6: parameters in millions (tied embedding counted once).
PAPER_PARAMS_M = {
    "dn-213m": 213.8,
    "dp2-213m": 214.1,
    "dp3-213m": 213.9,
    "dn-392m": 392.2,
    "dp2-392m": 392.3,
    "dp3-392m": 392.4,
    "dn-805m": 805.4,
    "dp2-805m": 806.3,
    "dp3-805m": 805.8,
}


def count_params(cfg: DeltaProductConfig) -> int:
    model = nnx.eval_shape(lambda: DeltaProductLM(cfg, rngs=nnx.Rngs(0)))
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


def small(**overrides) -> DeltaProductConfig:
    fields = dict(
        vocab_size=64,
        hidden_size=32,
        num_hidden_layers=2,
        num_heads=2,
        head_dim=16,
        expand_v=1,
        num_householder=2,
        hidden_ratio=2,
        impl="reference",
    )
    fields.update(overrides)
    return DeltaProductConfig(**fields)


# --- presets --------------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(PAPER_PARAMS_M))
def test_paper_preset_parameter_counts(name):
    n = count_params(presets.get_preset(name))
    assert abs(n / 1e6 - PAPER_PARAMS_M[name]) / PAPER_PARAMS_M[name] < 0.005, n


def test_preset_listing_and_unknown_name():
    names = presets.list_presets()
    assert set(PAPER_PARAMS_M) <= set(names) and "tiny" in names and "tiny-hybrid" in names
    with pytest.raises(ValueError, match="unknown preset 'nope'.*known presets"):
        presets.get_preset("nope")
    assert presets.get_preset("tiny", impl="reference").impl == "reference"


def test_state_tracking_preset():
    cfg = presets.state_tracking(13, 2, True)
    assert (cfg.hidden_size, cfg.num_heads, cfg.head_dim, cfg.value_head_dim) == (128, 8, 32, 32)
    assert cfg.mlp_intermediate_size == 512
    assert not (cfg.use_short_conv or cfg.use_forget_gate or cfg.use_output_gate)
    assert not cfg.tie_word_embeddings and cfg.allow_neg_eigval and cfg.num_householder == 2
    model = nnx.eval_shape(lambda: DeltaProductLM(cfg, rngs=nnx.Rngs(0)))
    mixer = model.layers[0].mixer
    assert not hasattr(mixer, "q_conv") and not hasattr(mixer, "a_proj")
    assert model.lm_head is not None and model.lm_head.kernel.shape == (128, 13)
    # D*H*d (q) + n_h*(2*D*H*d + D*H) + H*d*D (o) + d_v  + MLP 3*D*I + 2 norms
    mixer_params = 128 * 256 + 2 * (2 * 128 * 256 + 128 * 8) + 256 * 128 + 32
    expected = 13 * 128 * 2 + 128 + mixer_params + 3 * 128 * 512 + 2 * 128
    assert count_params(cfg) == expected
    assert presets.state_tracking(127, 4, True, num_layers=3).num_hidden_layers == 3


@pytest.mark.parametrize(
    "d, want",
    [(1024, 2816), (768, 2048), (736, 2048), (1536, 4096), (1468, 4096), (128, 512), (2048, 5632)],
)
def test_intermediate_size_rule(d, want):
    assert intermediate_size(d, 4) == want
    assert intermediate_size(d, 4, 100) == 100


# --- config validation -----------------------------------------------------------------------
@pytest.mark.parametrize(
    "overrides, match",
    [
        (dict(head_dim=3, expand_v=0.5), r"head_dim \* expand_v .* must be a positive integer"),
        (dict(num_householder=0), r"num_householder: expected n_h >= 1"),
        (dict(attn={"layers": [5], "num_heads": 2}), r"unknown layer index 5.*layers 0..1"),
        (dict(hidden_size=0), r"hidden_size: expected a positive integer"),
        (dict(num_heads=-1), r"num_heads: expected a positive integer"),
        (dict(vocab_size=0), r"vocab_size: expected a positive integer"),
        (dict(intermediate_size=0), r"intermediate_size: expected a positive integer"),
        (dict(attn={"layers": [0], "num_heads": 4, "num_kv_heads": 3}), r"multiple of"),
        (dict(impl="fast"), r"impl: expected one of"),
        (dict(init_scheme="xavier"), r"init_scheme: expected one of"),
        (dict(dtype="int8"), r"dtype: expected a float dtype"),
    ],
)
def test_bad_configs_raise(overrides, match):
    with pytest.raises(ValueError, match=match):
        small(**overrides)


def test_config_is_hashable_and_replace_validates():
    a, b = small(), small()
    assert a == b and hash(a) == hash(b)
    assert a.replace(num_householder=3).num_householder == 3
    with pytest.raises(ValueError):
        a.replace(num_householder=0)


# --- (de)serialisation -----------------------------------------------------------------------
def test_dict_and_json_round_trip(tmp_path):
    cfg = small(attn={"layers": [1], "num_heads": 2, "window_size": 8}, use_forget_gate=True)
    assert cfg.attn == {
        "layers": [1],
        "num_heads": 2,
        "num_kv_heads": 2,
        "qkv_bias": False,
        "window_size": 8,
        "rope_theta": 10000.0,
    }
    d = cfg.to_dict()
    json.dumps(d)  # serialisable
    assert DeltaProductConfig.from_dict(d) == cfg
    cfg.to_json(tmp_path / "c.json")
    assert DeltaProductConfig.from_json(tmp_path / "c.json") == cfg


def test_from_json_paper_file(tmp_path):
    """A file shaped like the paper's model_configs/*.json (FLA v0.2.2 keys)."""
    paper = {
        "model_type": "gated_deltaproduct",
        "attn_mode": "chunk",
        "bos_token_id": 1,
        "conv_size": 4,
        "eos_token_id": 2,
        "expand_k": 1,
        "expand_v": 1,
        "fuse_cross_entropy": True,
        "fuse_norm": True,
        "head_dim": 128,
        "hidden_act": "swish",
        "hidden_ratio": 4,
        "hidden_size": 1024,
        "initializer_range": 0.006,
        "max_position_embeddings": 4096,
        "norm_eps": 1e-06,
        "num_heads": 8,
        "num_hidden_layers": 24,
        "num_householder": 2,
        "allow_neg_eigval": True,
        "tie_word_embeddings": True,
        "use_cache": False,
        "use_gate": False,
        "use_short_conv": True,
        "vocab_size": 32000,
        "clamp_min": None,
        "norm_first": False,
        "use_forget_gate": False,
    }
    path = tmp_path / "delta_product_340m_-1_1_2_4k_8h.json"
    path.write_text(json.dumps(paper))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cfg = DeltaProductConfig.from_json(path)
    messages = " ".join(str(w.message) for w in caught)
    for key in ("clamp_min", "expand_k", "norm_first"):
        assert key in messages
    assert "model_type" not in messages
    assert cfg.use_output_gate is False and cfg.num_householder == 2
    assert cfg == presets.get_preset("dp2-392m").replace(use_cache=False)
    assert abs(count_params(cfg) / 1e6 - 392.3) < 0.1
    assert DeltaProductConfig.from_dict({"use_gate": True}).use_output_gate is True


# --- initialisation --------------------------------------------------------------------------
def _model(cfg):
    return DeltaProductLM(cfg, rngs=nnx.Rngs(0))


def test_paper_init_scheme():
    cfg = small(
        hidden_size=64,
        num_heads=2,
        head_dim=32,
        use_forget_gate=True,
        initializer_range=0.006,
        hidden_ratio=4,
    )
    assert cfg.init_scheme == "paper"  # the documented default
    m = _model(cfg)
    mixer, mlp = m.layers[0].mixer, m.layers[0].mlp
    D, Hd, n = 64, 64, 2
    q = np.asarray(mixer.q_proj.kernel[...])
    bound = PAPER_MIXER_GAIN * math.sqrt(6 / (D + Hd))
    assert np.abs(q).max() <= bound and np.abs(q).max() > 0.9 * bound
    k = np.asarray(mixer.k_proj.kernel[...])  # fused n_h projections: fans of one sub-step
    assert k.shape == (D, n * Hd) and 0.9 * bound < np.abs(k).max() <= bound
    emb = np.asarray(m.embeddings.embedding[...])
    assert abs(emb.std() - 0.006) < 0.0006
    assert abs(np.asarray(mlp.up_proj.kernel[...]).std() - 0.006) < 0.0006
    down = np.asarray(mlp.down_proj.kernel[...])
    I = cfg.mlp_intermediate_size
    dbound = 1 / math.sqrt(I) / math.sqrt(2 * cfg.num_hidden_layers)
    assert 0.9 * dbound < np.abs(down).max() <= dbound
    conv = np.asarray(mixer.q_conv.kernel[...])
    assert 0.4 < np.abs(conv).max() <= 0.5  # PyTorch Conv1d default, fan-in 4
    A = np.exp(np.asarray(mixer.A_log[...]))
    assert np.all((A > 0) & (A <= 16))
    dt = np.asarray(jax.nn.softplus(mixer.dt_bias[...]))
    assert np.all((dt >= 1e-3 * 0.999) & (dt <= 0.1 * 1.001))
    assert mixer.A_log[...].dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(m.norm.weight[...]), 1.0)


def test_fla_init_scheme():
    cfg = small(hidden_size=64, head_dim=32, init_scheme="fla", initializer_range=0.02)
    m = _model(cfg)
    for w in (
        m.layers[0].mixer.q_proj.kernel,
        m.layers[0].mlp.down_proj.kernel,
        m.layers[0].mixer.o_proj.kernel,
        m.embeddings.embedding,
    ):
        assert abs(np.asarray(w[...]).std() - 0.02) < 0.003


# --- sharding names --------------------------------------------------------------------------
def test_every_param_has_logical_names():
    cfg = small(
        use_forget_gate=True,
        use_output_gate=True,
        conv_bias=True,
        tie_word_embeddings=False,
        attn={"layers": [1], "num_heads": 2, "qkv_bias": True},
    )
    model = nnx.eval_shape(lambda: DeltaProductLM(cfg, rngs=nnx.Rngs(0)))
    flat = nnx.to_flat_state(nnx.state(model, nnx.Param))
    names = {}
    for path, var in flat:
        sharding = var.get_metadata().get("out_sharding")
        assert sharding is not None and len(sharding) == len(var.shape), path
        assert all(a is None or a in LOGICAL_AXES for a in sharding), (path, sharding)
        names["/".join(map(str, path))] = tuple(sharding)
    expect = {
        "embeddings/embedding": ("vocab", "embed"),
        "lm_head/kernel": ("embed", "vocab"),
        "layers/0/mixer/q_proj/kernel": ("embed", "heads"),
        "layers/0/mixer/k_proj/kernel": ("embed", "heads"),
        "layers/0/mixer/v_proj/kernel": ("embed", "heads"),
        "layers/0/mixer/g_proj/kernel": ("embed", "heads"),
        "layers/0/mixer/o_proj/kernel": ("heads", "embed"),
        "layers/0/mixer/b_proj/kernel": ("embed", None),
        "layers/0/mixer/a_proj/kernel": ("embed", None),
        "layers/0/mixer/A_log": (None,),
        "layers/0/mixer/dt_bias": (None,),
        "layers/0/mixer/k_conv/kernel": (None, "heads"),
        "layers/0/mixer/k_conv/bias": ("heads",),
        "layers/0/mixer/o_norm/weight": (None,),
        "layers/0/mlp/gate_proj/kernel": ("embed", "mlp"),
        "layers/0/mlp/up_proj/kernel": ("embed", "mlp"),
        "layers/0/mlp/down_proj/kernel": ("mlp", "embed"),
        "layers/0/attn_norm/weight": (None,),
        "layers/1/mixer/q_proj/kernel": ("embed", "heads"),
        "layers/1/mixer/q_proj/bias": ("heads",),
        "layers/1/mixer/k_proj/kernel": ("embed", "heads"),
        "layers/1/mixer/o_proj/kernel": ("heads", "embed"),
        "norm/weight": (None,),
    }
    for path, want in expect.items():
        assert names[path] == want, path
    with pytest.raises(ValueError, match="unknown logical axis names"):
        axis_rules(hidden="model")
    assert dict(axis_rules(heads="model"))["heads"] == "model"
