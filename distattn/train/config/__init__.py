"""A run's config: YAML validated into frozen dataclasses.

:mod:`.sections` (the four sections' dataclasses and their defaults), :mod:`.validation` (every
check, one line each), :mod:`.overrides` (``section.key=value`` words from the command line),
:mod:`.yaml_strict` (the loader both read with) and :mod:`.loader` (:func:`load_config`: a file and
its overrides into a :class:`RunConfig`). Import from here::

    from distattn.train.config import load_config
    cfg = load_config("tiny", ["parallel.cp=4"])
"""

from .loader import load_config
from .overrides import parse_overrides
from .sections import (CHECKPOINTING, DTYPES, ON_NONFINITE, PACKINGS, SOURCES, BlendSource, DataConfig, ModelConfig,
                       ParallelConfig, RunConfig, TrainSection)
from .validation import validate

__all__ = ["CHECKPOINTING", "DTYPES", "ON_NONFINITE", "PACKINGS", "SOURCES", "BlendSource", "DataConfig",
           "ModelConfig", "ParallelConfig", "RunConfig", "TrainSection", "load_config", "parse_overrides", "validate"]
