"""Checkpoints that prove themselves: saved with DCP, read without running code from their files.

:mod:`.dcp` (save, load and finding the newest good one), :mod:`.dcp_safe` (DCP's pickles read by a
closed unpickler), :mod:`.manifest` (every file's size and SHA-256 plus the run's shape and batch
geometry), :mod:`.resume` (what a resumed run keeps, and where it starts from) and :mod:`.retention`
(how many a run keeps), :mod:`.disk` (what a full disk says).
"""

from .dcp import agreed_checkpoint, candidates, load, newest_usable, room_needed, save, verify

__all__ = ["agreed_checkpoint", "candidates", "load", "newest_usable", "room_needed", "save", "verify"]
