"""The live bytes of torch tensors on a device, and their peak: ``with TensorMemory("cpu") as mem: ...``.

A GPU has ``torch.cuda.max_memory_allocated``; a CPU rank's resident set (``ru_maxrss``) also holds
what glibc keeps after frees and every host-side buffer, so it cannot tell device memory from host
memory. This mode counts, op by op, the storages torch ops create on ``device`` that are still
alive, so a CPU run measures what a GPU's allocator would hold: what an offloaded activation
(:mod:`.offload`, which copies out of torch's allocator) takes off it shows as it would on a GPU.

It sees tensors made by torch ops while it is active (parameters too, when the model is built
inside it; and inside distattn's attention op, whose body it runs itself); storages resized in place (FSDP2 frees its unsharded parameters that way) are counted
at their current size, read after every op. The peak is over op boundaries, as precise as the
ops are small. A DTensor (FSDP2's parameters, their gradients and AdamW's state on them) counts as
its local shard. It costs a Python call per op: for measurements, not training.
"""

from __future__ import annotations

import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode, is_traceable_wrapper_subclass
from torch.utils._pytree import tree_leaves

from ..runtime.ops import IMPLEMENTATIONS


class TensorMemory(TorchDispatchMode):
    """While active: ``current`` and ``peak`` bytes of live tensor storages on ``device``, and
    ``peak_op``, the op the peak came after."""

    def __init__(self, device: str | torch.device = "cpu"):
        super().__init__()
        self.device = torch.device(device)
        self._live: dict[int, weakref.ref] = {}
        self.current = self.peak = 0
        self.peak_op = ""         # the op after which the peak was reached

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        body = IMPLEMENTATIONS.get(func)
        if body is None:
            out = func(*args, **(kwargs or {}))
        else:   # distattn's attention op: run its body with this mode on, so what it makes inside counts
            with self:
                out = body(*args, **(kwargs or {}))
        for t in (inner for leaf in tree_leaves(out) for inner in _plain(leaf)):
            if t.device == self.device:
                storage = t.untyped_storage()
                key = id(storage)
                if key not in self._live:
                    self._live[key] = weakref.ref(storage, lambda _, key=key: self._live.pop(key, None))
        # summed afresh: in-place storage resizes do not pass through here
        self.current = sum(_held(s) for s in (ref() for ref in list(self._live.values())) if s is not None)
        if self.current > self.peak:
            self.peak, self.peak_op = self.current, str(func)
        return out

    def reset_peak(self) -> None:
        self.peak = self.current


def _plain(t):
    """The plain tensors holding ``t``'s memory: a wrapper subclass's (a DTensor's local shard) -- the
    wrapper's own storage holds nothing, yet reports the whole tensor's bytes."""
    if not isinstance(t, torch.Tensor):
        return
    if is_traceable_wrapper_subclass(t):
        for name in t.__tensor_flatten__()[0]:
            yield from _plain(getattr(t, name))
    else:
        yield t


def _held(storage) -> int:
    """The bytes ``storage`` holds: 0 for a Python storage without memory (a wrapper's, or one whose
    memory is gone: they still report their old ``nbytes``)."""
    try:
        storage.data_ptr()
    except RuntimeError:   # "an invalid python storage"
        return 0
    return storage.nbytes()
