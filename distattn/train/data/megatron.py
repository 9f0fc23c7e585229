"""``data.source: megatron``: Megatron-core indexed datasets, ``PREFIX.bin`` + ``PREFIX.idx``.

Read with numpy memory maps from the format itself (Megatron need not be installed). What
Megatron-core's ``IndexedDatasetBuilder`` (``tools/preprocess_data.py``) writes::

    PREFIX.idx   b"MMIDIDX\\x00\\x00"  version <Q (1)  dtype code <B  sequence count S <Q
                 document count D+1 <Q  sequence lengths int32[S]  sequence pointers int64[S]
                 (byte offsets into .bin)  document indices int64[D+1]  [sequence modes int8[S],
                 multimodal datasets only]
    PREFIX.bin   the tokens of every sequence, flat, in the dtype of the code (native order)

A Megatron *document* holds one or more *sequences* (several with ``--split-sentences``: one per
sentence); document ``d`` is sequences ``document_indices[d]`` to ``document_indices[d + 1]``,
exactly what ``IndexedDataset.document_indices`` reports. A distattn document is a Megatron
document: its sequences concatenated (the builder writes them back to back, which is checked).
Sequences after the last document boundary belong to no document and are not read. Empty
documents are allowed; the packer passes over them.
"""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np

from .corpus import FlatCorpus

MAGIC = b"MMIDIDX\x00\x00"
VERSION = 1
HEADER_BYTES = 34                 # magic 9 + version 8 + dtype code 1 + two counts 8 + 8
# Megatron-core's DType codes (megatron/core/datasets/indexed_dataset.py); 6 and 7 are floats
DTYPES = {1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64, 8: np.uint16}
CHUNK = 1 << 24                   # sequences (or tokens) checked at a time: memory stays bounded
_HINT = "write it again with Megatron's tools/preprocess_data.py"


def _prefix_files(prefix: str | Path) -> tuple[Path, Path]:
    prefix = Path(prefix)
    bin_path, idx_path = prefix.with_name(prefix.name + ".bin"), prefix.with_name(prefix.name + ".idx")
    for p in (idx_path, bin_path):
        if not p.is_file():
            hint = (f"data.path is the prefix without the extension: {prefix.with_suffix('')}"
                    if prefix.suffix in (".bin", ".idx") else "data.path is the PREFIX of PREFIX.bin and PREFIX.idx")
            raise ValueError(f"data.path: {p} does not exist ({hint}, as Megatron's --data-path)")
    return bin_path, idx_path


def read_header(idx_path: Path) -> tuple[np.dtype, int, int]:
    """(token dtype, sequence count, document count + 1) of a Megatron ``.idx``; ``ValueError``
    naming the file when it is not one."""
    with open(idx_path, "rb") as f:
        head = f.read(HEADER_BYTES)
    if len(head) < HEADER_BYTES or head[:9] != MAGIC:
        raise ValueError(f"data.path: {idx_path} is not a Megatron index (it starts {head[:9]!r}, not {MAGIC!r}); "
                         f"{_HINT}")
    version, code, sequences, documents = struct.unpack("<QBQQ", head[9:])
    if version != VERSION:
        raise ValueError(f"data.path: {idx_path} is a version-{version} Megatron index; only version {VERSION} is "
                         f"read; {_HINT}")
    if code not in DTYPES:
        what = "floating-point tokens" if code in (6, 7) else f"unknown dtype code {code}"
        raise ValueError(f"data.path: {idx_path} holds {what}, not integer token ids; {_HINT}")
    return np.dtype(DTYPES[code]).newbyteorder("<"), sequences, documents


class MegatronCorpus(FlatCorpus):
    """``PREFIX.bin`` + ``PREFIX.idx`` memory-mapped (module docstring). Opening it reads the index
    once (12 bytes a sequence, in chunks) to check that the sequences lie back to back and fill
    the ``.bin``; it keeps 8 bytes a document (the document offsets)."""

    def __init__(self, prefix: str | Path):
        self.bin_path, self.idx_path = _prefix_files(prefix)
        self.dtype, sequences, documents = read_header(self.idx_path)
        width = self.dtype.itemsize
        size = self.idx_path.stat().st_size
        need = HEADER_BYTES + 12 * sequences + 8 * documents
        if size not in (need, need + sequences):   # + one mode byte a sequence: multimodal
            raise ValueError(f"data.path: {self.idx_path} holds {size:,} bytes, but its header counts {sequences:,} "
                             f"sequences and {documents:,} document indices ({need:,} bytes); it is truncated or "
                             f"damaged: {_HINT}")
        index = np.memmap(self.idx_path, dtype=np.uint8, mode="r")
        lengths = index[HEADER_BYTES:HEADER_BYTES + 4 * sequences].view("<i4")
        pointers = index[HEADER_BYTES + 4 * sequences:HEADER_BYTES + 12 * sequences].view("<i8")
        bounds = index[HEADER_BYTES + 12 * sequences:need].view("<i8")
        if documents < 2 or bounds[0] != 0 or bounds[-1] > sequences or (np.diff(bounds) < 0).any():
            raise ValueError(f"data.path: {self.idx_path}: the document indices must rise from 0 to at most the "
                             f"{sequences:,} sequences, and name at least one document; {_HINT}")
        end = self._check_back_to_back(lengths, pointers, width)
        if end != self.bin_path.stat().st_size:
            raise ValueError(f"data.path: {self.bin_path} holds {self.bin_path.stat().st_size:,} bytes but "
                             f"{self.idx_path.name} describes {end:,}; the pair is truncated or from different "
                             f"runs: {_HINT}")
        # offsets in tokens of each document boundary: a sequence's pointer, or the end past the last
        offsets = np.full(documents, end // width, dtype=np.int64)
        inside = np.asarray(bounds) < sequences
        offsets[inside] = pointers[np.asarray(bounds)[inside]] // width
        self.offsets, self.lengths = offsets, np.diff(offsets)
        self.sequences = sequences
        if end == 0 or not self.lengths.any():
            raise ValueError(f"data.path: {self.idx_path} holds no tokens; {_HINT}")
        self.tokens = np.memmap(self.bin_path, dtype=self.dtype, mode="r")

    def _check_back_to_back(self, lengths: np.ndarray, pointers: np.ndarray, width: int) -> int:
        """Bytes the sequences span; ``ValueError`` unless each starts where the one before ends."""
        end = 0
        for a in range(0, len(lengths), CHUNK):
            lens = np.asarray(lengths[a:a + CHUNK], dtype=np.int64)
            ptrs = np.asarray(pointers[a:a + CHUNK])
            starts = end + np.concatenate([[0], np.cumsum(lens[:-1])]) * width
            if (lens < 0).any() or (ptrs != starts).any():
                bad = a + int(np.argmax((lens < 0) | (ptrs != starts)))
                raise ValueError(f"data.path: {self.idx_path}: sequence {bad:,} does not start where the one before "
                                 f"ends (pointer {int(pointers[bad]):,}, length {int(lengths[bad]):,}); {_HINT}")
            end = int(ptrs[-1]) + int(lens[-1]) * width
        return end

    def token_range(self) -> tuple[int, int]:
        """(smallest, largest) token id in the ``.bin``: one pass over the memory map, a chunk at a time."""
        low, high = int(self.tokens[0]), int(self.tokens[0])   # the corpus holds a token (checked)
        for a in range(0, len(self.tokens), CHUNK):
            chunk = self.tokens[a:a + CHUNK]
            low, high = min(low, int(chunk.min())), max(high, int(chunk.max()))
        return low, high


def check_ids(prefix: str | Path, vocab_size: int) -> list[tuple[Path, int, int]]:
    """``[(.bin, smallest id, largest id)]`` to check against ``vocab_size``, read only when the
    dtype can hold an id out of range (a uint16 .bin cannot exceed a vocabulary of 65,536)."""
    corpus = MegatronCorpus(prefix)
    info = np.iinfo(corpus.dtype)
    if info.min >= 0 and info.max < vocab_size:
        return []
    low, high = corpus.token_range()
    return [(corpus.bin_path, low, high)]
