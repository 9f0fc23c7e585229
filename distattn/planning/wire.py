"""How attention's inputs travel between ranks: in their own dtype, or as FP8 (``comm_dtype="fp8"``).

With FP8, Q, K, V, out and dout cross the network as float8_e4m3 with one fp32 scale per token
and head (per column group: K and V side by side in one buffer get one each), and are
dequantized on arrival; gradients (dQ, dK/dV, in fp32 or their own dtype) always travel as they
are. A scaled block of one row keeps rows independent, so every executor's row-moving code
(gathers, all-to-all splits, ``cad``'s relays forwarding rows) moves the encoded rows unchanged::

    x      [T, H, D]           (bf16: 2 D bytes per token and head)
    wire   [T, H, D + 4]       uint8: D float8_e4m3 bytes, then the fp32 scale's 4 bytes
                                (D = 128: 0.52x the bf16 bytes)

The scale is ``amax / 448`` (448: e4m3's largest finite value) over the row's columns of the head,
so the largest entry is exact up to e4m3's 3-bit mantissa and nothing overflows. What a rank keeps
for itself (the ring's own K/V block) is used as it is; what goes through a collective (all-gather,
all-to-all) is rounded, the rank's own share of it included.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

COMM_DTYPES = (None, "fp8")
_FP8 = getattr(torch, "float8_e4m3fn", None)
_FP8_MAX = 448.0
_SCALE_BYTES = 4


def check_comm_dtype(comm_dtype, dtype: torch.dtype | None = None) -> str | None:
    """``ValueError`` unless ``comm_dtype`` is None or ``"fp8"`` (and, given the inputs' ``dtype``,
    that dtype can use it: fp64 plans exist to be exact)."""
    if comm_dtype not in COMM_DTYPES:
        raise ValueError(f"comm_dtype must be None (tensors travel in their dtype) or 'fp8', got {comm_dtype!r}")
    if comm_dtype == "fp8" and _FP8 is None:
        raise ValueError("comm_dtype='fp8' needs torch.float8_e4m3fn (torch >= 2.1)")
    if comm_dtype == "fp8" and dtype == torch.float64:
        raise ValueError("comm_dtype='fp8' with fp64 inputs: fp64 runs are the exact reference; drop comm_dtype")
    return comm_dtype


@dataclass(frozen=True)
class Wire:
    """The encoding of the tensors attention moves (see module docstring); ``fp8=False``: none."""

    fp8: bool = False

    def dtype(self, dtype: torch.dtype) -> torch.dtype:
        """The dtype a tensor of ``dtype`` travels in."""
        return torch.uint8 if self.fp8 else dtype

    def row_bytes(self, cols: tuple[int, ...], dtype_bytes: int) -> int:
        """Bytes per token and head of a tensor of column groups ``cols`` and ``dtype_bytes`` per
        element, as it travels (what ``plan.stats`` and cad's placement price)."""
        return self.width(cols) * (1 if self.fp8 else dtype_bytes)

    def width(self, cols: tuple[int, ...]) -> int:
        """Bytes (fp8) or elements (as they are) per token and head of a tensor of column groups ``cols``."""
        return sum(cols) + (_SCALE_BYTES * len(cols) if self.fp8 else 0)

    def encode(self, x: torch.Tensor, cols: tuple[int, ...] | None = None) -> torch.Tensor:
        """``x [T, H, sum(cols)]`` as it travels: ``x`` itself, or uint8 ``[T, H, width(cols)]``.
        ``cols``: the last dim's column groups, each scaled on its own (default: one group)."""
        if not self.fp8:
            return x
        parts = []
        for part in x.split(list(cols or (x.shape[-1],)), dim=-1):
            part = part.float()
            scale = part.abs().amax(-1, keepdim=True) / _FP8_MAX
            scale = torch.where(scale > 0, scale, torch.ones_like(scale))   # an all-zero row: any scale
            parts += [(part / scale).to(_FP8).view(torch.uint8), scale.view(torch.uint8)]
        return torch.cat(parts, dim=-1)

    def decode(self, wire: torch.Tensor, cols: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """Inverse of :meth:`encode` (up to the FP8 rounding): ``[T, H, sum(cols)]`` in ``dtype``."""
        if not self.fp8:
            return wire
        parts, at = [], 0
        for n in cols:
            values = wire[..., at:at + n].view(_FP8).float()
            scale = wire[..., at + n:at + n + _SCALE_BYTES].contiguous().view(torch.float32)
            parts.append((values * scale).to(dtype))
            at += n + _SCALE_BYTES
        return torch.cat(parts, dim=-1) if len(parts) > 1 else parts[0]
