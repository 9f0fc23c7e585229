"""The reference model: a Llama-style decoder whose attention is ``distattn.attention``.

:mod:`.batch` (:class:`LocalBatch`: what the model runs on, one or more nano-batches),
:mod:`.transformer` (:class:`Transformer`, its blocks, rotary positions inside each document),
:mod:`.loss` (chunked cross-entropy: never the whole ``[T, V]`` logits), :mod:`.tiled` (the SwiGLU MLP
in token tiles) and :mod:`.offload` (block inputs kept in host memory for the backward).
"""

from .batch import LocalBatch
from .transformer import Block, Compiled, Transformer

__all__ = ["Block", "Compiled", "LocalBatch", "Transformer"]
