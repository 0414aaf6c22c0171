"""dpjax: DeltaProduct and DeltaNet in JAX, with Pallas GPU kernels.

``dpjax.delta_product`` is the op (see ``dpjax.ops``); ``dpjax.nn`` holds Flax NNX modules,
``dpjax.generate`` sampling with a recurrent cache (both imported on first use).
"""

import importlib

from dpjax import ops
from dpjax.ops import decode, delta_product, explain_impl

__all__ = ["ops", "delta_product", "decode", "explain_impl", "nn", "generate"]
__version__ = "0.1.0"

_LAZY = {
    "nn": "dpjax.nn",
    "generate": "dpjax.generate",
    "data": "dpjax.data",
    "train": "dpjax.train",
    "eval": "dpjax.eval",
}


def __getattr__(name: str):
    if name in _LAZY:
        return importlib.import_module(_LAZY[name])
    raise AttributeError(f"module 'dpjax' has no attribute {name!r}")
