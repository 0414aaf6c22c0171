"""Which GEMM emitter XLA gives the dense layers on a GPU (``TrainConfig.gemm``, ``--gemm``).

XLA:GPU runs most dense-layer matmuls as its own Triton GEMM fusions (which also fold in the
neighbouring converts and elementwise ops) and the rest through cuBLAS. With a matrix side that is
not a multiple of 8 (bf16 rows not a multiple of 16 bytes), its Triton GEMMs took 1.4–2.2x as
long on an H100 as cuBLAS's (the DP2-805M preset's hidden size 1468; docs/BENCHMARKS.md
"2026-12-07 (second session)"), while at aligned sizes the two were within 3 %; with cuBLAS the
DP2-805M train step ran 1.34x faster. Aligned models keep XLA's choice: with cuBLAS everywhere the
DP2-392M step was 2 % slower (XLA no longer folds converts and the SiLU gate into its GEMMs).
The choices:

- ``"auto"``: cuBLAS for every GEMM of the step (``xla_gpu_enable_triton_gemm=False``) when the
  step runs on a GPU and some dense kernel has an unaligned side (``unaligned_dense_kernels``);
  otherwise XLA's default;
- ``"xla"``: XLA's default;
- ``"cublas"``: cuBLAS for every GEMM, on any platform (the option is ignored off the GPU).

The choice becomes per-``jit`` compiler options, so it needs no ``XLA_FLAGS`` set before JAX
starts and leaves other compiled functions alone.
"""

from __future__ import annotations

from typing import Any

import jax

GEMM_CHOICES = ("auto", "xla", "cublas")
CUBLAS_OPTIONS = {"xla_gpu_enable_triton_gemm": False}
# sides below this are projections to a few gate/beta channels or convolution taps, not GEMMs
# that matter for speed
MIN_DENSE_SIDE = 128
ALIGNMENT = 8


def unaligned_dense_kernels(params: Any) -> list[tuple[str, tuple[int, ...]]]:
    """``(path, shape)`` of every 2-D floating leaf of ``params`` (a pytree of arrays or
    ``ShapeDtypeStruct``s: dense kernels ``[in, out]``, embedding tables) whose sides are both at
    least ``MIN_DENSE_SIDE`` and one of which is not a multiple of ``ALIGNMENT``."""
    found = []
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        shape = tuple(getattr(leaf, "shape", ()))
        dtype = getattr(leaf, "dtype", None)
        if len(shape) != 2 or dtype is None or not jax.numpy.issubdtype(dtype, jax.numpy.floating):
            continue
        if min(shape) >= MIN_DENSE_SIDE and any(s % ALIGNMENT for s in shape):
            found.append((jax.tree_util.keystr(path), shape))
    return found


def gemm_compiler_options(choice: str, params: Any, platform: str | None = None) -> dict[str, Any]:
    """The ``jax.jit(..., compiler_options=)`` for ``choice`` (one of ``GEMM_CHOICES``).

    Args:
      choice: ``"auto"``, ``"xla"`` or ``"cublas"`` (see the module docstring).
      params: the model's parameters (arrays or shape structs), read by ``"auto"``.
      platform: where the step runs (default ``jax.default_backend()``), read by ``"auto"``.
    """
    if choice not in GEMM_CHOICES:
        raise ValueError(f"gemm: expected one of {GEMM_CHOICES}, got {choice!r}")
    if choice == "cublas":
        return dict(CUBLAS_OPTIONS)
    if choice == "auto":
        platform = platform or jax.default_backend()
        if platform == "gpu" and unaligned_dense_kernels(params):
            return dict(CUBLAS_OPTIONS)
    return {}
