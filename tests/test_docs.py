"""The documentation site (issue 68): it builds strictly, its reference pages hold every config key and
command, the README is a landing page that links into it, and no relative link of the manual is dead.
(Its code blocks run in tests/test_readme.py, with the README's.)"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _hooks():
    spec = importlib.util.spec_from_file_location("docs_hooks", ROOT / "docs" / "hooks.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_site_builds_strictly(tmp_path):
    pytest.importorskip("mkdocs", reason="the docs extra: pip install -e '.[docs]'")
    done = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-d", str(tmp_path / "site")],
                          cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    config = (tmp_path / "site" / "reference" / "config" / "index.html").read_text()
    assert "parallel.cad_backward" in config and "data.on_bad_document" in config


def test_the_config_reference_lists_every_key_of_the_sections():
    from distattn.train.config.sections import RunConfig

    keys = {f"{s.name}.{f.name}" for s in dataclasses.fields(RunConfig)
            for f in dataclasses.fields(getattr(RunConfig(), s.name))}
    rows = _hooks().config_rows()
    assert {row[0] for row in rows} == keys and len(rows) == len(keys)
    assert all(row[4] for row in rows), [row[0] for row in rows if not row[4]]   # each key says what it means
    table = _hooks().config_table()
    assert all(f"`{key}`" in table for key in keys)


def test_the_cli_reference_lists_every_command():
    names = [name for name, _ in _hooks().cli_commands()]
    for command in ("distattn train", "distattn launch", "distattn simulate", "distattn bench", "distattn demo",
                    "distattn data prepare", "distattn data verify", "distattn ckpt verify", "distattn cluster probe"):
        assert command in names, names
    text = _hooks().cli_text()
    assert all(f"## `{name}`" in text for name in names) and "--print-config" in text


def test_the_readme_is_a_landing_page_linking_into_the_docs():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 150
    for page in ("docs/quickstart.md", "docs/guides/embed.md", "docs/reference/config.md"):
        assert f"]({page})" in readme, page


def test_every_relative_link_of_the_manual_points_to_a_file():
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
    dead = []
    for page in pages:
        for target in re.findall(r"\]\(([^)\s]+)\)", page.read_text()):
            if "://" in target or target.startswith("#"):
                continue
            if not (page.parent / target.split("#")[0]).exists():
                dead.append(f"{page.relative_to(ROOT)} -> {target}")
    assert not dead, dead
