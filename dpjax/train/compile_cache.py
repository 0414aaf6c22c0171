"""JAX's persistent compilation cache for the experiment CLIs.

A jitted train step with the Pallas kernels takes minutes to compile on a GPU host (XLA
autotuning and the Triton kernels), the same for every run of a sweep; with the cache on disk,
only the first run of a configuration pays it. Keyed by the program, the JAX/XLA version, the
device kind and the compiler flags, so a stale entry is never reused for a different program.
"""

from __future__ import annotations

import os

import jax

__all__ = ["DEFAULT_DIR", "enable_compilation_cache"]

DEFAULT_DIR = os.path.join("~", ".cache", "dpjax", "xla")


def enable_compilation_cache(path: str | None, min_compile_seconds: float = 1.0) -> str | None:
    """Store and reuse compiled programs under ``path`` (``None``: leave the cache off).

    Only programs that took at least ``min_compile_seconds`` to compile are stored.
    Returns the absolute cache directory, or ``None``.
    """
    if not path:
        return None
    path = os.path.abspath(os.path.expanduser(path))
    os.makedirs(path, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", min_compile_seconds)
    return path
