"""Progress through bytes of input, for passes that can take hours (``distattn data prepare``, the
preflight scan of a Hugging Face corpus): a tqdm bar when stderr is a terminal, else a line through
``say`` every ``EVERY_S`` seconds (a log file or a batch job's output would fill with bar redraws)."""

from __future__ import annotations

import sys
import time
from typing import Callable

EVERY_S = 30.0


class Progress:
    """``update(done, note)`` with ``done`` the bytes done so far (of ``total``); ``note`` (e.g.
    "1,024 documents") goes on the bar or the line."""

    def __init__(self, total: int, done: int, say: Callable[[str], None], desc: str):
        self.total, self.say, self.desc = total, say, desc
        self.start, self.last, self.first = time.monotonic(), 0.0, done
        self.bar = None
        if sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=done, unit="B", unit_scale=True, unit_divisor=1024,
                            desc=desc, dynamic_ncols=True)

    def update(self, done: int, note: Callable[[], str] | str = "") -> None:
        now = time.monotonic()
        if self.bar is not None:
            self.bar.update(done - self.bar.n)
            if now - self.last > 1:   # the note may count things: not at every call
                self.bar.set_postfix_str(note() if callable(note) else note, refresh=False)
                self.last = now
        elif now - self.last >= EVERY_S and now - self.start >= EVERY_S:
            rate, share = (done - self.first) / (now - self.start) / 1e6, 100 * done / max(self.total, 1)
            text = note() if callable(note) else note
            self.say(f"{self.desc}: {done / 1e6:,.1f} of {self.total / 1e6:,.1f} MB ({share:.0f}%)"
                     f"{', ' + text if text else ''}, {rate:.1f} MB/s")
            self.last = now

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
