"""Which optional extra each feature needs, and the one error that says so.

``pip install distattn`` is the core: plans, attention, the schedulers, the trainer on its own data
and the CLI. Each framework adapter or data format needs its extra (``pyproject.toml``)::

    pip install 'distattn[megatron]'   # distattn.parallel.megatron
    pip install 'distattn[hf]'         # distattn.parallel.hf, distattn.compat's HF patching
    pip install 'distattn[all]'        # every feature; [dev] adds the test tools

:func:`require` is called where a feature starts (an adapter's import, a launcher's entry), so a
missing framework is one ``ImportError`` naming the extra instead of a ``ModuleNotFoundError``
from deep inside.
"""

from __future__ import annotations

import importlib.util


def installed(module: str) -> bool:
    """Whether ``module`` (dotted names too) can be imported, without importing it."""
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):   # a dotted name whose parent is missing
        return False


def require(module: str, extra: str, feature: str) -> None:
    """``ImportError`` naming ``pip install 'distattn[extra]'`` unless ``module`` is installed."""
    if not installed(module):
        raise ImportError(f"{feature} needs {module.split('.')[0]}, which is not installed: "
                          f"pip install 'distattn[{extra}]' (or 'distattn[all]')")
