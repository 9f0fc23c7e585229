"""The reference model: a Llama-style decoder whose attention is ``distattn.attention``.

:mod:`.transformer` (:class:`Transformer`, its blocks, rotary positions inside each document),
:mod:`.loss` (chunked cross-entropy: never the whole ``[T, V]`` logits), :mod:`.tiled` (the SwiGLU MLP
in token tiles) and :mod:`.offload` (block inputs kept in host memory for the backward).
"""

from .transformer import Block, Compiled, Transformer

__all__ = ["Block", "Compiled", "Transformer"]
