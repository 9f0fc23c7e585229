"""The documentation site (issue 68): it builds strictly, its reference pages hold every config key and
command, the README is a landing page that links into it, and no relative link of the manual is dead.
(Its commands run in a fresh shell in tests/test_documented_commands.py, its Python blocks in
tests/test_readme.py.)

The site is built once for the module (about 3 s); the checks of what the generated pages hold read
the built HTML, and the hook's own functions are checked without MkDocs too."""

from __future__ import annotations

import argparse
import dataclasses
import html
import importlib.util
import os
import re
import subprocess
import sys
import typing
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LANDING_LINKS = ("docs/quickstart.md", "docs/guides/embed.md", "docs/reference/config.md")


def _hooks():
    spec = importlib.util.spec_from_file_location("docs_hooks", ROOT / "docs" / "hooks.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def config_keys() -> set[str]:
    """Every key of the run config, walked from the dataclasses here (not by the hook under test): a
    section's field as ``section.key``, a field holding a list of dataclasses as ``section.key[i].sub``."""
    from distattn.train.config.sections import RunConfig

    keys = set()
    for section in dataclasses.fields(RunConfig):
        cls = type(getattr(RunConfig(), section.name))
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            keys.add(f"{section.name}.{f.name}")
            inner = [a for outer in typing.get_args(hints[f.name]) for a in typing.get_args(outer)
                     if dataclasses.is_dataclass(a)]
            keys |= {f"{section.name}.{f.name}[i].{g.name}" for cls_ in inner for g in dataclasses.fields(cls_)}
    return keys


def cli_names(parser: argparse.ArgumentParser | None = None, path: str = "distattn") -> list[str]:
    """Every command of the ``distattn`` parser, the groups (``distattn cluster``) and their leaves."""
    if parser is None:
        from distattn.cli import build_parser

        parser = build_parser()
    names = [path]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                names += cli_names(sub, f"{path} {name}")
    return names


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    """``mkdocs build --strict`` into a temporary folder: any warning (a dead link, a docstring
    mkdocstrings cannot render, a page missing from the nav) fails it."""
    pytest.importorskip("mkdocs", reason="the docs extra is not installed: pip install -e '.[docs]' (part of [dev])")
    out = tmp_path_factory.mktemp("site")
    done = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-d", str(out)], cwd=ROOT,
                          capture_output=True, text=True, timeout=300, env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return out


def _text(page: Path) -> str:
    return html.unescape(re.sub(r"<[^>]+>", "", page.read_text(encoding="utf-8")))


def test_the_site_builds_strictly(site):
    assert (site / "index.html").is_file() and (site / "reference" / "api" / "index.html").is_file()


def test_the_config_reference_lists_every_key_of_the_sections(site):
    page = _text(site / "reference" / "config" / "index.html")
    missing = sorted(key for key in config_keys() if key not in page)
    assert not missing, f"keys of sections.py the built config reference does not list: {missing}"


def test_the_config_rows_are_every_key_each_with_its_meaning_and_checks():
    from distattn.train.config import sections

    rows = _hooks().config_rows()
    assert sorted(row[0] for row in rows) == sorted(config_keys())
    assert all(row[4] for row in rows), [row[0] for row in rows if not row[4]]   # each key says what it means
    # every tuple of words sections.py gives a key is some key's "allowed", whole (found by the checks)
    for name in ("DTYPES", "ON_NONFINITE", "SOURCES", "PACKINGS", "ON_BAD_DOCUMENT", "SCHEDULERS", "CHECKPOINTING"):
        words = getattr(sections, name)
        assert any(all(re.search(rf"\b{w}\b", row[3]) for w in words) for row in rows), (name, words)
    allowed = {row[0]: row[3] for row in rows}
    assert allowed["data.seq_len"].startswith("at least 3") and allowed["train.seed"] == ">= 0 and below 2**32"
    assert allowed["train.lr"].startswith("> 0 and at most 1 ")


def test_the_cli_reference_lists_every_command(site):
    page = _text(site / "reference" / "cli" / "index.html")
    names = cli_names()
    assert {"distattn train", "distattn data prepare", "distattn cluster probe"} <= set(names)
    missing = [name for name in names if f"usage: {name}" not in page]
    assert not missing, f"commands whose help the built CLI reference lacks: {missing}"
    assert [name for name, _ in _hooks().cli_commands()] == names


def test_the_api_reference_documents_the_public_api(site):
    page = (site / "reference" / "api" / "index.html").read_text(encoding="utf-8")
    for anchor in ("distattn.runtime.api.plan", "distattn.runtime.plans.Plan.shard",
                   "distattn.runtime.plans.Plan.unshard", "distattn.runtime.plans.Plan.position_ids",
                   "distattn.runtime.plans.Plan.stats", "distattn.runtime.api.attention",
                   "distattn.runtime.oracle.reference_attention", "kernels.registry.attn_fwd", "kernels.registry.attn_bwd",
                   "distattn.train.trainer.Trainer", "parallel.megatron.get_gpt_layer_spec",
                   "parallel.deepspeed.DistAttnDistributedAttention", "parallel.hf.shard_inputs"):
        assert f'id="{anchor}"' in page, anchor


def test_the_readme_is_a_landing_page_linking_into_the_docs():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 150
    for page in LANDING_LINKS:
        assert f"]({page})" in readme, page


def test_every_relative_link_of_the_manual_points_to_a_file():
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
    dead = []
    for page in pages:
        for target in re.findall(r"\]\(([^)\s]+)\)", page.read_text()):
            if "://" in target or target.startswith(("#", "mailto:")):
                continue
            if not (page.parent / target.split("#")[0]).exists():
                dead.append(f"{page.relative_to(ROOT)} -> {target}")
    assert not dead, dead


def test_the_quick_start_has_a_table_of_contents(site):
    """The quick start is read by its headings (issue 79): the built page's contents sidebar lists them."""
    page = (site / "quickstart" / "index.html").read_text(encoding="utf-8")
    toc = re.search(r'<nav class="md-nav md-nav--secondary".*?</nav>', page, re.S)
    assert toc, "the built quick start has no table of contents"
    for anchor in ("set-up-and-run", "how-long", "which-torch", "install-as-a-library", "the-main-job"):
        assert f'href="#{anchor}"' in toc.group(0), anchor


def test_the_site_widens_its_column_and_keeps_config_keys_whole(site):
    """Every page loads the stylesheet that widens the content column past Material's ~680 px between the
    sidebars (the simulate tables' 11 columns, ~120-character commands), lets a wide table scroll and keeps a
    table's first-column key (``model.n_layers``) on one line."""
    css = (site / "stylesheets" / "extra.css").read_text()
    assert re.search(r"\.md-grid\s*\{\s*max-width:\s*(\d+)rem", css) and "overflow-x: auto" in css
    assert re.search(r"td:first-child code[^{]*\{[^}]*white-space:\s*nowrap", css)
    for page in ("reference/config", "guides/simulate", "quickstart"):
        assert "stylesheets/extra.css" in (site / page / "index.html").read_text(), page
