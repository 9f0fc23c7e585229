"""Config values from the command line: ``section.key=value`` words merged into a config file's mapping.

::

    distattn train configs/tiny.yaml parallel.cp=8 train.lr=1e-4 model.softcap=null

    >>> parse_overrides(["parallel.cp=8", "train.lr=1e-4", "model.softcap=null"], {"train.steps": 5})
    {'parallel': {'cp': 8}, 'train': {'lr': 0.0001, 'steps': 5}, 'model': {'softcap': None}}

A value is read as one YAML value, by the same loader as a file (``true``, ``null``, ``[1, 2]``,
``{a: 1}``, ``"quoted text"``), except that ``1e-4`` is a number here: PyYAML reads exponents without
a dot as text, and on a command line that is nearly always a learning rate. Only the keys are
checked here (section and name, with the closest known one suggested, each given once);
:func:`distattn.train.config.load_config` merges the values into the file's sections before the
file's own type and range checks run, so a value refused on the command line is refused with the
same words as in the file.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import typing
from typing import Any, Iterable, Mapping

import yaml

from .sections import RunConfig
from .yaml_strict import UniqueKeyLoader

# section -> key -> value, the shape of a config file's mapping
Overrides = dict[str, dict[str, Any]]


class _ValueLoader(UniqueKeyLoader):
    """The file's loader, plus YAML 1.2's floats: ``1e-4``, ``5E3`` (PyYAML 1.1 wants ``1.0e-4``)."""


_ValueLoader.add_implicit_resolver("tag:yaml.org,2002:float",
                                   re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9][0-9_]*)[eE][-+]?[0-9]+$"),
                                   list("-+0123456789."))


def known_keys() -> dict[str, list[str]]:
    """Each section's keys, in the order ``distattn/train/config/sections.py`` declares them."""
    return {name: [f.name for f in dataclasses.fields(cls)] for name, cls in typing.get_type_hints(RunConfig).items()}


def _closest(key: str, keys: Mapping[str, list[str]], section: str | None = None) -> str:
    """``"; did you mean S.K?"`` for ``key``: the same name in another section (``parallel.lr``: ``train.lr``),
    else a close name in ``section``, else in any section; "" for none."""
    exact = [f"{s}.{key}" for s, names in keys.items() if key in names and s != section]
    if exact:
        return f"; did you mean {' or '.join(exact)}?"
    for where in ([section] if section else []) + [s for s in keys if s != section]:
        close = difflib.get_close_matches(key, keys[where], n=1)
        if close:
            return f"; did you mean {where}.{close[0]}?"
    return ""


def _shown(word: str) -> str:
    """``word`` for a one-line message (a pasted value may be long)."""
    return word if len(word) <= 80 else f"{word[:60]}...({len(word)} characters)"


def check_key(dotted: str, word: str | None = None) -> tuple[str, str]:
    """``dotted`` (``section.key``) split in two, or ``ValueError`` naming it and the closest known key;
    ``word`` is what the user wrote, for the message."""
    where = f"override {_shown(word)}" if word is not None else dotted
    keys = known_keys()
    section, dot, key = dotted.partition(".")
    if not (section and dot and key) or "." in key:
        raise ValueError(f"{where}: a config key is section.key (sections: {', '.join(keys)})"
                         + ("" if dot else _closest(dotted, keys)))
    if section not in keys:
        close = difflib.get_close_matches(section, list(keys), n=1)
        hint = "" if not close else f"; did you mean {close[0]}.{key}?" if key in keys[close[0]] else \
            f"; did you mean {close[0]}?"
        raise ValueError(f"{where}: unknown config section '{section}'{hint} (known: {', '.join(keys)})")
    if key not in keys[section]:
        raise ValueError(f"{where}: unknown config key '{dotted}'"
                         + (_closest(key, keys, section) or f"; known keys of {section}: {', '.join(keys[section])}"))
    return section, key


def parse_value(word: str, text: str) -> Any:
    """``text`` read as one YAML value, or ``ValueError`` naming ``word``."""
    try:
        return yaml.load(text, Loader=_ValueLoader)
    except RecursionError:
        raise ValueError(f"override {_shown(word)}: nested too deeply to be a config value") from None
    except (yaml.YAMLError, ValueError, TypeError) as exc:   # the last two: a tag that does not fit (!!int x)
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ValueError(f"override {_shown(word)}: the value is not valid YAML ({problem}); quote text, e.g. "
                         f"'{word.partition('=')[0]}=\"...\"'") from None


def parse_overrides(words: Iterable[str], flags: Mapping[str, Any] | None = None) -> Overrides:
    """``section.key=value`` words, plus ``flags``: values already typed by dotted key (``--steps`` gives
    ``{"train.steps": 5}``; None: not given), as a mapping of sections. A key given twice is refused, as
    in a file: which one should win is not obvious from a command line."""
    given: dict[str, str] = {}
    merged: Overrides = {}

    def put(dotted: str, value: Any, how: str) -> None:
        section, key = check_key(dotted, how)
        if dotted in given:
            raise ValueError(f"{dotted} is given twice on the command line ({given[dotted]} and {how}); keep one")
        given[dotted] = how
        merged.setdefault(section, {})[key] = value

    for word in words:
        dotted, eq, text = word.partition("=")
        if not eq:
            raise ValueError(f"override {_shown(word)!r} has no '=': write section.key=value, e.g. parallel.cp=8 "
                             f"(one config file, then any number of these)")
        put(dotted, parse_value(word, text), word)
    for dotted, value in (flags or {}).items():
        if value is not None:
            put(dotted, value, f"--{dotted.partition('.')[2].replace('_', '-')} {value}")
    return merged


def merge_overrides(raw: dict, overrides: Overrides) -> dict:
    """A copy of a config file's top-level mapping with ``overrides`` written into its sections. A section
    the file left empty (``model:``) becomes a mapping; one that is not a mapping is left for the file's
    own check to refuse."""
    merged = dict(raw)
    for section, values in overrides.items():
        current = merged.get(section)
        if current is None:
            current = {}
        if isinstance(current, dict):
            merged[section] = {**current, **values}
    return merged
