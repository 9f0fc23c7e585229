"""The longest sequence a layout trains in a memory budget, from the estimate (:mod:`.memory`):
``distattn train CONFIG --dry-run --max-seq-len``.

``longest_seq_len(cfg, budget)`` searches ``data.seq_len`` (multiples of ``1024 * cp``, so every
rank's share is a multiple of 1024 tokens) for the longest whose estimate fits -- per GPU on
``"cuda"``, all ranks together on ``"cpu"`` -- doubling until it does not fit, then bisecting.
The estimate grows with the length (activations, loss, attention buffers, inputs), so the search
is exact on the estimate's grid. Documents: one per sequence, as the estimate's default (the worst
case of the attention buffers). Under balanced packing a rank's sequence may hold the default token
cap, ``DEFAULT_CAP_FACTOR`` x ``seq_len``: the estimate is at that length.

``table(cfg, budget)`` answers the question per ``activation_checkpointing`` setting, with the MLP
whole and tiled (``train.mlp_chunk``: the config's, else :data:`TILED_MLP_CHUNK`).
"""

from __future__ import annotations

from ...sim.memory_model import TILED_MLP_CHUNK
from ..config import CHECKPOINTING, RunConfig
from ...planning.packing import DEFAULT_CAP_FACTOR
from .memory import GIB, estimate, fits_in

LONGEST = 1 << 34          # the search's ceiling: 16G tokens


def _fits(cfg: RunConfig, seq_len: int, budget: int, device: str) -> bool:
    # balanced packing: the default token cap, which grows with seq_len, as the estimate's length (an
    # explicit data.token_cap is for the config's seq_len, not for every length tried)
    cfg = cfg.replace(data={"seq_len": seq_len, "token_cap": None})
    return fits_in(cfg, estimate(cfg, device), budget)


def longest_seq_len(cfg: RunConfig, budget: int, device: str = "cuda") -> int:
    """The longest ``data.seq_len`` (a multiple of ``1024 * parallel.cp``) whose estimated peak fits
    ``budget`` bytes (module docstring); 0 when even one such step does not."""
    if budget <= 0:
        raise ValueError(f"budget must be > 0 bytes, got {budget}")
    step = 1024 * cfg.parallel.fixed_cp
    if not _fits(cfg, step, budget, device):
        return 0
    lo, hi = 1, 2             # in steps: lo fits, hi is still to try
    while hi * step <= LONGEST and _fits(cfg, hi * step, budget, device):
        lo, hi = hi, hi * 2
    if hi * step > LONGEST:
        return lo * step
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if _fits(cfg, mid * step, budget, device) else (lo, mid)
    return lo * step


def table(cfg: RunConfig, budget: int, device: str = "cuda") -> list[tuple[str, int, int, int]]:
    """Per checkpointing setting: (setting, longest with the MLP whole, the tiled MLP's chunk, longest
    with it)."""
    chunk = cfg.train.mlp_chunk or TILED_MLP_CHUNK
    return [(mode, longest_seq_len(cfg.replace(train={"activation_checkpointing": mode, "mlp_chunk": 0}), budget,
                                   device),
             chunk, longest_seq_len(cfg.replace(train={"activation_checkpointing": mode, "mlp_chunk": chunk}),
                                    budget, device))
            for mode in CHECKPOINTING]


def tokens(n: int) -> str:
    """``3_932_160`` -> ``"3.93M"`` (``"-"`` for 0: nothing fits)."""
    if n == 0:
        return "-"
    return f"{n / 1e6:.2f}M" if n >= 1_000_000 else f"{n / 1e3:.0f}K"


def report(cfg: RunConfig, budget: int, device: str = "cuda") -> list[str]:
    """The lines ``--dry-run --max-seq-len`` prints."""
    p = cfg.parallel
    where = (f"{budget / GIB:g} GiB per GPU" if device == "cuda" else
             f"{budget / GIB:,.1f} GiB for {cfg.world_size} CPU ranks")
    rows = table(cfg, budget, device)
    groups = f", head_groups {p.head_groups}" if p.head_groups > 1 else ""
    # the data-parallel mode sets the parameter states' share (hsdp: with its shard group)
    mode = cfg.wrapper + (f" dp_shard {cfg.job_facts().dp_shard}" if cfg.wrapper == "hsdp" else "")
    states = f", {mode}" + (" with cpu_offload" if p.cpu_offload else "")
    cp = p.fixed_cp
    lines = [f"longest seq_len that fits {where} (dp {p.dp} x cp {cp}, {p.fixed_scheduler}{groups}{states}, "
             f"{cfg.train.dtype}, {cfg.world_size} ranks; one document per sequence; multiples of {1024 * cp:,}; "
             + (f"balanced packing: a rank's sequence up to {DEFAULT_CAP_FACTOR:g} x seq_len; "
                if cfg.packing == "balanced" else "") +
             f"host memory not limited: --dry-run prints it):",
             f"  {'checkpointing':<14} {'MLP whole':>12} {f'MLP chunk {rows[0][2]}':>16}"]
    for mode, whole, _, tiled in rows:
        mark = "  <- this config" if mode == cfg.train.activation_checkpointing else ""
        lines.append(f"  {mode:<14} {tokens(whole):>12} {tokens(tiled):>16}{mark}")
    return lines
