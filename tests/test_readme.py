"""Every Python block of the manual -- README.md and docs/**/*.md -- runs as written, in a fresh shell from
the root of a copy of the checkout (``.venv/bin/python snippet.py``; the copy and the shell are
``tests/test_documented_commands.py``'s, which runs the pages' commands).

A fragment (a block that imports nothing) runs after the first snippet of ``docs/guides/core-api.md``
(:data:`USE_PAGE`), whose names it continues, and after its own lines in :data:`FRAGMENT_SETUP`. A long
snippet would get :data:`SNIPPET_CHEAP`'s settings (none today).
"""

from __future__ import annotations

import pytest

from test_documented_commands import checkout_copy, fenced_blocks, manual_pages, run_fresh

# Names a fragment uses that neither it nor the "Use" snippet defines (a framework's group, a layout).
FRAGMENT_SETUP = {
    "cp_group": "cp_group = mesh; idx = [list(range(len(q)))[::-1]]",
    "cu_seqlens": "cu_seqlens = torch.tensor([0, *torch.tensor(doc_lens).cumsum(0).tolist()], dtype=torch.int32)\n"
                  "max_seqlen, g = max(doc_lens), mesh",
}

# Cheap settings for a snippet whose run is long, as the commands get them (none today: the Trainer
# snippet trains 3 steps as written).
SNIPPET_CHEAP: dict[str, str] = {}

USE_PAGE = "docs/guides/core-api.md"   # its first snippet is the one fragments continue


def python_snippets() -> list[tuple[str, str]]:
    """``("page:line", code)`` of each ``python`` block of the manual; a fragment (it imports nothing) after
    the snippet of :data:`USE_PAGE` it continues."""
    blocks = []
    for page, text in manual_pages():
        for lang, first, code in fenced_blocks(text):
            for old, new in SNIPPET_CHEAP.items():
                code = code.replace(old, new)
            if lang == "python":
                blocks.append((page, f"{page}:{first}", code))
    use = next(code for page, _, code in blocks if page == USE_PAGE and "distattn.plan(" in code)
    snippets = []
    for _, where, code in blocks:
        if code is use or "import " in code:
            snippets.append((where, code))
            continue
        setup = [lines for name, lines in FRAGMENT_SETUP.items() if name in code]
        snippets.append((where, "\n".join([use, *setup, code])))
    return snippets


@pytest.fixture(scope="module")
def copy(tmp_path_factory):
    return checkout_copy(tmp_path_factory.mktemp("checkout"))


@pytest.mark.parametrize("where, code", python_snippets(), ids=lambda x: x if ":" in x and "\n" not in x else "")
def test_readme_python_snippet_runs(where, code, copy):
    name = "snippet_" + "".join(c if c.isalnum() else "_" for c in where) + ".py"
    (copy / name).write_text(code)
    rc, seconds, out = run_fresh(copy, f".venv/bin/python {name}", timeout=600)
    assert rc == 0, f"{where}: the snippet exited {rc} after {seconds:.1f} s:\n{out[-3000:]}"
