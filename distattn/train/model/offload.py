"""Activation offload (``train.activation_checkpointing: offload``): full checkpointing whose
kept block inputs wait in host memory instead of on the device.

Full checkpointing keeps one tensor per block from forward to backward, its input ``[S, dim]``;
at Llama-3 8B and 128K tokens per GPU that is 1 GiB a layer, 32 GiB in all. Offload keeps them
in pinned host memory (ALST's checkpointed-activation offload):

* forward: when ``torch.utils.checkpoint`` saves a block's input, :meth:`Offload.pack` copies it
  to a pinned host buffer on a side stream, right after the kernels that wrote it (the side stream
  waits for the compute stream), and ``record_stream`` keeps the device memory from being reused
  until that copy is done; the device tensor goes when the model drops it (the next block).
* backward: blocks come back in reverse order; :meth:`Offload.unpack` of block ``i`` returns its
  input (copied back now only if it was not prefetched: the first block of the backward) and starts
  copying block ``i - 1``'s input back on the side stream, so it arrives while block ``i``
  recomputes and runs its backward. At most two block inputs are on the device at a time.

On CPU the same steps run: the input is copied out of torch's allocator into a host buffer (a
numpy array) and back, prefetched one block ahead, so the tensors a checkpoint gets back in
backward are copies that passed through the bookkeeping -- which the fp64 exactness test checks --
and a tensor-memory tracker (:mod:`distattn.bench.memtrack`) sees the device bytes drop as on a
GPU. Only floating-point tensors move: the int64 positions every block shares stay put.

One :class:`Offload` serves one forward (``Transformer.forward`` makes it and hands it to every
block) and the backward of that forward.
"""

from __future__ import annotations

from typing import Any

import torch


class _Stored:
    """A block input in host memory; ``device`` is its copy on the way back (prefetched or fetched)."""

    __slots__ = ("host", "shape", "dtype", "index", "device", "ready", "prefetched")

    def __init__(self, host, shape, dtype, index):
        self.host, self.shape, self.dtype, self.index = host, shape, dtype, index
        self.device, self.ready, self.prefetched = None, None, False


class Offload:
    """Saved-tensor hooks keeping checkpointed inputs in host memory (module docstring).

    ``stats()``: packed and unpacked counts, bytes copied out, and how many unpacks found their
    tensor already prefetched (all but the first block of each backward)."""

    def __init__(self, device: torch.device):
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.stream = torch.cuda.Stream(self.device) if self.cuda else None
        self.stored: list[_Stored] = []
        self.packed = self.unpacked = self.prefetch_hits = self.bytes_out = 0

    def hooks(self) -> torch.autograd.graph.saved_tensors_hooks:
        """The context to save under: wrap the ``checkpoint(...)`` call of a block in it."""
        return torch.autograd.graph.saved_tensors_hooks(self.pack, self.unpack)

    def pack(self, t: torch.Tensor) -> Any:
        if not t.is_floating_point() or t.device.type != self.device.type:
            return t     # integer positions, and host tensors a block saves (they hold no device memory)
        if self.cuda:
            host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
            self.stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(self.stream):
                host.copy_(t, non_blocking=True)
            t.record_stream(self.stream)
        else:
            # bytes, so every dtype (bf16 too) fits numpy
            host = t.detach().contiguous().reshape(-1).view(torch.uint8).numpy().copy()
        stored = _Stored(host, t.shape, t.dtype, len(self.stored))
        self.stored.append(stored)
        self.packed += 1
        self.bytes_out += t.numel() * t.element_size()
        return stored

    def _fetch(self, stored: _Stored) -> None:
        if stored.device is not None:
            return
        if self.cuda:
            self.stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(self.stream):
                stored.device = stored.host.to(self.device, non_blocking=True)
                stored.ready = torch.cuda.Event()
                stored.ready.record(self.stream)
        else:
            stored.device = torch.from_numpy(stored.host).clone().view(stored.dtype).view(stored.shape)

    def unpack(self, stored: Any) -> torch.Tensor:
        if not isinstance(stored, _Stored):
            return stored
        self.unpacked += 1
        if stored.device is not None and stored.prefetched:
            self.prefetch_hits += 1
        self._fetch(stored)
        t = stored.device
        if self.cuda:
            current = torch.cuda.current_stream(self.device)
            current.wait_event(stored.ready)
            t.record_stream(current)
        stored.device = None     # the checkpoint holds it now; a second unpack fetches it again
        if stored.index > 0:     # backward runs the blocks in reverse: the one before is next
            before = self.stored[stored.index - 1]
            before.prefetched = before.device is None
            self._fetch(before)
        return t

    def stats(self) -> dict[str, int]:
        return {"packed": self.packed, "unpacked": self.unpacked, "prefetch_hits": self.prefetch_hits,
                "bytes_out": self.bytes_out}
