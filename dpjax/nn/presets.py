"""Named model configurations: the paper's language models (SPEC §4.6), the state-tracking model
(SPEC §5.3) and tiny CPU models.

``get_preset(name, **overrides)`` returns a fresh ``DeltaProductConfig``; ``list_presets()`` the
names. Paper LM presets (vocab 32000, tied embeddings, 24 layers, d_k = d_v = 128, short convs,
no gates, beta in (0, 2), ``initializer_range=0.006``) — parameters in millions:

=========  ======  ======  ======
scale      DN      DP2     DP3
=========  ======  ======  ======
213M       213.8   214.1   213.9     (D 768/736/768, H 8/6/4, context 2048)
392M       392.2   392.3   392.4     (D 1024, H 12/8/6, context 4096)
805M       805.4   806.3   805.8     (D 1536/1468/1536, H 16/12/8, context 4096)
=========  ======  ======  ======

Names: ``dn-213m``, ``dp2-213m``, ``dp3-213m``, ``dn-392m``, ..., ``dp3-805m``; ``tiny`` (about
0.5M parameters, byte vocabulary 256; trains on a CPU in minutes) and ``tiny-hybrid`` (``tiny``
with its middle layer replaced by softmax attention).
"""

from __future__ import annotations

from typing import Any

from dpjax.nn.config import DeltaProductConfig

_PAPER_COMMON: dict[str, Any] = dict(
    num_hidden_layers=24,
    head_dim=128,
    expand_v=1,
    use_output_gate=False,
    use_short_conv=True,
    use_forget_gate=False,
    allow_neg_eigval=True,
    hidden_ratio=4,
    hidden_act="swish",
    norm_eps=1e-6,
    initializer_range=0.006,
    tie_word_embeddings=True,
    vocab_size=32000,
    bos_token_id=1,
    eos_token_id=2,
    use_cache=False,
    init_scheme="paper",
)

# (name, hidden_size, num_heads, num_householder, max_position_embeddings)
_PAPER_TABLE = (
    ("dn-213m", 768, 8, 1, 2048),
    ("dp2-213m", 736, 6, 2, 2048),
    ("dp3-213m", 768, 4, 3, 2048),
    ("dn-392m", 1024, 12, 1, 4096),
    ("dp2-392m", 1024, 8, 2, 4096),
    ("dp3-392m", 1024, 6, 3, 4096),
    ("dn-805m", 1536, 16, 1, 4096),
    ("dp2-805m", 1468, 12, 2, 4096),
    ("dp3-805m", 1536, 8, 3, 4096),
)

_PRESETS: dict[str, dict[str, Any]] = {
    name: dict(
        _PAPER_COMMON,
        hidden_size=d,
        num_heads=h,
        num_householder=n,
        max_position_embeddings=ctx,
    )
    for name, d, h, n, ctx in _PAPER_TABLE
}
_PRESETS["tiny"] = dict(
    _PAPER_COMMON,  # the paper's architecture, shrunk
    vocab_size=256,
    hidden_size=128,
    num_hidden_layers=2,
    num_heads=2,
    head_dim=32,
    num_householder=2,
    initializer_range=0.02,
    max_position_embeddings=512,
    use_cache=True,
)
_PRESETS["tiny-hybrid"] = dict(
    _PRESETS["tiny"],
    num_hidden_layers=3,
    attn={"layers": [1], "num_heads": 4, "num_kv_heads": 2, "window_size": None},
)


def list_presets() -> list[str]:
    """Names accepted by ``get_preset``."""
    return list(_PRESETS)


def get_preset(name: str, **overrides: Any) -> DeltaProductConfig:
    """The preset ``name`` with optional field ``overrides`` (e.g. ``impl="chunked"``).

    Raises:
      ValueError: unknown name (the message lists the known ones) or invalid overrides.
    """
    if name not in _PRESETS:
        raise ValueError(f"unknown preset {name!r}; known presets: {list_presets()}")
    return DeltaProductConfig(**dict(_PRESETS[name], **overrides))


def state_tracking(
    vocab_size: int,
    num_householder: int,
    allow_neg_eigval: bool,
    num_layers: int = 1,
    num_heads: int = 8,
    head_dim: int = 32,
    hidden_size: int = 128,
    **overrides: Any,
) -> DeltaProductConfig:
    """The paper's state-tracking model (SPEC §5.3): no short conv, no forget gate, no output
    gate (plain per-head RMSNorm), ``d_v = d_k``, SwiGLU with ``hidden_ratio=4`` (I = 512 at
    D = 128), untied head, ``initializer_range=0.02``, BOS id 0, EOS id ``vocab_size - 1``.

    Args:
      vocab_size: ``|G| + 7`` in the paper's tokenisation (S3: 13, A5: 67, S5: 127).
      num_householder: ``n_h``; allow_neg_eigval: beta in (0, 2) (``[-1, 1]`` eigenvalues).
      num_layers, num_heads, head_dim, hidden_size: paper defaults 1, 8, 32, 128.
      overrides: other ``DeltaProductConfig`` fields (e.g. ``impl``, ``dtype``).
    """
    fields: dict[str, Any] = dict(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        num_hidden_layers=num_layers,
        num_heads=num_heads,
        head_dim=head_dim,
        expand_v=1,
        num_householder=num_householder,
        allow_neg_eigval=allow_neg_eigval,
        use_forget_gate=False,
        use_short_conv=False,
        use_output_gate=False,
        hidden_ratio=4,
        norm_eps=1e-6,
        initializer_range=0.02,
        tie_word_embeddings=False,
        fuse_cross_entropy=False,
        bos_token_id=0,
        eos_token_id=vocab_size - 1,
        init_scheme="paper",
    )
    fields.update(overrides)
    return DeltaProductConfig(**fields)
