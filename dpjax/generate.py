"""Sampling from a ``DeltaProductLM`` with its recurrent cache.

1. Prefill: one full forward over the (left-padded) prompts with the model's op implementation
   (chunked / kernels); it returns the last logits and the cache (per DeltaProduct layer the fp32
   state ``[B, H, d_k, d_v]`` and the short-conv windows (last ``W-1`` inputs); per attention
   layer a KV cache of ``T + max_new_tokens`` slots).
2. Decode: one jitted ``decode_step`` per token (``dpjax.ops.decode``), greedy or sampled with
   temperature / top-k / top-p. Without a callback the whole loop is one ``jax.lax.scan``; with a
   ``callback`` a jitted step runs per token and the callback sees each token as it is made.

Example::

    from dpjax.generate import generate
    out = generate(model, prompts, attention_mask=mask, max_new_tokens=64,
                   temperature=0.8, top_p=0.95, rng=0, eos_token_id=cfg.eos_token_id)
    # out: [B, 64] int32; after a row's EOS the row holds pad_token_id
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dpjax.nn.lm import DeltaProductLM


@dataclass(frozen=True)
class Sampling:
    """How the next token is chosen from fp32 logits.

    Attributes:
      temperature: 0 = greedy (argmax; top_k/top_p ignored), else logits are divided by it.
      top_k: keep only the ``top_k`` largest logits (None = all).
      top_p: nucleus sampling, keep the smallest set of tokens with probability >= ``top_p``
        (None or 1.0 = all).
    """

    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None

    def __post_init__(self) -> None:
        if not self.temperature >= 0:
            raise ValueError(f"temperature: expected >= 0, got {self.temperature!r}")
        if self.top_k is not None and (
            isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 1
        ):
            raise ValueError(f"top_k: expected None or a positive int, got {self.top_k!r}")
        if self.top_p is not None and not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p: expected None or in (0, 1], got {self.top_p!r}")


def sample_logits(logits: jax.Array, key: jax.Array, sampling: Sampling) -> jax.Array:
    """Choose one token per row.

    Args:
      logits: ``[B, vocab]`` (any float dtype; used in fp32).
      key: PRNG key (unused when greedy).
      sampling: ``Sampling``.

    Returns:
      ``[B]`` int32 token ids.
    """
    logits = logits.astype(jnp.float32)
    if sampling.temperature == 0.0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits / sampling.temperature
    neg_inf = jnp.finfo(jnp.float32).min
    if sampling.top_k is not None and sampling.top_k < logits.shape[-1]:
        kth = jax.lax.top_k(logits, sampling.top_k)[0][..., -1:]
        logits = jnp.where(logits < kth, neg_inf, logits)
    if sampling.top_p is not None and sampling.top_p < 1.0:
        sorted_logits = jnp.sort(logits, axis=-1)[..., ::-1]
        probs = jax.nn.softmax(sorted_logits, axis=-1)
        mass_before = jnp.cumsum(probs, axis=-1) - probs
        keep = mass_before < sampling.top_p  # the first token is always kept
        cutoff = jnp.min(jnp.where(keep, sorted_logits, jnp.inf), axis=-1, keepdims=True)
        logits = jnp.where(logits < cutoff, neg_inf, logits)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


def _choose(logits, key, done, sampling, eos, pad):
    token = sample_logits(logits, key, sampling)
    token = jnp.where(done, pad, token)
    if eos is not None:
        done = done | (token == eos)
    return token, done


def _first_token(model, input_ids, attention_mask, key, cache_size, sampling, eos, pad):
    """Prefill, then choose the first new token: ``(token, done, cache)``."""
    logits, cache = model.prefill(input_ids, attention_mask=attention_mask, cache_size=cache_size)
    done = jnp.zeros((input_ids.shape[0],), bool)
    token, done = _choose(logits[:, -1], key, done, sampling, eos, pad)
    return token, done, cache


def _next_token(model, cache, token, done, key, sampling, eos, pad):
    """Feed ``token`` and choose the next one: ``(token, done, cache)``."""
    logits, cache = model.decode_step(token, cache)
    token, done = _choose(logits, key, done, sampling, eos, pad)
    return token, done, cache


@partial(jax.jit, static_argnums=(0,), static_argnames=("cache_size", "sampling", "eos", "pad"))
def _prefill(graphdef, state, input_ids, attention_mask, key, *, cache_size, sampling, eos, pad):
    model = nnx.merge(graphdef, state)
    return _first_token(model, input_ids, attention_mask, key, cache_size, sampling, eos, pad)


@partial(
    jax.jit,
    static_argnums=(0,),
    static_argnames=("sampling", "eos", "pad"),
    donate_argnames=("cache",),
)
def _step(graphdef, state, cache, token, done, key, *, sampling, eos, pad):
    model = nnx.merge(graphdef, state)
    return _next_token(model, cache, token, done, key, sampling, eos, pad)


@partial(
    jax.jit,
    static_argnums=(0,),
    static_argnames=("cache_size", "sampling", "eos", "pad"),
)
def _generate_scan(
    graphdef, state, input_ids, attention_mask, keys, *, cache_size, sampling, eos, pad
):
    model = nnx.merge(graphdef, state)
    first, done, cache = _first_token(
        model, input_ids, attention_mask, keys[0], cache_size, sampling, eos, pad
    )

    def body(carry, key):
        token, done, cache = carry
        token, done, cache = _next_token(model, cache, token, done, key, sampling, eos, pad)
        return (token, done, cache), token

    _, rest = jax.lax.scan(body, (first, done, cache), keys[1:])
    return jnp.concatenate([first[:, None], rest.T], axis=1)


def generate(
    model: DeltaProductLM,
    input_ids: jax.Array,
    *,
    max_new_tokens: int,
    attention_mask: jax.Array | None = None,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    rng: int | jax.Array = 0,
    eos_token_id: int | None = None,
    pad_token_id: int | None = None,
    callback: Callable[[int, np.ndarray], None] | None = None,
) -> jax.Array:
    """Continue each prompt by ``max_new_tokens`` tokens.

    Args:
      model: a ``DeltaProductLM``.
      input_ids: ``[B, T]`` int prompts, LEFT-padded when their lengths differ.
      max_new_tokens: number of tokens to produce per row (>= 1).
      attention_mask: ``[B, T]`` (1 = token, 0 = padding); the last column must be all ones.
      temperature, top_k, top_p: see ``Sampling`` (temperature 0 = greedy).
      rng: int seed or PRNG key. Token ``i`` is drawn with ``jax.random.split(key, n)[i]``, so
        the result does not depend on whether a callback is given.
      eos_token_id: a row stops after producing it (later positions hold ``pad_token_id``).
      pad_token_id: filler after EOS (default: ``eos_token_id``, or 0).
      callback: called as ``callback(i, tokens)`` with the ``[B]`` numpy tokens of step ``i``
        as soon as they exist (host sync per token). Generation stops early once every row has
        produced EOS; the rest of the output is padding.

    Returns:
      ``[B, max_new_tokens]`` int32 new tokens.
    """
    if not isinstance(model, DeltaProductLM):
        raise ValueError(f"generate: expected a DeltaProductLM, got {type(model).__name__}")
    if (
        isinstance(max_new_tokens, bool)
        or not isinstance(max_new_tokens, int)
        or max_new_tokens < 1
    ):
        raise ValueError(f"max_new_tokens: expected a positive int, got {max_new_tokens!r}")
    input_ids = jnp.asarray(input_ids, jnp.int32)
    if input_ids.ndim != 2 or input_ids.shape[1] < 1:
        raise ValueError(f"input_ids: expected [B, T] with T >= 1, got shape {input_ids.shape}")
    B, T = input_ids.shape
    if attention_mask is not None:
        if np.shape(attention_mask) != (B, T):
            raise ValueError(
                f"attention_mask: expected shape {(B, T)} like input_ids, got "
                f"{np.shape(attention_mask)}"
            )
        if not isinstance(attention_mask, jax.core.Tracer) and not np.all(
            np.asarray(attention_mask)[:, -1]
        ):
            raise ValueError(
                "attention_mask: prompts must be LEFT-padded for generation (the last column "
                "must be all ones)"
            )
        attention_mask = jnp.asarray(attention_mask, jnp.int32)
    sampling = Sampling(float(temperature), top_k, top_p)
    pad = pad_token_id if pad_token_id is not None else (eos_token_id or 0)
    key = jax.random.key(rng) if isinstance(rng, int) else rng
    keys = jax.random.split(key, max_new_tokens)
    cache_size = T + max_new_tokens
    graphdef, state = nnx.split(model)
    static = dict(sampling=sampling, eos=eos_token_id, pad=pad)

    if callback is None:
        return _generate_scan(
            graphdef, state, input_ids, attention_mask, keys, cache_size=cache_size, **static
        )

    token, done, cache = _prefill(
        graphdef, state, input_ids, attention_mask, keys[0], cache_size=cache_size, **static
    )
    out = [token]
    callback(0, np.asarray(token))
    for i in range(1, max_new_tokens):
        if eos_token_id is not None and bool(jnp.all(done)):
            break
        token, done, cache = _step(graphdef, state, cache, token, done, keys[i], **static)
        out.append(token)
        callback(i, np.asarray(token))
    tokens = jnp.stack(out, axis=1)
    if tokens.shape[1] < max_new_tokens:
        tokens = jnp.pad(
            tokens, ((0, 0), (0, max_new_tokens - tokens.shape[1])), constant_values=pad
        )
    return tokens
