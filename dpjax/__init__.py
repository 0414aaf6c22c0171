"""dpjax: DeltaProduct and DeltaNet in JAX, with Pallas GPU kernels.

``dpjax.delta_product`` is the op (see ``dpjax.ops``); ``dpjax.nn`` holds Flax NNX modules.
"""

from dpjax import ops
from dpjax.ops import decode, delta_product, explain_impl

__all__ = ["ops", "delta_product", "decode", "explain_impl"]
__version__ = "0.1.0"
