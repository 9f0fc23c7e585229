"""What a full disk says about a checkpoint: :func:`no_room` is the one line a save, or the check before a
run starts, gives when the disk is too full for a checkpoint: the disk (device and mount point), the bytes
the save needs and those free, what the checkpoints there already take, and ``train.keep_last`` as the fix
(:mod:`.retention`)."""

from __future__ import annotations

import os
import re
from pathlib import Path

_STEP_DIR = re.compile(r"step_(\d+)")


def disk_name(folder: Path) -> str:
    """The disk holding ``folder``, in words: ``/dev/nvme0n1p2 mounted at /data`` (the mount point alone
    where the device cannot be read)."""
    path = Path(os.path.abspath(folder))
    while not path.exists() and path != path.parent:
        path = path.parent
    mount = path
    while not os.path.ismount(mount) and mount != mount.parent:
        mount = mount.parent
    try:
        with open("/proc/self/mounts") as f:
            devices = [line.split()[0] for line in f
                       if len(line.split()) > 1 and line.split()[1].replace("\\040", " ") == str(mount)]
    except OSError:
        devices = []
    return f"{devices[-1]} mounted at {mount}" if devices else f"the disk mounted at {mount}"


def held(ckpt_root: Path) -> tuple[int, int]:
    """``(checkpoints, bytes)``: the ``step_N`` folders under ``ckpt_root`` and what their files take."""
    count = size = 0
    try:
        folders = [p for p in Path(ckpt_root).iterdir()
                   if _STEP_DIR.fullmatch(p.name) and p.is_dir() and not p.is_symlink()]
    except OSError:
        return 0, 0
    for folder in folders:
        count += 1
        try:
            size += sum(e.stat(follow_symlinks=False).st_size for e in os.scandir(folder) if e.is_file())
        except OSError:
            pass
    return count, size


def advice(ckpt_root: Path, keep_last: int | None) -> str:
    """The end of a full disk's line: what the checkpoints under ``ckpt_root`` take, and the fixes,
    ``train.keep_last`` first."""
    count, size = held(ckpt_root)
    there = f"; {ckpt_root} holds {count} checkpoint(s), {size / 2**20:,.1f} MiB" if count else ""
    if keep_last is None:
        fix = "set train.keep_last (e.g. 2) to delete older checkpoints once a newer one verifies"
    elif keep_last > 1:
        fix = f"lower train.keep_last (now {keep_last})"
    else:
        fix = "train.keep_last is 1 already"
    return f"{there}; {fix}, free space there, or pass --out to another disk"


def no_room(ckpt_root: Path, need: int, free: int, keep_last: int | None, cause: str = "") -> str:
    """One line for a checkpoint the disk under ``ckpt_root`` has no room for: it needs ``need`` bytes,
    ``free`` are free; ``cause``: what the write said, when the disk filled under it (the room check
    before it passed, then another writer took the space: ENOSPC, or torch's ``unexpected pos N vs M``)."""
    ckpt_root = Path(ckpt_root)
    need_mib, free_mib = f"{need / 2**20:,.1f} MiB", f"{free / 2**20:,.1f} MiB"
    if cause:
        head = (f"{cause}; not enough free space: the disk filled while writing, {free_mib} free ({ckpt_root}) "
                f"on {disk_name(ckpt_root)}, and the checkpoint needs about {need_mib}")
    else:
        head = (f"not enough free space on {disk_name(ckpt_root)}: the checkpoint needs about {need_mib}, "
                f"{free_mib} are free ({ckpt_root})")
    return head + advice(ckpt_root, keep_last)
