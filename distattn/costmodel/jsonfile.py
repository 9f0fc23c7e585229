"""JSON inputs read in one line of error: a file that is missing, unreadable, not JSON or nested past
what Python's parser can recurse into (a RecursionError, a traceback, otherwise) is a ``ValueError``
naming the file and what it should hold."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def read_json(path: str | Path, holds: str) -> Any:
    """The JSON value in ``path``; ``holds`` says what the file should hold (the error's fix)."""
    try:
        text = Path(path).read_text(encoding="utf-8-sig")   # (a BOM: a file a Windows editor saved)
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path} cannot be read ({exc}); it should hold {holds}") from None
    try:
        return json.loads(text)
    except RecursionError:
        raise ValueError(f"{path} is nested too deeply to be {holds}") from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path} is not JSON ({exc}); it should hold {holds}") from None
