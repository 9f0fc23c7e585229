"""The flat module paths of the last release still import, for one release: the very module at its new
path, with one DeprecationWarning naming that path (``distattn.masks``, named in the public contract,
without one). Each case runs in a fresh interpreter, so no earlier import has warned already."""

import json
import subprocess
import sys

import pytest

PROBE = """
import json, warnings
warnings.simplefilter("always")
with warnings.catch_warnings(record=True) as caught:
{body}
print(json.dumps([[w.category.__name__, str(w.message), w.filename] for w in caught]))
"""


def _run(body: str) -> list:
    code = PROBE.format(body="\n".join("    " + line for line in body.strip().splitlines()))
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("statement", ["import distattn.spawn as old",
                                       "from distattn import spawn as old",
                                       "import distattn; old = distattn.spawn"])
def test_an_old_path_is_the_new_module_and_warns_once_naming_it(statement):
    caught = _run(f"""
{statement}
import distattn.distributed.spawn as new
assert old is new, (old, new)
from distattn.spawn import run_distributed
assert run_distributed is new.run_distributed
import distattn.spawn
""")
    assert [c[:2] for c in caught] == [["DeprecationWarning", "distattn.spawn moved to distattn.distributed.spawn; "
                                         "import it from there (the old path goes in the next release)"]]
    assert caught[0][2] == "<string>"   # the warning points at the caller's line, not at distattn


def test_every_moved_path_resolves_to_its_new_module():
    caught = _run("""
import importlib, distattn
for old, new in distattn._MOVED.items():
    assert importlib.import_module("distattn." + old) is importlib.import_module("distattn." + new), old
""")
    import distattn
    warned = sorted(c[1].split()[0] for c in caught)
    assert warned == sorted(f"distattn.{old}" for old in distattn._MOVED if old != "masks")


def test_the_contracts_masks_path_stays_without_a_warning():
    assert _run("""
import distattn, distattn.masks
from distattn.masks import prefix_lm
assert distattn.masks is distattn.planning.masks and prefix_lm is distattn.planning.masks.prefix_lm
""") == []


def test_no_module_of_distattn_imports_an_old_path():
    """Importing every layer and running a plan warns nothing: distattn itself uses only the new paths."""
    assert _run("""
import distattn, distattn.train.trainer, distattn.bench.suite, distattn.cli, distattn.sim.simulate
distattn.plan([5, 7], 2, scheduler="cad").stats(4, 2, 8)
""") == []


def test_an_unknown_name_is_still_an_attribute_error():
    import distattn

    with pytest.raises(AttributeError, match="no attribute 'spawnn'"):
        distattn.spawnn
    with pytest.raises(ModuleNotFoundError):
        __import__("distattn.spawnn")
