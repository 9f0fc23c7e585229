"""Run configs shipped with distattn (package data), so ``distattn train tiny`` works from a pip
install with no checkout: a CONFIG argument that is not a file but one of :func:`names` is read
from here."""

from __future__ import annotations

from importlib import resources
from pathlib import Path


def names() -> list[str]:
    """The built-in configs, by name (``tiny``, ``llama3-8b-128k-64gpu``, ...)."""
    return sorted(p.name[:-len(".yaml")] for p in resources.files(__name__).iterdir() if p.name.endswith(".yaml"))


def path(name: str) -> Path | None:
    """The file of built-in config ``name``, or None."""
    return Path(str(resources.files(__name__) / f"{name}.yaml")) if name in names() else None
