"""Flax NNX modules for (Gated) DeltaProduct / DeltaNet language models.

Main entry points::

    from flax import nnx
    from dpjax.nn import DeltaProductConfig, DeltaProductLM, presets

    cfg = presets.get_preset("dp2-392m", impl="chunked")     # or DeltaProductConfig.from_json(path)
    model = DeltaProductLM(cfg, rngs=nnx.Rngs(0))
    logits = model(input_ids, segment_ids=None, attention_mask=None)   # [B, T, vocab] fp32

Files: ``config`` (DeltaProductConfig), ``presets``, ``init`` (initialisation schemes),
``sharding_names`` (logical axis names), ``param``/``linear`` (annotated parameters, Linear,
Embedding), ``conv`` (ShortConv), ``norms`` (RMSNorm, GatedRMSNorm), ``mlp`` (GatedMLP),
``rope``, ``sequence`` (padding/packing bookkeeping), ``mixer`` (DeltaProductMixer),
``attention`` (hybrid softmax Attention), ``block`` (Block), ``lm`` (DeltaProductLM).
"""

from dpjax.nn import presets, sharding_names
from dpjax.nn.attention import Attention
from dpjax.nn.block import Block
from dpjax.nn.config import DeltaProductConfig
from dpjax.nn.conv import ShortConv
from dpjax.nn.linear import Embedding, Linear
from dpjax.nn.lm import DeltaProductLM
from dpjax.nn.mixer import DeltaProductMixer
from dpjax.nn.mlp import GatedMLP, intermediate_size
from dpjax.nn.norms import GatedRMSNorm, RMSNorm
from dpjax.nn.presets import get_preset, list_presets, state_tracking
from dpjax.nn.sequence import SequenceInfo

__all__ = [
    "Attention",
    "Block",
    "DeltaProductConfig",
    "DeltaProductLM",
    "DeltaProductMixer",
    "Embedding",
    "GatedMLP",
    "GatedRMSNorm",
    "Linear",
    "RMSNorm",
    "SequenceInfo",
    "ShortConv",
    "get_preset",
    "intermediate_size",
    "list_presets",
    "presets",
    "sharding_names",
    "state_tracking",
]
