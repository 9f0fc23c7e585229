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
