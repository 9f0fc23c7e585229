"""Commands the CLI prints for the user to run next, written so that they run as printed in the same
shell: the executable as the user invoked it (``.venv/bin/distattn`` when typed as that path,
``distattn`` only when the shell found this one on PATH, ``python -m distattn.cli`` under a launcher).
Nothing here imports torch."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path


def _shown(path: str) -> str:
    """``path`` relative to the working directory when it lies inside it (``.venv/bin/python``), else as is."""
    try:
        rel = os.path.relpath(path)
    except ValueError:
        return path
    return rel if not rel.startswith(os.pardir) and os.sep in rel else path


def _on_path(name: str, path: str) -> bool:
    """Whether the shell finds ``path`` itself under ``name`` on PATH."""
    found = shutil.which(name)
    try:
        return found is not None and os.path.samefile(found, path)
    except OSError:
        return False


def distattn_command() -> list[str]:
    """The words that start ``distattn`` as this process was started: ``sys.argv[0]`` as typed (a path
    with a folder: ``.venv/bin/distattn``), ``distattn`` when that is what PATH finds, this Python with
    ``-m distattn.cli`` for ``python -m distattn.cli`` (torchrun's workers). Called some other way (in a
    script or a test): the console script beside this Python, else ``-m`` again."""
    argv0 = sys.argv[0] if sys.argv else ""
    main = Path(__file__).with_name("__main__.py")
    try:
        is_main = bool(argv0) and os.path.samefile(argv0, main)
    except OSError:
        is_main = False
    if is_main:
        return [_shown(sys.executable), "-m", "distattn.cli"]
    if Path(argv0).name == "distattn" and os.path.isfile(argv0):
        if os.path.isabs(argv0) and _on_path("distattn", argv0):
            return ["distattn"]
        return [argv0]
    beside = Path(sys.executable).with_name("distattn")
    if beside.is_file():
        return ["distattn"] if _on_path("distattn", str(beside)) else [_shown(str(beside))]
    return [_shown(sys.executable), "-m", "distattn.cli"]


def tool_command(name: str, module: str) -> list[str]:
    """The words that start the console script ``name`` of a package installed beside distattn
    (``tensorboard``): ``name`` when PATH finds it, else the one beside this Python, else this
    Python with ``-m module``."""
    if shutil.which(name):
        return [name]
    beside = Path(sys.executable).with_name(name)
    if beside.is_file():
        return [_shown(str(beside))]
    return [_shown(sys.executable), "-m", module]
