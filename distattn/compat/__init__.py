"""Drop-in replacements for other context-parallel attention libraries' APIs, on distattn plans.

* :mod:`distattn.compat.ring_flash_attn`: ring-flash-attention's functions (ring, zigzag, llama3,
  stripe; varlen and batch; kv/qkv-packed) and its HF adapter, with the same signatures and
  sharding conventions: change the import, keep the call.
"""
