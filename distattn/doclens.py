"""Document lengths for packed batches: real samples from a JSON file, or a synthetic skew.

Packed sequences are filled greedily with documents drawn from a length
distribution, the last one cut at the sequence end (how long-context training
pipelines pack). Real samples (e.g. ProLong's, median ~1.9K, mean ~3.1K
tokens) are JSON lists of ints; without one, a log-normal with the same
median and a similar tail stands in.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np


def load_doc_lens(path: str | Path) -> np.ndarray:
    """A JSON list of positive document lengths."""
    values = json.loads(Path(path).read_text())
    if not isinstance(values, list) or not values or not all(isinstance(x, int) and x > 0 for x in values):
        raise ValueError(f"{path}: expected a non-empty JSON list of positive ints (document lengths)")
    return np.asarray(values, dtype=np.int64)


def upsample_long(pool: np.ndarray, threshold: int = 65536, factor: int = 4) -> np.ndarray:
    """``pool`` with every document longer than ``threshold`` repeated ``factor`` times in all
    (how the DistCA evaluation skews a sample toward long documents)."""
    pool = np.asarray(pool)
    return np.concatenate([pool, np.repeat(pool[pool > threshold], factor - 1)])


def pack(total: int, pool: np.ndarray | None = None, *, median: int = 1900, sigma: float = 1.0,
         seed: int = 0) -> list[int]:
    """Document lengths summing to ``total``: drawn from ``pool`` (uniformly) or, without one,
    log-normal with ``median`` and ``sigma``; the last document is cut at the end."""
    if total < 1 or median < 1:
        raise ValueError(f"total ({total}) and median ({median}) must be >= 1")
    rng = np.random.default_rng(seed)
    lens: list[int] = []
    filled = 0
    while filled < total:
        n = int(pool[rng.integers(len(pool))]) if pool is not None else max(1, int(rng.lognormal(np.log(median),
                                                                                                  sigma)))
        n = min(n, total - filled)
        lens.append(n)
        filled += n
    return lens


# the named workloads of `distattn bench` (and of the simulator's calibration against it)
MASK_CASES = ("causal", "full", "causal-doc", "full-doc", "window")


def mask_case(mask: str, seq_len: int, pool, seed: int) -> tuple[list[int], bool, int | None]:
    """``(doc_lens, causal, window)`` of a named workload: ``causal``/``full`` one document,
    ``causal-doc``/``full-doc`` packed documents (from ``pool`` or the log-normal stand-in),
    ``window`` one causal document with a window of ``seq_len / 8``."""
    if mask not in MASK_CASES:
        raise ValueError(f"mask {mask!r} is unknown; choose from {', '.join(MASK_CASES)}")
    if mask in ("causal", "full", "window"):
        return [seq_len], mask != "full", (max(1, seq_len // 8) if mask == "window" else None)
    docs = pack(seq_len, None if pool is None else np.asarray(pool), seed=seed, median=max(1, seq_len // 16))
    return docs, mask == "causal-doc", None
