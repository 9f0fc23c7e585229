"""The data's identity, recorded in every checkpoint (``run.data.identity``) so a resume onto other
data than the run trained on is refused, not continued at the old cursor into other documents.

* a prepared folder: the SHA-256 of its ``index.json`` (which records every shard's SHA-256);
* a token file, a Megatron prefix, an HF folder or Parquet file: per file its size, mtime and a
  sampled SHA-256 (the first and last 1 MiB and eight evenly spaced 64 KiB blocks), cheap on any
  corpus size;
* stdlib: none (Python's own sources, nothing to compare).
"""

from __future__ import annotations

import functools
import hashlib
from pathlib import Path

from .sharded import INDEX_NAME, is_prepared
from .verify import file_sha256

_EDGE = 1 << 20
_BLOCK = 64 << 10
_BLOCKS = 8


def sampled_sha256(path: Path) -> str:
    """SHA-256 of ``path``'s first and last 1 MiB and ``_BLOCKS`` evenly spaced 64 KiB blocks."""
    size = path.stat().st_size
    digest = hashlib.sha256(str(size).encode())
    with open(path, "rb") as f:
        starts = [0] + [size * (i + 1) // (_BLOCKS + 1) for i in range(_BLOCKS)] + [max(size - _EDGE, 0)]
        for i, start in enumerate(starts):
            f.seek(start)
            digest.update(f.read(_EDGE if i in (0, len(starts) - 1) else _BLOCK))
    return digest.hexdigest()


def _files(source: str, path: str) -> list[Path]:
    if source == "megatron":
        from .megatron import _prefix_files

        return list(_prefix_files(path))
    if source == "hf":
        from .hf import hf_files

        return hf_files(path)[1]
    prefix = Path(path)
    return [prefix.with_name(prefix.name + ".bin"), prefix.with_name(prefix.name + ".idx.npy")]


@functools.lru_cache(maxsize=64)
def data_identity(source: str, path: str | None) -> dict | None:
    """The identity of one source (module docstring); cached: a run's checkpoints record the data it
    opened, without hashing it again at every save."""
    if source in ("stdlib", "blend") or path is None:
        return None
    if source == "tokens" and is_prepared(path):
        return {"index_sha256": file_sha256(Path(path) / INDEX_NAME)}
    return {"files": {str(f): {"size": f.stat().st_size, "mtime": f.stat().st_mtime, "sha256": sampled_sha256(f)}
                      for f in _files(source, path)}}


def identity_change(saved: dict | None, now: dict | None) -> str | None:
    """What differs between a checkpoint's identity and the data's now, in words; None when the same.
    An mtime alone is not a change: a copy or a restore keeps the bytes and moves the mtime."""
    if saved is None or now is None or saved == now:
        return None
    if "index_sha256" in saved or "index_sha256" in now:
        return (f"its {INDEX_NAME} SHA-256 is {str(now.get('index_sha256', 'none'))[:16]} "
                f"(checkpoint: {str(saved.get('index_sha256', 'none'))[:16]})")
    old, new = saved.get("files", {}), now.get("files", {})
    for name in sorted(set(old) | set(new)):
        if name not in old or name not in new:
            return f"file {name} is {'new' if name in new else 'gone'}"
        a, b = old[name], new[name]
        if (a.get("size"), a.get("sha256")) != (b["size"], b["sha256"]):
            return (f"file {name} has {b['size']:,} bytes, sampled SHA-256 {b['sha256'][:16]} (checkpoint: "
                    f"{a.get('size', 0):,} bytes, {str(a.get('sha256'))[:16]})")
    return None
