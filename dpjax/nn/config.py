"""``DeltaProductConfig``: FLA's ``GatedDeltaProductConfig`` fields and defaults, plus ours."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import warnings
from dataclasses import dataclass, field
from typing import Any

import jax.numpy as jnp

from dpjax.nn.conv import CONV_IMPLS
from dpjax.nn.init import INIT_SCHEMES
from dpjax.nn.mlp import intermediate_size
from dpjax.nn.norms import check_norm_impl
from dpjax.ops.validation import IMPLS

# Keys of HF/FLA config files that carry no model information: dropped without a warning.
_BOOKKEEPING_KEYS = frozenset(
    {
        "model_type",
        "architectures",
        "transformers_version",
        "torch_dtype",
        "_name_or_path",
        "auto_map",
    }
)
# Renamed keys of older FLA versions (the paper's vendored v0.2.2).
_RENAMED_KEYS = {"use_gate": "use_output_gate"}
_ATTN_KEYS = ("layers", "num_heads", "num_kv_heads", "qkv_bias", "window_size", "rope_theta")
_ACTIVATIONS = ("swish", "silu")


@dataclass(frozen=True)
class DeltaProductConfig:
    """Configuration of a (Gated) DeltaProduct language model (DeltaNet: ``num_householder=1``).

    Field names and defaults follow flash-linear-attention's ``GatedDeltaProductConfig``
    (SPEC §4.4), so the paper's JSON files load with ``from_json``. FLA fields that only steer
    PyTorch kernels (``attn_mode``, ``fuse_*``, ``use_cache``, ``use_l2warp``,
    ``max_position_embeddings``, ``bos/eos/pad_token_id``) are kept for round trips and ignored
    by the model.

    Architecture: ``hidden_size`` D, ``num_hidden_layers`` L, ``num_heads`` H, ``head_dim`` d_k,
    ``expand_v`` (d_v = d_k * expand_v, must be an integer), ``num_householder`` n_h,
    ``allow_neg_eigval`` (beta in (0, 2) instead of (0, 1)), ``use_forget_gate``,
    ``use_short_conv`` (kernel ``conv_size``, bias ``conv_bias``), ``use_output_gate``
    (per-head RMSNorm times SiLU(g_proj(x)); ``use_gate`` in v0.2.2 files), ``hidden_ratio`` /
    ``intermediate_size`` of the SwiGLU MLP, ``norm_eps``, ``tie_word_embeddings``,
    ``vocab_size``. ``attn``: None, or a dict ``{"layers": [...], "num_heads": int,
    "num_kv_heads": int = num_heads, "qkv_bias": False, "window_size": None | int,
    "rope_theta": 10000.0}`` listing layers replaced by causal softmax attention (RoPE, GQA,
    optional sliding window).

    Ours:
      impl: implementation of the op (``"auto" | "chunked" | "reference" | "pallas"``).
      conv_backward: the short convolutions' backward (``dpjax.nn.conv``): ``"auto"`` (default:
        the one-pass Pallas kernel on a GPU, 2.8x faster than autodiff on an H100; autodiff
        elsewhere), ``"xla"`` (autodiff everywhere) or ``"pallas"`` (interpret mode off the GPU).
      conv_forward: their forward, the same choices and default (with the q/k L2 norm inside
        it, the kernel is 6x faster than XLA's fusion on an H100).
      norm_impl: the RMSNorms (``dpjax.nn.norms``): ``"xla"`` (default: XLA's fusions),
        ``"pallas"`` (one Pallas kernel each way; interpret mode off the GPU) or ``"auto"``
        (the kernels on a GPU, XLA elsewhere).
      init_scheme: ``"paper"`` (DEFAULT, reproduces the paper's runs: mixer Linears
        xavier-uniform gain 2^-2.5; embedding/MLP gate, up ``N(0, initializer_range)``; MLP down
        kaiming-uniform / sqrt(2L)) or ``"fla"`` (current FLA/HF: every Linear/conv/embedding
        ``N(0, initializer_range)``). Details in ``dpjax.nn.init``.
      dtype: activation/compute dtype (``"float32"`` or ``"bfloat16"``); logits are fp32.
      param_dtype: parameter storage dtype (``A_log``/``dt_bias`` always fp32).

    The config is frozen and hashable; derive variants with ``config.replace(**changes)``.
    """

    # --- FLA GatedDeltaProductConfig ---------------------------------------------------------
    attn_mode: str = "chunk"
    conv_size: int = 4
    head_dim: int = 256
    num_heads: int = 6
    hidden_size: int = 2048
    expand_v: float = 2.0
    use_output_gate: bool = True
    use_short_conv: bool = True
    max_position_embeddings: int = 2048
    hidden_ratio: float = 4
    intermediate_size: int | None = None
    hidden_act: str = "swish"
    num_hidden_layers: int = 21
    norm_eps: float = 1e-6
    attn: dict[str, Any] | None = None
    use_cache: bool = True
    pad_token_id: int | None = None
    bos_token_id: int | None = 1
    eos_token_id: int | None = 2
    tie_word_embeddings: bool = False
    initializer_range: float = 0.02
    fuse_norm: bool = True
    fuse_swiglu: bool = True
    fuse_cross_entropy: bool = True
    fuse_linear_cross_entropy: bool = False
    use_l2warp: bool = False
    vocab_size: int = 32000
    use_forget_gate: bool = False
    allow_neg_eigval: bool = False
    num_householder: int = 1
    attnres_block_size: int | None = None
    # --- ours ----------------------------------------------------------------------------
    conv_bias: bool = False
    impl: str = "auto"
    conv_forward: str = "auto"
    conv_backward: str = "auto"
    norm_impl: str = "xla"
    init_scheme: str = "paper"
    dtype: str = "float32"
    param_dtype: str = "float32"
    _hash: int = field(default=0, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        self._validate()
        if self.attn is not None:
            object.__setattr__(self, "attn", self._normalise_attn(self.attn))
        object.__setattr__(self, "_hash", hash(json.dumps(self.to_dict(), sort_keys=True)))

    def __hash__(self) -> int:
        return self._hash

    # --- validation --------------------------------------------------------------------------
    def _validate(self) -> None:
        def positive_int(name: str) -> None:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}: expected a positive integer, got {value!r}")

        for name in (
            "hidden_size",
            "num_heads",
            "head_dim",
            "num_hidden_layers",
            "vocab_size",
            "conv_size",
            "max_position_embeddings",
        ):
            positive_int(name)
        if isinstance(self.num_householder, bool) or not isinstance(self.num_householder, int):
            raise ValueError(f"num_householder: expected an integer, got {self.num_householder!r}")
        if self.num_householder < 1:
            raise ValueError(
                f"num_householder: expected n_h >= 1 (1 = DeltaNet), got {self.num_householder}"
            )
        if self.intermediate_size is not None:
            positive_int("intermediate_size")
        if not self.hidden_ratio > 0:
            raise ValueError(f"hidden_ratio: expected > 0, got {self.hidden_ratio!r}")
        if not self.expand_v > 0:
            raise ValueError(f"expand_v: expected > 0, got {self.expand_v!r}")
        dv = self.head_dim * self.expand_v
        if not math.isclose(dv, round(dv)) or round(dv) < 1:
            raise ValueError(
                f"head_dim * expand_v = {self.head_dim} * {self.expand_v} = {dv} must be a "
                "positive integer (the value head dim)"
            )
        if intermediate_size(self.hidden_size, self.hidden_ratio, self.intermediate_size) < 1:
            raise ValueError(
                f"MLP intermediate size is not positive for hidden_size={self.hidden_size}, "
                f"hidden_ratio={self.hidden_ratio}"
            )
        if not self.norm_eps > 0:
            raise ValueError(f"norm_eps: expected > 0, got {self.norm_eps!r}")
        if not self.initializer_range > 0:
            raise ValueError(f"initializer_range: expected > 0, got {self.initializer_range!r}")
        if self.hidden_act not in _ACTIVATIONS:
            raise ValueError(f"hidden_act: expected one of {_ACTIVATIONS}, got {self.hidden_act!r}")
        if self.impl not in IMPLS:
            raise ValueError(f"impl: expected one of {IMPLS}, got {self.impl!r}")
        for name in ("conv_forward", "conv_backward"):
            if getattr(self, name) not in CONV_IMPLS:
                raise ValueError(
                    f"{name}: expected one of {CONV_IMPLS}, got {getattr(self, name)!r}"
                )
        check_norm_impl(self.norm_impl, "norm_impl")
        if self.init_scheme not in INIT_SCHEMES:
            raise ValueError(
                f"init_scheme: expected one of {INIT_SCHEMES}, got {self.init_scheme!r}"
            )
        for name in ("dtype", "param_dtype"):
            value = getattr(self, name)
            try:
                ok = jnp.issubdtype(jnp.dtype(value), jnp.floating)
            except TypeError:
                ok = False
            if not ok:
                raise ValueError(f"{name}: expected a float dtype name, got {value!r}")
        if self.attnres_block_size is not None:
            raise ValueError("attnres_block_size: attention-residual routing is not supported")

    def _normalise_attn(self, attn: dict[str, Any]) -> dict[str, Any]:
        if not isinstance(attn, dict):
            raise ValueError(f"attn: expected None or a dict, got {type(attn).__name__}")
        unknown = sorted(set(attn) - set(_ATTN_KEYS))
        if unknown:
            warnings.warn(f"attn: ignoring unknown keys {unknown}", stacklevel=4)
        if "layers" not in attn or "num_heads" not in attn:
            raise ValueError(f"attn: needs 'layers' and 'num_heads', got keys {sorted(attn)}")
        L = self.num_hidden_layers
        layers = []
        for i in attn["layers"]:
            if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < L:
                raise ValueError(
                    f"attn['layers']: unknown layer index {i!r}; the model has layers 0..{L - 1}"
                )
            layers.append(i)
        heads = attn["num_heads"]
        kv_heads = attn.get("num_kv_heads") or heads
        for name, value in (("num_heads", heads), ("num_kv_heads", kv_heads)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"attn['{name}']: expected a positive integer, got {value!r}")
        if heads % kv_heads:
            raise ValueError(
                f"attn: num_heads={heads} must be a multiple of num_kv_heads={kv_heads}"
            )
        if self.hidden_size % heads or (self.hidden_size // heads) % 2:
            raise ValueError(
                f"attn: hidden_size={self.hidden_size} must split into num_heads={heads} heads "
                "of even size (RoPE)"
            )
        window = attn.get("window_size")
        if window is not None and (
            isinstance(window, bool) or not isinstance(window, int) or window < 1
        ):
            raise ValueError(f"attn['window_size']: expected None or >= 1, got {window!r}")
        theta = attn.get("rope_theta", 10000.0)
        theta = 10000.0 if theta is None else float(theta)
        if not theta > 0:
            raise ValueError(f"attn['rope_theta']: expected > 0, got {theta!r}")
        return {
            "layers": sorted(set(layers)),
            "num_heads": heads,
            "num_kv_heads": kv_heads,
            "qkv_bias": bool(attn.get("qkv_bias", False)),
            "window_size": window,
            "rope_theta": theta,
        }

    # --- derived quantities ------------------------------------------------------------------
    @property
    def value_head_dim(self) -> int:
        """``d_v = head_dim * expand_v``."""
        return int(round(self.head_dim * self.expand_v))

    @property
    def key_dim(self) -> int:
        """``H * d_k``."""
        return self.num_heads * self.head_dim

    @property
    def value_dim(self) -> int:
        """``H * d_v``."""
        return self.num_heads * self.value_head_dim

    @property
    def mlp_intermediate_size(self) -> int:
        """SwiGLU intermediate size (FLA rule unless ``intermediate_size``)."""
        return intermediate_size(self.hidden_size, self.hidden_ratio, self.intermediate_size)

    @property
    def attention_layers(self) -> tuple[int, ...]:
        """Indices of layers that use softmax attention instead of the DeltaProduct mixer."""
        return () if self.attn is None else tuple(self.attn["layers"])

    @property
    def compute_dtype(self) -> jnp.dtype:
        return jnp.dtype(self.dtype)

    @property
    def parameter_dtype(self) -> jnp.dtype:
        return jnp.dtype(self.param_dtype)

    # --- (de)serialisation -------------------------------------------------------------------
    def replace(self, **changes: Any) -> DeltaProductConfig:
        """A copy with ``changes`` applied (validated again)."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable dict of every field (``from_dict`` inverts it)."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.init}
        if out["attn"] is not None:
            out["attn"] = dict(out["attn"], layers=list(out["attn"]["layers"]))
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DeltaProductConfig:
        """Build from a dict with FLA keys. ``use_gate`` (FLA v0.2.2) maps to
        ``use_output_gate``; HF bookkeeping keys (``model_type``, ``architectures``, ...) are
        dropped; other unknown keys are ignored with a ``warnings.warn`` naming them."""
        known = {f.name for f in dataclasses.fields(cls) if f.init}
        kwargs: dict[str, Any] = {}
        unknown = []
        for key, value in data.items():
            name = _RENAMED_KEYS.get(key, key)
            if name in known:
                if name in kwargs and kwargs[name] != value:
                    raise ValueError(
                        f"config keys {key!r} and {name!r} disagree: {value!r} vs {kwargs[name]!r}"
                    )
                kwargs[name] = value
            elif key not in _BOOKKEEPING_KEYS:
                unknown.append(key)
        if unknown:
            warnings.warn(
                f"DeltaProductConfig: ignoring unknown config keys {sorted(unknown)}", stacklevel=2
            )
        return cls(**kwargs)

    @classmethod
    def from_json(cls, path: str | os.PathLike) -> DeltaProductConfig:
        """Load a model-config JSON file (the paper's ``model_configs/*.json`` or ``to_json``)."""
        with open(path) as f:
            return cls.from_dict(json.load(f))

    def to_json(self, path: str | os.PathLike) -> None:
        """Write ``to_dict()`` as JSON."""
        with open(path, "w") as f:
            json.dump(self.to_dict(), f, indent=2, sort_keys=True)
