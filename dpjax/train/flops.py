"""Parameter counts, training FLOPs per token and peak device FLOP/s, for throughput and MFU.

FLOP model (per token, one optimizer pass = forward + backward = 3x forward; a
multiply-add counts 2):

* matmuls: ``6 * N_matmul`` where ``N_matmul`` counts every Linear weight that multiplies the
  token's activations, including the output head (``D * vocab`` whether tied or not), excluding
  the embedding lookup, norms, short convs and biases;
* short convs: ``3 * 2 * W * C`` over their ``C`` channels;
* the recurrence, in its recurrent form: per head and token ``n_h * 4 * d_k * d_v``
  (``k^T S`` and the rank-1 update per Householder step) ``+ 2 * d_k * d_v`` (the read
  ``q^T S``), times 3;
* softmax-attention layers (hybrids): ``3 * 2 * 2 * H * hd * T_ctx / 2`` (``QK^T`` and ``AV``
  over a causal context of ``T_ctx / 2`` keys on average; ``min(T, window)`` with a window).

MFU = achieved FLOP/s (``flops_per_token * tokens/s``) / (devices x peak FLOP/s per device).
These are *model* FLOPs: the chunked algorithm's intra-chunk products and rematerialisation are
not counted (as attention MFU does not count FlashAttention's recomputation), so MFU understates
what the hardware executes. Peak: dense bf16 tensor-core FLOP/s (H100 SXM / H200: 989 TFLOP/s;
A100: 312 TFLOP/s), or pass ``peak_flops`` explicitly.
"""

from __future__ import annotations

from dataclasses import dataclass

import jax

from dpjax.nn.config import DeltaProductConfig

__all__ = ["ParamCount", "device_peak_flops", "flops_per_token", "param_count"]

# Dense bf16 tensor-core peak per device (no sparsity), by substring of ``device.device_kind``.
PEAK_BF16_FLOPS: tuple[tuple[str, float], ...] = (
    ("H200", 989e12),
    ("H100 PCIe", 756e12),
    ("H100", 989e12),
    ("GH200", 989e12),
    ("B200", 2250e12),
    ("A100", 312e12),
    ("L40S", 362e12),
    ("A10G", 125e12),
    ("L4", 121e12),
)


@dataclass(frozen=True)
class ParamCount:
    """Parameter counts of a ``DeltaProductLM`` configuration.

    Attributes:
      total: every parameter (the embedding table once when tied).
      embedding: the ``vocab x D`` embedding table.
      matmul: weights of the per-token matmuls, incl. the output head (``D x vocab``).
    """

    total: int
    embedding: int
    matmul: int

    @property
    def non_embedding(self) -> int:
        return self.total - self.embedding


def _mixer_params(c: DeltaProductConfig) -> tuple[int, int, int]:
    """(total, matmul, conv channels) of one DeltaProduct mixer."""
    D, H, n, dk, dv = c.hidden_size, c.num_heads, c.num_householder, c.head_dim, c.value_head_dim
    matmul = D * H * dk + D * n * H * dk + D * n * H * dv + D * n * H + H * dv * D
    total = dv  # o_norm weight
    if c.use_forget_gate:
        matmul += D * H
        total += 2 * H  # A_log, dt_bias
    if c.use_output_gate:
        matmul += D * H * dv
    channels = 0
    if c.use_short_conv:
        channels = H * dk + n * H * dk + n * H * dv
        total += c.conv_size * channels + (channels if c.conv_bias else 0)
    return total + matmul, matmul, channels


def _attention_params(c: DeltaProductConfig) -> tuple[int, int]:
    a = c.attn
    D, Ha, Hkv = c.hidden_size, a["num_heads"], a["num_kv_heads"]
    hd = D // Ha
    matmul = D * Ha * hd + 2 * D * Hkv * hd + Ha * hd * D
    bias = (Ha + 2 * Hkv) * hd if a["qkv_bias"] else 0
    return matmul + bias, matmul


def param_count(c: DeltaProductConfig) -> ParamCount:
    """Exact parameter counts of ``DeltaProductLM(c)`` (tested against the model)."""
    D, V, inter = c.hidden_size, c.vocab_size, c.mlp_intermediate_size
    total = V * D + D  # embedding, final norm
    matmul = D * V  # output head
    if not c.tie_word_embeddings:
        total += D * V
    for i in range(c.num_hidden_layers):
        t, m = _attention_params(c) if i in c.attention_layers else _mixer_params(c)[:2]
        mlp = 3 * D * inter
        total += t + mlp + 2 * D  # + attn_norm, mlp_norm
        matmul += m + mlp
    return ParamCount(total=total, embedding=V * D, matmul=matmul)


def flops_per_token(c: DeltaProductConfig, seq_len: int) -> float:
    """Training (forward + backward) model FLOPs per token at sequence length ``seq_len``."""
    if seq_len < 1:
        raise ValueError(f"seq_len: expected >= 1, got {seq_len}")
    fwd = 2.0 * param_count(c).matmul
    n_rnn = c.num_hidden_layers - len(c.attention_layers)
    if n_rnn:
        H, n, dk, dv = c.num_heads, c.num_householder, c.head_dim, c.value_head_dim
        _, _, channels = _mixer_params(c)
        fwd += n_rnn * (H * (n * 4 * dk * dv + 2 * dk * dv) + 2 * c.conv_size * channels)
    if c.attention_layers:
        a = c.attn
        ctx = seq_len if a["window_size"] is None else min(seq_len, a["window_size"])
        hd = c.hidden_size // a["num_heads"]
        fwd += len(c.attention_layers) * 2 * 2 * a["num_heads"] * hd * ctx / 2
    return 3.0 * fwd


def device_peak_flops(device: jax.Device | None = None) -> float | None:
    """Dense bf16 peak FLOP/s of ``device`` (default: the first device), or None if unknown
    (CPUs and unlisted accelerators: pass the peak explicitly to get MFU)."""
    device = device or jax.devices()[0]
    if device.platform == "cpu":
        return None
    kind = getattr(device, "device_kind", "")
    for key, peak in PEAK_BF16_FLOPS:
        if key in kind:
            return peak
    return None
