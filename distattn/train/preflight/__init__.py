"""What the launching process checks before any rank starts, in seconds and one line each.

:mod:`.checks` (data, memory and the output folder), :mod:`.memory` (the run's memory ``Job`` and its
estimate, what ``--dry-run`` prints) and :mod:`.capacity` (the longest ``data.seq_len`` that fits:
``--dry-run --max-seq-len``).
"""

from .checks import check_data, check_memory, lock_out, prepare_out

__all__ = ["check_data", "check_memory", "lock_out", "prepare_out"]
